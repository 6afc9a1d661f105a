"""One split as one HDF5 file (``EM`` -> ``EM.h5``), written with h5py and read with h5py or by byte offset.

Layout (the contract, readable by stock ``h5ls`` / ``h5dump`` / h5py):

* Root attributes, in the source's key order (``track_order=True``): every key of the producer's metadata.
  Strings, ints, floats and bools are stored as native HDF5 scalars; ``None``, lists and dicts as JSON strings.
  Because a JSON string and a real string look alike, the exact metadata (types, ``None``, nesting, key order)
  is also kept as one JSON string attribute ``actfmt_metadata`` (written at creation), and that is what
  :attr:`HDF5Reader.metadata` returns.  Files without it (written by other tools) fall back to the individual
  attributes.
* ``actfmt``: the actfmt block as a JSON string attribute, written by ``finalize`` last (``complete: true``);
  it also carries ``requires_plugins`` (``[]`` for files stock HDF5 reads; ``["hdf5plugin"]`` for the plugin
  codecs; ``["lzf"]`` for LZF, a filter h5py bundles but other HDF5 tools need as a plugin).
* Datasets ``layer_00`` ... of shape ``[total_examples, hidden_dim]``, chunked ``(chunk_rows, hidden_dim)``.
  float16 / float32 are stored native little-endian; bfloat16 as its ``<u2`` bits.  Each dataset carries
  ``actfmt_dtype`` (``"bfloat16"``, ...), a bfloat16 one ``actfmt_encoding`` (how to decode the bits), and, when
  the source was sharded, ``actfmt_shard_rows``.  Dimensions labelled ``example`` / ``hidden``, with the
  dimension scales ``/example`` and ``/hidden`` (int64 ``0 .. n-1``) attached.
* ``actfmt_stats`` (written by ``actfmt convert`` unless ``--no-stats``): datasets ``mean`` and ``std``
  (float32) and ``mean_f64`` (float64), ``[layers, hidden_dim]``, and the JSON attribute ``layers`` naming the
  layer of each row.
* Compression: ``gzip`` (the default: level 1 with the shuffle filter), ``none``, ``lzf``, and the plugin codecs
  ``zstd``, ``blosc-zstd`` and ``lz4`` (through ``hdf5plugin``).

Defaults: ``chunk_rows`` is the largest power of two with a chunk of at most 1 MiB, capped at the layer's rows
(small chunks keep single-row reads from a compressed file cheap); gzip level 1 + shuffle because shuffle is
what compresses bf16 (its exponent bytes) and higher levels buy a few percent for several times the time.

Writing (local files only: ``convert`` writes HDF5 into a local staging directory and uploads it):

* uncompressed, without ``--chunk-rows``: *contiguous* datasets whose file space is allocated (not written) when
  the file is created, so every layer's bytes have a known offset and are written there with ``pwrite`` or
  ``os.copy_file_range``, layers in parallel (:meth:`HDF5Format.writes_in_parallel`); HDF5 writes only the
  metadata.  A contiguous layer has no chunks, so a hole in it cannot be told from zeros by looking
  (``actfmt validate --deep`` compares it with the checksum recorded at conversion, ACT602);
* otherwise chunked: uncompressed and gzip blocks are stored as whole chunks with ``write_direct_chunk``
  (actfmt shuffles + deflates the chunks itself on a thread pool, as HDF5's filters would); ``block_rows``
  hands out chunk-aligned blocks of about 48 MiB; one writer at a time (HDF5 is the writer of the file).

Reading, locally (``h5py.File(path)``) or from object storage (h5py over a file object of the storage): an
uncompressed layer whose chunks are all stored raw (the writer lays them back to back, in a few runs between
HDF5's own metadata blocks) is read by byte offset through :class:`~actfmt.formats.base.RowStore` -- ``preadv``
locally, concurrent ranged GETs remotely, and byte runs a writer may copy as is; other layers with
``read_direct`` (compressed ones through a 64 MiB chunk cache each, a few datasets open at a time).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Sequence
from functools import cached_property
from typing import IO, TYPE_CHECKING, Any, cast

from actfmt.errors import (
    BadHeaderError,
    ConversionError,
    ExternalDataError,
    FormatError,
    MetadataError,
    NotASplitError,
)
from actfmt.formats.base import (
    ACTFMT_KEY,
    MAX_SHOWN_MISSING,
    VECTOR_NAMES,
    ByteRun,
    Format,
    LayerInfo,
    MissingChunks,
    Reader,
    RowStore,
    Segment,
    SplitSpec,
    StoredVectors,
    WriteOptions,
    Writer,
    as_array,
    check_chunk_grid,
    check_shard_rows,
    check_write_chunks,
    row_across,
    scratch,
    stored_dtype,
    stored_vectors_of,
)
from actfmt.formats.vectors import STATS_GROUP
from actfmt.layout import SUPPORTED_DTYPES, layer_index, loads_json
from actfmt.storage import Entry, Kind, LocalLocation, Location, read_pool

if TYPE_CHECKING:  # pragma: no cover
    from pathlib import Path

    import h5py
    import numpy as np

__all__ = ["HDF5_SIGNATURE", "HDF5Format", "HDF5Reader", "HDF5Writer", "default_chunk_rows"]

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
#: Where the signature may be: at 0, or after a user block of 512, 1024 or 2048 bytes.
SIGNATURE_OFFSETS = (0, 512, 1024, 2048)
#: Names a file on object storage must have to be probed (a request per file would cost too much).
REMOTE_SUFFIXES = (".h5", ".hdf5")
#: Root attribute holding the producer's metadata as one exact JSON document.
METADATA_ATTR = "actfmt_metadata"
#: Dataset attributes.
DTYPE_ATTR = "actfmt_dtype"
#: On a bfloat16 layer: how to get the values back from the uint16 bits (h5py users see it in ``dset.attrs``,
#: ``h5dump -A`` and ``h5ls -v`` print it).
ENCODING_ATTR = "actfmt_encoding"
BF16_ENCODING = (
    "bfloat16 values stored as their uint16 bits: decode with x.view(ml_dtypes.bfloat16), or "
    "torch.from_numpy(x.view('int16')).view(torch.bfloat16); the integers themselves mean nothing"
)
#: The layers' dimensions (also the names of the dimension scales).
DIMENSION_NAMES = ("example", "hidden")
SHARD_ROWS_ATTR = "actfmt_shard_rows"
RESERVED_ATTRS = (ACTFMT_KEY, METADATA_ATTR)
H5Z_DEFLATE, H5Z_SHUFFLE, H5Z_FLETCHER32, H5Z_LZF = 1, 2, 3, 32000

CHUNK_TARGET_BYTES = 1 << 20  # 1 MiB per chunk
BLOCK_TARGET_BYTES = 48 << 20  # ~48 MiB per write() block
READ_CACHE_BYTES = 64 << 20  # chunk cache of a compressed dataset
#: Datasets kept open at once (each with a READ_CACHE_BYTES chunk cache when compressed): bounds memory.
OPEN_DATASETS = 4
READ_CACHE_SLOTS = 12421  # a prime, ~100x the chunks 64 MiB holds at 0.5 MiB/chunk

BUILTIN = ("none", "gzip")  # stock HDF5 (h5dump, h5ls, any h5py) reads these
PLUGIN_CODECS = ("zstd", "blosc-zstd", "lz4")
COMPRESSIONS = ("gzip", "none", "lzf", *PLUGIN_CODECS)  # the first is the default
DEFAULT_LEVEL = {"gzip": 1, "zstd": 3, "blosc-zstd": 3}
LEVEL_RANGE = {"gzip": (0, 9), "zstd": (1, 22), "blosc-zstd": (0, 9)}

_PIP_HINT = "install it with `pip install hdf5plugin` (or `pip install actfmt[hdf5plugin]`)"


def default_chunk_rows(rows: int, hidden_dim: int, itemsize: int) -> int:
    """The largest power of two whose chunk stays within 1 MiB, capped at ``rows`` (at least 1)."""
    row_bytes = max(1, hidden_dim * itemsize)
    n = 1 << max(0, math.floor(math.log2(max(1, CHUNK_TARGET_BYTES // row_bytes))))
    return max(1, min(n, rows))


def _import_hdf5plugin(where: object, what: str) -> Any:
    try:
        import hdf5plugin
    except ImportError:
        raise ConversionError(f"{where}: {what} needs the hdf5plugin package; {_PIP_HINT}.") from None
    return hdf5plugin


def _attr_value(value: Any) -> Any:
    """A metadata value as an HDF5-friendly attribute value (native scalars; JSON text otherwise)."""
    import numpy as np

    if isinstance(value, bool):
        return np.bool_(value)
    if isinstance(value, int) and -(2**63) <= value < 2**63:
        return np.int64(value)
    if isinstance(value, float):
        return np.float64(value)
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False)


def _from_attr(value: Any) -> Any:
    """An attribute value back as a JSON-friendly Python value (for files without ``actfmt_metadata``)."""
    import numpy as np

    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if isinstance(value, np.ndarray):
        return [_from_attr(v) for v in value.tolist()] if value.ndim else _from_attr(value[()])
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, str):
        return value
    if isinstance(value, (bool, int, float, list, dict)) or value is None:
        return value
    return None  # h5py.Empty and the like


def _json_attr(raw: Any) -> Any:
    """A JSON string attribute, decoded (``ValueError`` / ``TypeError`` when it is not JSON)."""
    if not isinstance(raw, (bytes, str)):
        raise TypeError(f"a JSON attribute must be a string, got {type(raw).__name__}")
    return loads_json(raw)


class _Codec:
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
            hp = _import_hdf5plugin(where, f"compression {name!r}")
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
    def resolve(cls, options: WriteOptions, where: object) -> _Codec:
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
    def of_dataset(cls, dset: h5py.Dataset) -> _Codec:
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


def _shuffled(raw: np.ndarray, itemsize: int, shuffle: bool) -> np.ndarray:
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


def _deflate(buf: Any, level: int) -> bytes:
    """A zlib stream of ``buf``, as HDF5's deflate filter stores a chunk.

    Deflated with ISA-L (``isal``, 8x zlib's speed at level 1 on real activations, 380 against 46 MB/s per core;
    the stream is standard zlib, which every HDF5 inflates): levels 1-3 -> ISA-L 1, 4-6 -> 2, 7-9 -> 3; level 0
    (stored) with zlib."""
    import zlib

    if level > 0:
        try:
            from isal import isal_zlib
        except ImportError:  # pragma: no cover - isal is a dependency; zlib gives the same format
            pass
        else:
            return bytes(isal_zlib.compress(memoryview(buf), min(3, (level + 2) // 3)))
    return zlib.compress(memoryview(buf), level)


def _unshuffle(planes: np.ndarray, dst: np.ndarray) -> None:
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


# ----------------------------------------------------------------------------------------------------------
# writing


def _fits(dset: Any, info: LayerInfo) -> bool:
    """Does an existing dataset have the shape and dtype layer ``info`` needs?"""
    return (
        dset is not None
        and getattr(dset, "shape", None) == (max(0, info.rows), info.hidden_dim)
        and dset.dtype == stored_dtype(info.dtype)
        and _from_attr(dset.attrs.get(DTYPE_ATTR)) == info.dtype
    )


def _attach_scales(f: h5py.File, dset: h5py.Dataset) -> None:
    """Name the layer's dimensions ``example`` / ``hidden`` and attach the dimension scales of those names
    (int64 ``0 .. n-1``, made with the first layer): h5py's ``dset.dims``, ``h5dump`` and netCDF-4 readers
    (xarray's ``h5netcdf`` engine) then know which axis is which."""
    import numpy as np

    for axis, dim in enumerate(DIMENSION_NAMES):
        n = int(dset.shape[axis])
        scale = f.get(dim)
        if scale is None:
            scale = f.create_dataset(dim, data=np.arange(n, dtype="<i8"))
            scale.make_scale(dim)
        dset.dims[axis].label = dim
        if scale.shape == (n,):
            dset.dims[axis].attach_scale(scale)


def _detach_scales(dset: h5py.Dataset) -> None:
    """Detach a dataset from its scales before it is deleted (no dangling references left in the scales)."""
    for axis in range(dset.ndim):
        for scale in list(dset.dims[axis].values()):
            dset.dims[axis].detach_scale(scale)


class HDF5Writer(Writer):
    """Writes every layer of a split into one local HDF5 file.

    Uncompressed and without ``--chunk-rows``, datasets are *contiguous*, their space allocated when the file is
    created (nothing written: the file is sparse until filled), so each layer's bytes have a known offset: they
    are written there with ``pwrite`` (or ``os.copy_file_range`` from the source's raw bytes), by any number of
    threads or processes at once, and HDF5 itself only writes the metadata.  Otherwise the layers are chunked
    and whole chunks go through ``write_direct_chunk`` (gzip encoded on a thread pool), one writer at a time.
    """

    format = "hdf5"

    def __init__(self, location: Location, spec: SplitSpec, options: WriteOptions) -> None:
        if not location.is_local:
            raise ConversionError(
                f"{location}: the hdf5 writer writes local files only; write the file into a local "
                f"directory and upload it (actfmt convert does that for you)."
            )
        super().__init__(location, spec, options)
        self._file: h5py.File | None = None
        self._pool: Any = None
        self._pending: tuple[Any, list[int], list[Any]] | None = None  # (dataset, chunk rows, deflating)
        self._codecs: dict[int, _Codec] = {}
        self._requested = _Codec.resolve(options, location)
        self._offsets: dict[str, int] | None = None  # contiguous datasets: where each one's bytes start
        self._out: Any = None  # the file opened for positional writes

    @staticmethod
    def contiguous(options: WriteOptions) -> bool:
        """Are the layers written contiguous (uncompressed, no ``--chunk-rows``)?"""
        return (options.compression or "").lower() == "none" and not options.chunk_rows

    @property
    def local_path(self) -> Path:
        return self.location.local_path  # type: ignore[no-any-return]

    # pickling (a writer may be sent to a worker process): never ship the open h5py handle or the pool
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_file=None, _pool=None, _pending=None, _codecs={}, _out=None)
        return state

    def chunk_rows(self, layer: int) -> int:
        info = self.spec.layers[layer]
        if self.options.chunk_rows:
            return max(1, min(int(self.options.chunk_rows), max(1, info.rows)))
        return default_chunk_rows(info.rows, info.hidden_dim, info.itemsize)

    @classmethod
    def create(cls, location: Location, spec: SplitSpec, options: WriteOptions) -> HDF5Writer:
        import h5py

        self = cls(location, spec, options)
        for info in spec.layers:
            if info.dtype not in SUPPORTED_DTYPES:
                raise ConversionError(
                    f"{location}: {info.name} has dtype {info.dtype}; hdf5 stores only "
                    f"{', '.join(SUPPORTED_DTYPES)} (use --dtype to cast)."
                )
        for pos, info in enumerate(spec.layers):
            if not cls.contiguous(options):
                check_write_chunks(f"{location}: {info.name}", self.chunk_rows(pos), info)
        if location.exists():
            raise ConversionError(f"{location}: already exists; the writer only creates new files.")
        location.parent.mkdir()
        try:
            with h5py.File(self.local_path, "w", track_order=True) as f:
                meta = {k: v for k, v in spec.metadata.items() if k not in RESERVED_ATTRS}
                for key, value in meta.items():
                    f.attrs[key] = _attr_value(value)
                f.attrs[METADATA_ATTR] = json.dumps(meta, ensure_ascii=False, allow_nan=True)
                for pos in range(len(spec.layers)):
                    self._make_dataset(f, pos)
        except BaseException:
            location.delete()  # never leave a half-made file behind
            raise
        return self

    def _make_dataset(self, f: h5py.File, pos: int) -> None:
        """Create the dataset of layer position ``pos`` (empty: contiguous space allocated, or chunked)."""
        import h5py
        import numpy as np

        info = self.spec.layers[pos]
        rows = max(0, info.rows)
        if self.contiguous(self.options):
            dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
            dcpl.set_layout(h5py.h5d.CONTIGUOUS)
            dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)  # the offset is known now
            dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)  # nothing written until the data
            dset = f.create_dataset(
                info.name, shape=(rows, info.hidden_dim), dtype=stored_dtype(info.dtype), dcpl=dcpl
            )
        else:
            dset = f.create_dataset(
                info.name,
                shape=(rows, info.hidden_dim),
                maxshape=(None if rows == 0 else rows, info.hidden_dim),
                dtype=stored_dtype(info.dtype),
                chunks=(self.chunk_rows(pos), max(1, info.hidden_dim)),
                fillvalue=0,
                **self._requested.kwargs,
            )
        dset.attrs[DTYPE_ATTR] = info.dtype
        if info.dtype == "bfloat16":
            dset.attrs[ENCODING_ATTR] = BF16_ENCODING
        if info.shard_rows:
            dset.attrs[SHARD_ROWS_ATTR] = np.asarray(info.shard_rows, dtype=np.int64)
        _attach_scales(f, dset)

    @classmethod
    def open(cls, location: Location, spec: SplitSpec, options: WriteOptions) -> HDF5Writer:
        """A partial file, with every dataset that no longer has the source's shape or dtype made again, empty
        (``--resume`` after the source of a layer changed: that layer is converted again)."""
        import h5py

        self = cls(location, spec, options)
        if not os.path.exists(self.local_path):
            return self
        with h5py.File(self.local_path, "r") as f:
            stale = [pos for pos, info in enumerate(spec.layers) if not _fits(f.get(info.name), info)]
        if stale:
            with h5py.File(self.local_path, "r+") as f:
                for pos in stale:
                    name = spec.layers[pos].name
                    if name in f:
                        _detach_scales(f[name])
                        del f[name]
                    self._make_dataset(f, pos)
        return self

    # -- file handle ---------------------------------------------------------------------------------------
    def _f(self) -> h5py.File:
        if self._file is None:
            import h5py

            try:
                self._file = h5py.File(self.local_path, "r+")
            except FileNotFoundError:
                raise ConversionError(
                    f"{self.location}: not found; create() the file before writing."
                ) from None
        return self._file

    def _dataset(self, layer: int) -> tuple[h5py.Dataset, _Codec]:
        info = self.spec.layers[layer]
        f = self._f()
        if info.name not in f:
            raise ConversionError(f"{self.location}: dataset {info.name} is missing; re-create the file.")
        dset = f[info.name]
        if layer not in self._codecs:
            self._codecs[layer] = _Codec.of_dataset(dset)
            if "hdf5plugin" in self._codecs[layer].requires_plugins:
                _import_hdf5plugin(self.location, f"{info.name} (compressed with a plugin filter)")
        return dset, self._codecs[layer]

    def block_rows(self, layer: int) -> list[int]:
        info = self.spec.layers[layer]
        if info.rows <= 0:
            return [0]
        chunk = self.chunk_rows(layer)
        chunk_bytes = chunk * info.hidden_dim * info.itemsize
        step = chunk * max(1, BLOCK_TARGET_BYTES // max(1, chunk_bytes))
        return [min(step, info.rows - s) for s in range(0, info.rows, step)]

    # -- writing -------------------------------------------------------------------------------------------
    def copies_raw(self, layer: int) -> bool:
        return self.contiguous(self.options)

    def write(self, layer: int, start: int, data: Any, runs: list[ByteRun] | None = None) -> None:
        """Write rows ``start ..`` of ``layer``: contiguous layers at their offset (from ``runs`` in the kernel
        when given), chunked ones chunk by chunk from ``data``."""
        import numpy as np

        info = self.spec.layers[layer]
        if data is None:  # a contiguous layer, from the source's bytes
            assert runs is not None and self.contiguous(self.options)
            self._write_at(layer, start, None, runs)
            return
        try:
            arr = as_array(data, info.dtype)
        except ValueError as exc:
            raise ConversionError(f"{self.location}: {info.name}: {exc}.") from None
        n = int(arr.shape[0]) if arr.ndim else 0
        if n == 0:
            return
        if arr.ndim != 2 or arr.shape[1] != info.hidden_dim:
            raise ConversionError(
                f"{self.location}: {info.name}: block of shape {tuple(arr.shape)} does not fit "
                f"[{info.rows}, {info.hidden_dim}]."
            )
        if start < 0 or start + n > info.rows:
            raise ConversionError(
                f"{self.location}: {info.name}: rows {start}..{start + n} outside 0..{info.rows}."
            )
        if self.contiguous(self.options):
            self._write_at(layer, start, arr, runs)
            return
        dset, codec = self._dataset(layer)
        chunk = int(dset.chunks[0])
        if not codec.direct or start % chunk:
            self._drain()
            dset.write_direct(arr, dest_sel=np.s_[start : start + n])
            return
        # whole chunks, written as stored (no HDF5 copy, no chunk cache); the last may be padded
        starts = range(start, start + n, chunk)
        pieces = [arr[s - start : min(s - start + chunk, n)] for s in starts]
        if pieces[-1].shape[0] != chunk and starts[-1] + pieces[-1].shape[0] != info.rows:
            # a block ending mid-chunk inside the layer: let HDF5 merge it
            self._drain()
            dset.write_direct(arr, dest_sel=np.s_[start : start + n])
            return
        if pieces[-1].shape[0] != chunk:
            pad = np.zeros((chunk, info.hidden_dim), dtype=arr.dtype)
            pad[: pieces[-1].shape[0]] = pieces[-1]
            pieces[-1] = pad
        if codec.name == "none":
            self._drain()
            for s, piece in zip(starts, pieces, strict=True):
                dset.id.write_direct_chunk((s, 0), piece)
            return
        # gzip: this block's chunks are deflated on the pool while the previous block's are written (and the
        # source's next block is read); the shuffled copies are made here, so the caller may reuse its buffer
        itemsize, shuffle, level = arr.dtype.itemsize, codec.shuffle, int(codec.level or 0)
        pool = self._executor()
        futures = [pool.submit(_deflate, _shuffled(p, itemsize, shuffle), level) for p in pieces]
        self._drain()
        self._pending = (dset, list(starts), futures)

    def _drain(self) -> None:
        """Write the chunks still being deflated (in order), waiting for them."""
        pending, self._pending = self._pending, None
        if pending is not None:
            dset, starts, futures = pending
            for s, fut in zip(starts, futures, strict=True):
                dset.id.write_direct_chunk((s, 0), fut.result())

    def _offset(self, layer: int) -> int:
        """Where the contiguous dataset of ``layer`` starts in the file (read once, with h5py, read-only)."""
        if self._offsets is None:
            import h5py

            with h5py.File(self.local_path, "r") as f:
                offsets = {name: f[name].id.get_offset() for name in f if layer_index(name) is not None}
            if any(v is None for v in offsets.values()):
                raise ConversionError(f"{self.location}: a dataset has no file space; re-create the file.")
            self._offsets = {k: int(v) for k, v in offsets.items()}
        name = self.spec.layers[layer].name
        if name not in self._offsets:
            raise ConversionError(f"{self.location}: dataset {name} is missing; re-create the file.")
        return self._offsets[name]

    def _write_at(self, layer: int, start: int, arr: np.ndarray | None, runs: list[ByteRun] | None) -> None:
        """Rows of a contiguous dataset, written at their offset in the file (never through HDF5)."""
        at = self._offset(layer) + start * self.spec.layers[layer].row_bytes
        if self._out is None:
            assert isinstance(self.location, LocalLocation)  # (the constructor refuses others)
            self._out = self.location.open_update()
        if runs is not None:
            for loc, off, n in runs:
                self._out.copy_range(loc, off, n, at=at)
                at += n
        else:
            assert arr is not None
            self._out.pwrite(arr, at)

    def _executor(self) -> Any:
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            workers = int(self.options.extra.get("threads") or min(4, os.cpu_count() or 1))
            self._pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="actfmt-h5")
        return self._pool

    def finish_layer(self, layer: int) -> None:
        self._drain()
        # make everything so far durable in the file's own metadata: a killed run resumes layer by layer
        if self._file is not None:
            self._file.flush()
        if self._out is not None:
            self._out.close()
            self._out = None

    def write_stats(self, vectors: StoredVectors) -> None:
        """The vectors as datasets of the group ``actfmt_stats`` (``mean``, ``std``, ``mean_f64``), with the rows'
        layer names as the group's JSON attribute ``layers``."""
        f = self._f()
        if STATS_GROUP in f:
            del f[STATS_GROUP]
        group = f.create_group(STATS_GROUP)
        group.attrs["layers"] = json.dumps(vectors.layers)
        for name, arr in vectors.arrays.items():
            group.create_dataset(name, data=arr)

    def finalize(self, block: dict[str, Any]) -> None:
        f = self._f()
        plugins: list[str] = []
        for pos, info in enumerate(self.spec.layers):
            if info.name in f:
                _, codec = self._dataset(pos)
                plugins += [p for p in codec.requires_plugins if p not in plugins]
        out = dict(block)
        out["requires_plugins"] = plugins
        f.attrs[ACTFMT_KEY] = json.dumps(out, ensure_ascii=False)
        f.flush()
        self.close()

    def close(self) -> None:
        # chunks still being deflated are written if they can be (what was written stays written); an error
        # here is left to the error that stopped the run, if any: the layer was not finished, a resume redoes it
        try:
            self._drain()
        except Exception:
            self._pending = None
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._out is not None:
            self._out.close()
            self._out = None
        self._codecs.clear()


