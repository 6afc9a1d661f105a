"""The codec and filter pipeline of an HDF5 split: the compression names and levels, the h5py keywords of each,
the shuffle + deflate actfmt applies to whole chunks itself (and undoes when reading), the bounded inflation of
chunks, and the messages of a missing or failing filter."""

from __future__ import annotations

import zlib
from typing import TYPE_CHECKING, Any, cast

from isal import isal_zlib

from actfmt.errors import ConversionError, FormatError
from actfmt.formats.base import WriteOptions
from actfmt.storage import Location

if TYPE_CHECKING:  # pragma: no cover
    import h5py
    import numpy as np

H5Z_DEFLATE, H5Z_SHUFFLE, H5Z_FLETCHER32, H5Z_LZF = 1, 2, 3, 32000
BUILTIN = ("none", "gzip")  # stock HDF5 (h5dump, h5ls, any h5py) reads these
PLUGIN_CODECS = ("zstd", "blosc-zstd", "lz4")
COMPRESSIONS = ("gzip", "none", "lzf", *PLUGIN_CODECS)  # the first is the default
DEFAULT_LEVEL = {"gzip": 1, "zstd": 3, "blosc-zstd": 3}
LEVEL_RANGE = {"gzip": (0, 9), "zstd": (1, 22), "blosc-zstd": (0, 9)}
_PIP_HINT = "install it with `pip install hdf5plugin` (or `pip install actfmt[hdf5plugin]`)"


def import_hdf5plugin(where: object, what: str) -> Any:
    try:
        import hdf5plugin
    except ImportError:
        raise ConversionError(f"{where}: {what} needs the hdf5plugin package; {_PIP_HINT}.") from None
    return hdf5plugin


class Codec:
    """A resolved compression choice: h5py dataset keywords and, when actfmt encodes chunks itself, how."""

    name: str
    level: int | None
    shuffle: bool
    requires_plugins: list[str]
    kwargs: dict[str, Any]

    def __init__(self, name: str, level: int | None, shuffle: bool, where: object) -> None:
        self.name, self.level, self.shuffle = name, level, shuffle
        self.requires_plugins = []
        self.kwargs = {}
        if name == "gzip":
            self.kwargs = {"compression": "gzip", "compression_opts": level, "shuffle": shuffle}
        elif name == "lzf":
            self.kwargs = {"compression": "lzf", "shuffle": shuffle}
            self.requires_plugins = ["lzf"]
        elif name in PLUGIN_CODECS:
            hp = import_hdf5plugin(where, f"compression {name!r}")
            if name == "zstd":
                self.kwargs = dict(hp.Zstd(clevel=level))
            elif name == "blosc-zstd":
                mode = hp.Blosc.SHUFFLE if shuffle else hp.Blosc.NOSHUFFLE
                self.kwargs = dict(hp.Blosc(cname="zstd", clevel=level, shuffle=mode))
            else:
                self.kwargs = dict(hp.LZ4())
            if shuffle and name == "zstd":
                self.kwargs["shuffle"] = True
            self.requires_plugins = ["hdf5plugin"]

    @property
    def direct(self) -> bool:
        """Does actfmt write finished chunks itself (``write_direct_chunk``)?"""
        return self.name in BUILTIN

    @classmethod
    def resolve(cls, options: WriteOptions, where: object) -> Codec:
        name = (options.compression or COMPRESSIONS[0]).lower()
        if name not in COMPRESSIONS:
            raise ConversionError(
                f"{where}: the hdf5 format has no compression {options.compression!r}; "
                f"choose one of: {', '.join(COMPRESSIONS)}."
            )
        level = options.level
        if level is not None and name not in LEVEL_RANGE:
            raise ConversionError(f"{where}: compression {name!r} takes no --level (got {level}).")
        if level is None:
            level = DEFAULT_LEVEL.get(name)
        elif not LEVEL_RANGE[name][0] <= level <= LEVEL_RANGE[name][1]:
            lo, hi = LEVEL_RANGE[name]
            raise ConversionError(f"{where}: --level {level} is out of range for {name!r} ({lo}..{hi}).")
        shuffle = bool(options.extra.get("shuffle", name in ("gzip", "lzf", "blosc-zstd")))
        if name == "none":
            shuffle = False
        return cls(name, level, shuffle, where)

    @classmethod
    def of_dataset(cls, dset: h5py.Dataset) -> Codec:
        """The codec an existing dataset was created with (for resuming and finalize)."""
        plist = dset.id.get_create_plist()
        ids = [plist.get_filter(k)[0] for k in range(plist.get_nfilters())]
        codec = cls.__new__(cls)
        codec.kwargs, codec.level, codec.shuffle = {}, None, H5Z_SHUFFLE in ids
        codec.requires_plugins = []
        if not ids:
            codec.name = "none"
        elif set(ids) <= {H5Z_SHUFFLE, H5Z_DEFLATE} and H5Z_DEFLATE in ids:
            codec.name, codec.level = "gzip", int(dset.compression_opts)
        elif set(ids) <= {H5Z_SHUFFLE, H5Z_LZF}:
            codec.name, codec.requires_plugins = "lzf", ["lzf"]
        else:  # a plugin filter: written through HDF5's own pipeline
            codec.name, codec.requires_plugins = "plugin", ["hdf5plugin"]
        return codec