# ----------------------------------------------------------------------------------------------------------
# reading


class HDF5Reader(Reader):
    """A split stored as one HDF5 file, on any storage (see the module docstring).

    Picklable: the open file is never shipped; the row stores (byte offsets of raw layers) are, so a worker
    reads an uncompressed layer without opening the file with h5py.
    """

    format = "hdf5"

    def __init__(self, location: Location) -> None:
        super().__init__(location)
        try:
            st = location.stat()
        except FileNotFoundError:
            st = None
        if st is None or st.kind != Kind.FILE:
            raise NotASplitError(f"{location}: no such file; an hdf5 split is one .h5 file.")
        #: Where raw rows are read from: the file as it was when opened (a rewrite is a ChangedError).
        self._pinned = location.pinned(st.identity) if st.identity else location
        self._file: h5py.File | None = None
        self._fh: IO[bytes] | None = None
        self._dsets: dict[int, h5py.Dataset] = {}
        self._stores: dict[int, RowStore | None] = {}
        self._deflate: dict[int, tuple[int, int] | None] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_file=None, _fh=None, _dsets={})
        return state

    @property
    def file(self) -> h5py.File:
        """The open h5py File (read-only)."""
        if self._file is None:
            import h5py

            # a storage error opening the object (missing, access denied) propagates as is, naming it
            fh = None if self.location.is_local else self.location.open_input()
            try:
                # locally, h5py opens the path itself: the resolved path, checked to stay inside the tree
                self._file = h5py.File(self.location.checked_path() if fh is None else fh, "r")
            except OSError as exc:
                if fh is not None:
                    fh.close()
                raise FormatError(
                    f"{self.location}: cannot be opened as HDF5 ({_first_line(exc)}); the file is damaged or "
                    f"still being written: re-create it."
                ) from None
            self._fh = fh
            block = self._block()
            if block and "hdf5plugin" in (block.get("requires_plugins") or []):
                _import_hdf5plugin(self.location, "this file (compressed with a plugin codec)")
        return self._file

    def _block(self) -> dict[str, Any] | None:
        f = self._file
        if f is None or ACTFMT_KEY not in f.attrs:
            return None
        try:
            data = _json_attr(f.attrs[ACTFMT_KEY])
        except (TypeError, ValueError, UnicodeDecodeError):
            return None
        return data if isinstance(data, dict) else None

    @cached_property
    def metadata(self) -> dict[str, Any]:
        attrs = self.file.attrs
        if METADATA_ATTR in attrs:
            try:
                data = _json_attr(attrs[METADATA_ATTR])
            except (TypeError, ValueError, UnicodeDecodeError) as exc:
                raise MetadataError(
                    f"{self.location}: attribute {METADATA_ATTR} is not valid JSON ({exc})."
                ) from None
            if not isinstance(data, dict):
                raise MetadataError(f"{self.location}: attribute {METADATA_ATTR} must hold a JSON object.")
            return data
        return {k: _from_attr(attrs[k]) for k in attrs if k not in RESERVED_ATTRS}

    @property
    def actfmt(self) -> dict[str, Any] | None:
        self.file  # noqa: B018 - opens it
        return self._block()

    def stored_vectors(self) -> StoredVectors | None:
        import numpy as np

        if self._link(self.file, STATS_GROUP) is None:
            return None
        group = self.file[STATS_GROUP]
        if not hasattr(group, "attrs"):
            return None
        arrays = {}
        for n in VECTOR_NAMES:
            if self._link(group, n) is None:
                continue
            dset = group[n]
            if not hasattr(dset, "id"):
                continue
            self._check_storage(dset, f"{STATS_GROUP}/{n}")
            if dset.size * dset.dtype.itemsize > 1 << 28:
                raise BadHeaderError(
                    f"{self.location}: {STATS_GROUP}/{n} declares shape {dset.shape}; refused."
                )
            arrays[n] = np.asarray(dset[()])
        return stored_vectors_of(arrays, _from_attr(group.attrs.get("layers", "null")))

    def _link(self, group: Any, name: str) -> Any:
        """The hard link ``name`` in ``group`` (``None`` when there is none); an external link is an
        :class:`~actfmt.errors.ExternalDataError` and a soft link (which may loop) a
        :class:`~actfmt.errors.BadHeaderError`, both refused without being followed."""
        import h5py

        link = group.get(name, getlink=True)
        if link is None or isinstance(link, h5py.HardLink):
            return link
        where = f"{group.name.rstrip('/')}/{name}".lstrip("/")
        if isinstance(link, h5py.ExternalLink):
            raise ExternalDataError(
                f"{self.location}: {where} is an external link to {link.filename!r}:{link.path}; data outside "
                f"the file is refused, never read: re-create the file with the data inside it."
            )
        target = getattr(link, "path", "?")
        raise BadHeaderError(
            f"{self.location}: {where} is a soft link (to {target}); actfmt writes none and does not follow "
            f"them (one may loop): re-create the file."
        )

    def _check_storage(self, dset: Any, name: str) -> None:
        """Refuse a dataset whose data lives outside the file (external raw-data files, a virtual layout),
        from its creation property list: detected before any read (a relative external file resolves against
        the current directory, and a FIFO there would hang the read)."""
        import h5py

        plist = dset.id.get_create_plist()
        if plist.get_layout() == h5py.h5d.VIRTUAL:
            raise ExternalDataError(
                f"{self.location}: {name} is a virtual dataset (its data is mapped from other files); refused, "
                f"never read: re-create the file with the data inside it."
            )
        if plist.get_external_count() > 0:
            files = [plist.get_external(k)[0] for k in range(min(3, plist.get_external_count()))]
            raise ExternalDataError(
                f"{self.location}: {name} stores its data in external files ({', '.join(map(repr, files))}); "
                f"refused, never read: re-create the file with the data inside it."
            )

    @cached_property
    def _names(self) -> list[tuple[int, str]]:
        out = []
        f = self.file
        for name in f:
            i = layer_index(name)
            if i is None or self._link(f, name) is None:
                continue
            if getattr(f[name], "ndim", None) is not None:
                out.append((i, name))
        return sorted(out)

    def _check_stats_links(self) -> None:
        """The statistics group and its vectors are hard links to data inside the file (checked with the
        layers, so a header-only validation reports an external or soft link there too)."""
        import h5py

        if self._link(self.file, STATS_GROUP) is None:
            return
        group = self.file[STATS_GROUP]
        if isinstance(group, h5py.Group):
            for n in VECTOR_NAMES:
                if self._link(group, n) is not None and hasattr(group[n], "id"):
                    self._check_storage(group[n], f"{STATS_GROUP}/{n}")

    @cached_property
    def layers(self) -> Sequence[LayerInfo]:
        self._check_stats_links()
        out = []
        for pos, (i, name) in enumerate(self._names):
            dset = self._dataset(pos)
            if dset.ndim != 2:
                raise FormatError(f"{self.location}: dataset {name} must be 2-D, got shape {dset.shape}.")
            self._check_sizes(dset, name)
            rows = int(dset.shape[0])
            out.append(
                LayerInfo(
                    name=name,
                    index=i,
                    rows=rows,
                    hidden_dim=int(dset.shape[1]),
                    dtype=self._dtype_name(dset, name),
                    shard_rows=check_shard_rows(
                        f"{self.location}: {name}", dset.attrs.get(SHARD_ROWS_ATTR), rows
                    ),
                )
            )
        return out

    def _check_sizes(self, dset: Any, name: str) -> None:
        """The declared shape and chunks, against sane bounds and the file's size, before any per-chunk loop:
        a contiguous layer's raw bytes must lie in the file; a chunked one is bounded in chunk count and size."""
        where = f"{self.location}: {name}"
        shape = tuple(int(n) for n in dset.shape)
        itemsize = int(dset.dtype.itemsize)
        if dset.chunks is None:
            try:
                size = self.location.size()
            except OSError:
                size = None
            check_chunk_grid(where, shape, (max(1, shape[0]), max(1, shape[1])), 0)
            if size is not None and shape[0] * shape[1] * itemsize > size:
                raise BadHeaderError(
                    f"{where}: declares shape {list(shape)} ({shape[0] * shape[1] * itemsize} bytes, stored "
                    f"contiguous) in a file of {size} bytes: the file is damaged or crafted: re-create it."
                )
        else:
            check_chunk_grid(where, shape, tuple(int(n) for n in dset.chunks), itemsize)

    @cached_property
    def chunk_rows(self) -> list[int]:
        """Rows per stored chunk of each layer (all its rows when it is not chunked)."""
        out = []
        for pos, info in enumerate(self.layers):
            chunks = self._dataset(pos).chunks
            out.append(int(chunks[0]) if chunks else max(1, info.rows))
        return out

    def describe(self) -> dict[str, Any]:
        """Chunk shape and compression of the first layer (for ``actfmt info``)."""
        if not self._names:
            return {}
        dset = self._dataset(0)
        comp = dset.compression
        if comp is None and dset.id.get_create_plist().get_nfilters() > 0:
            comp = "plugin filter"
        if comp is not None and dset.compression_opts is not None:
            comp = f"{comp} level {dset.compression_opts}"
        if comp is not None and dset.shuffle:
            comp = f"{comp} (shuffle)"
        return {"chunks": list(dset.chunks) if dset.chunks else None, "compression": comp or "none"}

    def chunk_rows_of(self, layer: int) -> int | None:
        """Rows per chunk of a chunked layer (``None``: contiguous, or stored raw, where any rows are cheap)."""
        if self._rows(layer) is not None:
            return None
        chunks = self._dataset(layer).chunks
        return int(chunks[0]) if chunks else None

    def _dtype_name(self, dset: h5py.Dataset, name: str) -> str:
        raw = dset.attrs.get(DTYPE_ATTR)
        if isinstance(raw, bytes):
            raw = raw.decode()
        if raw is not None:
            if raw not in SUPPORTED_DTYPES or dset.dtype.itemsize != (4 if raw == "float32" else 2):
                raise FormatError(f"{self.location}: {name} has {DTYPE_ATTR}={raw!r} on {dset.dtype} data.")
            return str(raw)
        kind = {("f", 2): "float16", ("f", 4): "float32"}.get((dset.dtype.kind, dset.dtype.itemsize))
        if kind is None:
            raise FormatError(
                f"{self.location}: {name} holds {dset.dtype} without an {DTYPE_ATTR} attribute; "
                f"expected float16, float32 or bfloat16 bits marked {DTYPE_ATTR}='bfloat16'."
            )
        return kind

    def _dataset(self, pos: int) -> h5py.Dataset:
        """Dataset at layer position ``pos``, opened with a chunk cache that suits it."""
        if pos not in self._dsets:
            import h5py

            name = self._names[pos][1]
            f = self.file
            probe = h5py.h5d.open(f.id, name.encode())
            self._check_storage(h5py.Dataset(probe), name)
            filtered = probe.get_create_plist().get_nfilters() > 0
            del probe  # HDF5 shares one chunk cache per open dataset: close it so the dapl below applies
            dapl = h5py.h5p.create(h5py.h5p.DATASET_ACCESS)
            # unfiltered: no cache, HDF5 reads the selected rows straight from the file into our buffer;
            # filtered: a cache holding many chunks, so repeated random reads decompress each chunk once
            nbytes = READ_CACHE_BYTES if filtered else 0
            dapl.set_chunk_cache(READ_CACHE_SLOTS if filtered else 1, nbytes, 0.75)
            # each open dataset holds its own cache: keep a few open, so reading every layer stays bounded
            while len(self._dsets) >= OPEN_DATASETS:
                self._dsets.pop(next(iter(self._dsets)))
            self._dsets[pos] = h5py.Dataset(h5py.h5d.open(f.id, name.encode(), dapl))
        return self._dsets[pos]

    # -- raw rows --------------------------------------------------------------------------------------------
    def _rows(self, pos: int) -> RowStore | None:
        """The layer's rows by byte offset when every one of them is stored raw, else ``None``."""
        if pos not in self._stores:
            info = self.layers[pos]
            segments = self._raw_segments(pos, info)
            self._stores[pos] = None if segments is None else RowStore(segments, info.hidden_dim, info.dtype)
        return self._stores[pos]

    def _raw_segments(self, pos: int, info: LayerInfo) -> list[Segment] | None:
        """Segments of raw rows of an unfiltered layer, one per run of chunks lying back to back in the file
        (a few for a layer the writer wrote); ``None`` when a chunk is missing or not stored raw."""
        dset = self._dataset(pos)
        did = dset.id
        if (
            info.hidden_dim == 0
            or dset.dtype != stored_dtype(info.dtype)
            or did.get_create_plist().get_nfilters()
        ):
            return None
        if info.rows == 0:
            return []
        row_bytes = info.row_bytes
        if dset.chunks is None:  # contiguous (another tool's file); compact storage has no offset
            offset = did.get_offset()
            if offset is None or did.get_storage_size() != info.nbytes:
                return None
            return [Segment(self._pinned, int(offset), info.rows)]
        chunk, width = (int(x) for x in dset.chunks)
        n_expected = -(-info.rows // chunk)
        if width != info.hidden_dim or did.get_num_chunks() != n_expected:
            return None
        found: list[tuple[int, int | None, int, int]] = []
        if hasattr(did, "chunk_iter"):
            did.chunk_iter(lambda c: found.append((c.chunk_offset[0], c.byte_offset, c.size, c.filter_mask)))
        else:  # pragma: no cover - HDF5 < 1.12.3
            for k in range(n_expected):
                c = did.get_chunk_info(k)
                found.append((c.chunk_offset[0], c.byte_offset, c.size, c.filter_mask))
        found.sort()
        segments: list[Segment] = []
        for k, (row, offset, size, mask) in enumerate(found):
            if row != k * chunk or offset is None or size != chunk * row_bytes or mask != 0:
                return None
            rows = min(chunk, info.rows - row)
            last = segments[-1] if segments else None
            if last is not None and last.offset + last.rows * row_bytes == offset:
                segments[-1] = Segment(self._pinned, last.offset, last.rows + rows)
            else:
                segments.append(Segment(self._pinned, int(offset), rows))
        return segments

    # -- data --------------------------------------------------------------------------------------------------
    def read_array(
        self, layer: int, start: int = 0, stop: int | None = None, out: np.ndarray | None = None
    ) -> np.ndarray:
        import numpy as np

        info = self.layers[layer]
        stop = info.rows if stop is None else min(stop, info.rows)
        start = max(0, start)
        store = self._rows(layer)
        if store is not None:
            return store.read(start, stop, out)
        n = max(0, stop - start)
        out = scratch(out, n, info.hidden_dim, stored_dtype(info.dtype))
        if n and not self._inflate_rows(layer, start, stop, out):
            self._guard_inflation(layer, start, stop)
            with _plugin_hint(self.location, info.name):
                self._dataset(layer).read_direct(out, source_sel=np.s_[start:stop])
        return out

    def _guard_inflation(self, layer: int, start: int, stop: int) -> None:
        """Before HDF5's own filter pipeline decodes rows ``start:stop`` of a deflate-filtered layer in a layout
        :meth:`_inflate_rows` does not decode itself, inflate each of their chunks with a maximum output of its
        declared size: a chunk that would inflate beyond it (a decompression bomb) is a FormatError, never an
        allocation HDF5 would make.  Pipelines with other filters than shuffle, deflate and fletcher32 are left
        to HDF5."""
        dset = self._dataset(layer)
        if dset.chunks is None or stop <= start:
            return
        plist = dset.id.get_create_plist()
        ids = [plist.get_filter(k)[0] for k in range(plist.get_nfilters())]
        if H5Z_DEFLATE not in ids or not set(ids) <= {H5Z_DEFLATE, H5Z_SHUFFLE, H5Z_FLETCHER32}:
            return
        try:
            from isal import isal_zlib
        except ImportError:  # pragma: no cover - isal is a dependency
            return
        inflate_error = cast("type[Exception]", isal_zlib.error)  # the stubs declare the class as an instance
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
                except inflate_error:
                    continue  # HDF5's own filter reports it
                if len(data) > limit or inflater.unconsumed_tail:
                    raise FormatError(
                        f"{self.location}: {self.layers[layer].name}: the chunk at row {row}, column {col} cannot "
                        f"be decoded: it inflates to more than the {limit} bytes of its declared chunk shape; the "
                        f"file is damaged: re-create it."
                    )

    def _inflate_plan(self, pos: int) -> tuple[int, int] | None:
        """``(chunk rows, shuffle item size or 0)`` when layer ``pos`` is stored in whole-row chunks filtered by
        deflate alone or shuffle then deflate (how actfmt writes gzip), which :meth:`_inflate_rows` decodes
        itself; ``None`` for every other layout or filter pipeline."""
        if pos not in self._deflate:
            plan = None
            info = self.layers[pos]
            dset = self._dataset(pos)
            if dset.chunks is not None and dset.chunks[1] == info.hidden_dim and info.hidden_dim:
                plist = dset.id.get_create_plist()
                ids = [plist.get_filter(k)[0] for k in range(plist.get_nfilters())]
                stored = dset.dtype == stored_dtype(info.dtype)
                if stored and ids in ([H5Z_DEFLATE], [H5Z_SHUFFLE, H5Z_DEFLATE]):
                    plan = (int(dset.chunks[0]), dset.dtype.itemsize if ids[0] == H5Z_SHUFFLE else 0)
            self._deflate[pos] = plan
        return self._deflate[pos]

    def _inflate_rows(self, layer: int, start: int, stop: int, out: np.ndarray) -> bool:
        """Rows ``start:stop`` of a gzip layer into ``out``, chunk by chunk as stored (``read_direct_chunk``),
        inflated with ISA-L and unshuffled here, on two threads and outside h5py's global lock (so a conversion's
        verification no longer stalls its writer): faster than HDF5's own zlib filter.  ``False`` (nothing
        promised in ``out``) when the layer is not such a layer, or a chunk is missing or filtered otherwise:
        HDF5's own pipeline then reads it.  A chunk that does not inflate to a whole chunk is a FormatError."""
        import numpy as np

        plan = self._inflate_plan(layer)
        if plan is None:
            return False
        try:
            from isal import isal_zlib
        except ImportError:  # pragma: no cover - isal is a dependency
            return False
        inflate_error = cast("type[Exception]", isal_zlib.error)  # the stubs declare the class as an instance
        chunk, shuffle = plan
        hidden = self.layers[layer].hidden_dim
        itemsize = out.dtype.itemsize
        chunk_bytes = chunk * hidden * itemsize
        did = self._dataset(layer).id
        flat = out.reshape(-1).view(np.uint8)
        try:
            raws = []
            for row in range(start - start % chunk, stop, chunk):
                mask, raw = did.read_direct_chunk((row, 0))
                if mask:
                    return False
                raws.append((row, raw))
        except (KeyError, OSError, ValueError):
            return False

        def one(item: tuple[int, bytes]) -> bool:
            row, raw = item
            try:
                # bounded by the declared chunk size: never more than one byte beyond it is inflated
                inflater = isal_zlib.decompressobj()
                data = inflater.decompress(raw, chunk_bytes + 1)
            except inflate_error as exc:
                problem = f"it does not inflate ({exc})"
            else:
                if len(data) > chunk_bytes or inflater.unconsumed_tail:
                    problem = f"it inflates to more than the {chunk_bytes} bytes of its declared chunk shape"
                elif len(data) != chunk_bytes:
                    problem = f"it inflates to {len(data)} bytes, not {chunk_bytes}"
                else:
                    problem = ""
            if problem:
                raise FormatError(
                    f"{self.location}: {self.layers[layer].name}: the chunk of rows {row}-{row + chunk - 1} cannot "
                    f"be decoded: {problem}; the file is damaged: re-create it."
                )
            lo, hi = max(row, start), min(row + chunk, stop)
            e0, e1 = (lo - row) * hidden, (hi - row) * hidden  # elements of this chunk wanted
            dst = flat[(lo - start) * hidden * itemsize : (hi - start) * hidden * itemsize]
            src = np.frombuffer(data, dtype=np.uint8)
            if shuffle:  # byte k of every element lies together: put each element's bytes back in order
                _unshuffle(src.reshape(itemsize, chunk * hidden)[:, e0:e1], dst)
            else:
                dst[:] = src[e0 * itemsize : e1 * itemsize]
            return True

        if len(raws) == 1:
            return one(raws[0])
        return all(read_pool().map(one, raws))

    def example_arrays(self, row: int) -> list[np.ndarray]:
        stores = [self._rows(pos) for pos in range(len(self.layers))]
        if all(s is not None for s in stores):  # every layer stored raw: one batch of reads
            return row_across([s for s in stores if s is not None], row)
        return super().example_arrays(row)

    def take_array(self, layer: int, rows: Any) -> np.ndarray:
        """Rows at any indices (any order, repeats allowed): by byte offset when the layer is stored raw,
        otherwise each touched chunk is read once, as one contiguous run."""
        import numpy as np

        info = self.layers[layer]
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if rows.size and (rows.min() < 0 or rows.max() >= info.rows):
            raise IndexError(f"row index out of range for {info.rows} rows of {info.name}")
        store = self._rows(layer)
        if store is not None:
            return store.take(rows)
        got_dtype = stored_dtype(info.dtype)
        if rows.size == 0:
            return np.empty((0, info.hidden_dim), dtype=got_dtype)
        uniq, inverse = np.unique(rows, return_inverse=True)
        dset = self._dataset(layer)
        got = np.empty((uniq.size, info.hidden_dim), dtype=got_dtype)
        chunk = int(dset.chunks[0]) if dset.chunks else info.rows
        which = uniq // chunk
        cuts = np.flatnonzero(np.diff(which)) + 1
        with _plugin_hint(self.location, info.name):
            for lo_i, hi_i in zip(np.r_[0, cuts], np.r_[cuts, uniq.size], strict=True):
                sel = uniq[lo_i:hi_i]
                lo, hi = int(sel[0]), int(sel[-1]) + 1
                self._guard_inflation(layer, lo, hi)
                if hi - lo == sel.size:
                    dset.read_direct(got, source_sel=np.s_[lo:hi], dest_sel=np.s_[lo_i:hi_i])
                else:
                    run = np.empty((hi - lo, info.hidden_dim), dtype=got.dtype)
                    dset.read_direct(run, source_sel=np.s_[lo:hi])
                    got[lo_i:hi_i] = run[sel - lo]
        if uniq.size == rows.size and np.array_equal(uniq, rows):
            return got
        return got[inverse.reshape(-1)]

    def runs(self, layer: int, start: int, stop: int) -> list[ByteRun] | None:
        store = self._rows(layer)
        return None if store is None else store.runs(start, stop)

    def own_bytes(self, layer: int) -> Iterator[memoryview] | None:
        store = self._rows(layer)
        return None if store is None or not self.location.supports_mmap else store.mapped()

    def missing_chunks(self, layer: int) -> list[str]:
        """Chunks of a chunked layer that were never written, as ``"layer_03/chunk 12 (rows 6144-6655)"``.

        Those would read back as the fill value (zeros) silently.
        """
        info = self.layers[layer]
        dset = self._dataset(layer)
        if dset.chunks is None or info.rows == 0:
            return []
        chunk = int(dset.chunks[0])
        n_expected = -(-info.rows // chunk)
        did = dset.id
        n_have = did.get_num_chunks()  # what the file holds (bounded by its size), never what is declared
        if n_have >= n_expected:
            return MissingChunks()
        have = {int(did.get_chunk_info(k).chunk_offset[0]) // chunk for k in range(n_have)}
        total = n_expected - len({k for k in have if k < n_expected})
        shown: list[str] = []
        k = 0
        while len(shown) < min(total, MAX_SHOWN_MISSING):  # at most n_have + MAX_SHOWN_MISSING steps
            if k not in have:
                shown.append(
                    f"{info.name}/chunk {k} (rows {k * chunk}-{min((k + 1) * chunk, info.rows) - 1})"
                )
            k += 1
        return MissingChunks(shown, total)

    def close(self) -> None:
        self._dsets.clear()
        file, fh = self._file, self._fh
        self._file = self._fh = None
        try:
            if file is not None:
                file.close()
        finally:
            if fh is not None:
                fh.close()


class _plugin_hint:
    """Turn HDF5's "filter not available" read errors into an actionable message."""

    def __init__(self, where: Location, name: str) -> None:
        self.where, self.name = where, name

    def __enter__(self) -> None:
        return None

    def __exit__(self, typ: Any, exc: BaseException | None, tb: Any) -> None:
        # the filter ran and failed: the chunk is damaged (a filter that is missing says "not registered" or so)
        if isinstance(exc, OSError) and "filter returned failure" in str(exc).lower():
            raise FormatError(
                f"{self.where}: {self.name}: a chunk cannot be decoded ({_first_line(exc)}); the file is "
                f"damaged: re-create it."
            ) from None
        if isinstance(exc, OSError) and "filter" in str(exc).lower():
            raise ConversionError(
                f"{self.where}: {self.name} is compressed with an HDF5 filter that is not available "
                f"({_first_line(exc)}); {_PIP_HINT}."
            ) from None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


# ----------------------------------------------------------------------------------------------------------
# the format


class HDF5Format(Format):
    reader = HDF5Reader
    writer = HDF5Writer
    name = "hdf5"
    suffixes = REMOTE_SUFFIXES  # (".h5", ".hdf5"): .h5 written
    compressions = COMPRESSIONS
    remote_read = True
    remote_write = False  # convert writes into a local staging directory and uploads the file
    parallel_layers = False  # chunked: HDF5 is the one writer of the file
    single_file = True

    @classmethod
    def writes_in_parallel(cls, options: WriteOptions) -> bool:
        """Contiguous (uncompressed) layers are written at their own offsets, by any number of writers."""
        return HDF5Writer.contiguous(options)

    looks_like = "a .h5 file"

    @classmethod
    def recognises(cls, location: Location, entries: Sequence[Entry] | None) -> bool:
        """A regular file with the HDF5 signature (at 0, or after a user block).  Locally the name does not
        matter; on object storage only ``*.h5`` / ``*.hdf5`` objects are probed (one ranged read each)."""
        if entries is not None:  # a listed directory is not a file
            return False
        if not location.is_local and location.suffix.lower() not in REMOTE_SUFFIXES:
            return False
        try:
            head = location.read_range(0, SIGNATURE_OFFSETS[-1] + len(HDF5_SIGNATURE))
        except OSError:  # missing, a directory, a FIFO (never opened), unreadable
            return False
        return any(head[o : o + len(HDF5_SIGNATURE)] == HDF5_SIGNATURE for o in SIGNATURE_OFFSETS)