def shuffled(raw: np.ndarray, itemsize: int, shuffle: bool) -> np.ndarray:
    """A chunk's bytes as HDF5's shuffle filter arranges them (byte 0 of every element, then byte 1, ...), in a new
    array (the caller's buffer may be reused at once): 2- and 4-byte elements by shifts and masks, several times
    faster than a strided transpose."""
    import numpy as np

    flat = raw.reshape(-1)
    if not shuffle or itemsize == 1:
        return flat.view(np.uint8).copy()
    if itemsize in (2, 4):
        n = flat.size
        wide = flat.view(f"<u{itemsize}")
        out = np.empty(n * itemsize, dtype=np.uint8)
        np.bitwise_and(wide, 0xFF, out=out[:n], casting="unsafe")
        for k in range(1, itemsize):
            np.bitwise_and(np.right_shift(wide, 8 * k), 0xFF, out=out[k * n : (k + 1) * n], casting="unsafe")
        return out
    return flat.view(np.uint8).reshape(-1, itemsize).T.copy().reshape(-1)


def deflate(buf: Any, level: int) -> bytes:
    """A zlib stream of ``buf``, as HDF5's deflate filter stores a chunk.

    Deflated with ISA-L (``isal``, 8x zlib's speed at level 1 on real activations, 380 against 46 MB/s per core;
    the stream is standard zlib, which every HDF5 inflates): levels 1-3 -> ISA-L 1, 4-6 -> 2, 7-9 -> 3; level 0
    (stored) with zlib."""
    if level > 0:
        return bytes(isal_zlib.compress(memoryview(buf), min(3, (level + 2) // 3)))
    return zlib.compress(memoryview(buf), level)


def unshuffle(planes: np.ndarray, dst: np.ndarray) -> None:
    """Undo HDF5's shuffle filter: ``planes[k]`` holds byte ``k`` of every (little-endian) element; write the
    elements' bytes into ``dst`` (``uint8``).  2- and 4-byte elements by shifts (an order of magnitude faster
    than a strided transpose), others by the transpose."""
    import numpy as np

    itemsize = planes.shape[0]
    if itemsize in (2, 4):
        wide = dst.view(f"<u{itemsize}")
        np.left_shift(planes[itemsize - 1], 8 * (itemsize - 1), out=wide, dtype=wide.dtype)
        for k in range(itemsize - 2, 0, -1):
            np.bitwise_or(wide, np.left_shift(planes[k], 8 * k, dtype=wide.dtype), out=wide)
        np.bitwise_or(wide, planes[0], out=wide)
    else:
        np.copyto(dst.reshape(-1, itemsize), planes.T)


#: What a failed inflation raises (the stubs declare the class as an instance).
_INFLATE_ERROR = cast("type[Exception]", isal_zlib.error)


def inflate_chunk(raw: bytes, chunk_bytes: int, where: str, row: int, chunk: int) -> bytes:
    """A deflated chunk of rows ``row ..`` inflated with ISA-L to exactly ``chunk_bytes``: never more than one byte
    beyond them is inflated; one that does not inflate, or not to a whole chunk, is a FormatError."""
    try:
        inflater = isal_zlib.decompressobj()
        data = inflater.decompress(raw, chunk_bytes + 1)
    except _INFLATE_ERROR as exc:
        problem = f"it does not inflate ({exc})"
    else:
        if len(data) > chunk_bytes or inflater.unconsumed_tail:
            problem = f"it inflates to more than the {chunk_bytes} bytes of its declared chunk shape"
        elif len(data) != chunk_bytes:
            problem = f"it inflates to {len(data)} bytes, not {chunk_bytes}"
        else:
            return bytes(data)
    raise FormatError(
        f"{where}: the chunk of rows {row}-{row + chunk - 1} cannot be decoded: {problem}; the file is damaged: "
        f"re-create it."
    )


def guard_inflation(dset: h5py.Dataset, where: str, start: int, stop: int) -> None:
    """Before HDF5's own filter pipeline decodes rows ``start:stop`` of a deflate-filtered dataset in a layout
    the reader does not decode itself, inflate each of their chunks with a maximum output of its declared size:
    a chunk that would inflate beyond it (a decompression bomb) is a FormatError, never an allocation HDF5 would
    make.  Pipelines with other filters than shuffle, deflate and fletcher32 are left to HDF5."""
    if dset.chunks is None or stop <= start:
        return
    plist = dset.id.get_create_plist()
    ids = [plist.get_filter(k)[0] for k in range(plist.get_nfilters())]
    if H5Z_DEFLATE not in ids or not set(ids) <= {H5Z_DEFLATE, H5Z_SHUFFLE, H5Z_FLETCHER32}:
        return
    bit = 1 << ids.index(H5Z_DEFLATE)
    rows, cols = (int(n) for n in dset.chunks)
    limit = rows * cols * dset.dtype.itemsize + (4 if H5Z_FLETCHER32 in ids else 0)
    did = dset.id
    for row in range(start - start % rows, stop, rows):
        for col in range(0, int(dset.shape[1]), cols):
            try:
                mask, raw = did.read_direct_chunk((row, col))
            except (KeyError, OSError, ValueError):
                continue  # not allocated: the fill value
            if mask & bit:
                continue  # stored without deflate
            inflater = isal_zlib.decompressobj()
            try:
                data = inflater.decompress(raw, limit + 1)
            except _INFLATE_ERROR:
                continue  # HDF5's own filter reports it
            if len(data) > limit or inflater.unconsumed_tail:
                raise FormatError(
                    f"{where}: the chunk at row {row}, column {col} cannot be decoded: it inflates to more than "
                    f"the {limit} bytes of its declared chunk shape; the file is damaged: re-create it."
                )


class plugin_hint:
    """Turn HDF5's "filter not available" read errors into an actionable message."""

    def __init__(self, where: Location, name: str) -> None:
        self.where, self.name = where, name

    def __enter__(self) -> None:
        return None

    def __exit__(self, typ: Any, exc: BaseException | None, tb: Any) -> None:
        # the filter ran and failed: the chunk is damaged (a filter that is missing says "not registered" or so)
        if isinstance(exc, OSError) and "filter returned failure" in str(exc).lower():
            raise FormatError(
                f"{self.where}: {self.name}: a chunk cannot be decoded ({first_line(exc)}); the file is "
                f"damaged: re-create it."
            ) from None
        if isinstance(exc, OSError) and "filter" in str(exc).lower():
            raise ConversionError(
                f"{self.where}: {self.name} is compressed with an HDF5 filter that is not available "
                f"({first_line(exc)}); {_PIP_HINT}."
            ) from None


def first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
