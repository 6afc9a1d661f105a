"""One split as one HDF5 file (``EM`` -> ``EM.h5``), written and read with h5py.

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
  ``actfmt_dtype`` (``"bfloat16"``, ...) and, when the source was sharded, ``actfmt_shard_rows``.

Defaults:

* ``chunk_rows``: the largest power of two with a chunk of at most 1 MiB (256 rows at 4096 x bf16, 2048 rows at
  384 x bf16), capped at the layer's rows.  1 MiB (the low end of 1-4 MiB) keeps single-row reads from a
  compressed file cheap; deflate's 32 KiB window makes the ratio insensitive to the chunk size.
* compression ``gzip`` level 1 with the shuffle filter, chosen on the real sample
  (``real-minilm-bf16``, 12 layers 600 x 384 bf16, 5.5 MB; h5py write / read MB/s, one core)::

      none        1.00x  1059 / 2017      gzip1+shuf  1.38x    62 / 350   <- default
      gzip1       1.23x    45 /  194      gzip2+shuf  1.38x    59 / 349
      gzip2       1.23x    41 /  189      gzip3+shuf  1.40x    47 / 393
      gzip4       1.25x    27 /  214      gzip4+shuf  1.40x    48 / 376
      gzip6       1.25x    16 /  210      gzip6+shuf  1.42x    16 / 367
      lzf         1.00x   142 /  399      lzf+shuf    1.20x   173 / 432
      plugins:  zstd3 1.26x 522/872, blosc-zstd3+shuffle 1.34x 160/677, lz4 0.99x 702/2609

  Shuffle is what matters on bf16 (the exponent bytes compress, the mantissa bytes hardly); higher gzip levels
  add 1-3 % for 1.3-4x the time.  The writer deflates + shuffles whole chunks itself on a thread pool (zlib
  releases the GIL) and stores them with ``write_direct_chunk``, so both cores compress.

Speed: uncompressed and gzip blocks are written as whole chunks with ``write_direct_chunk`` (no copy, no chunk
cache); ``block_rows`` hands out chunk-aligned blocks of about 48 MiB.  The reader reads into preallocated arrays
with ``read_direct``; uncompressed datasets get no chunk cache (HDF5 then reads just the selected rows straight
from the file), compressed ones a 64 MiB cache.  HDF5 files cannot be written by two processes at once:
``parallel_layers = False``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from actfmt.errors import ConversionError, FormatError, MetadataError, NotASplitError
from actfmt.formats.base import (
    ACTFMT_KEY,
    Format,
    LayerInfo,
    Reader,
    SplitSpec,
    WriteOptions,
    Writer,
    storage_numpy_dtype,
    torch_dtype,
)
from actfmt.layout import SUPPORTED_DTYPES, layer_index

if TYPE_CHECKING:  # pragma: no cover
    import h5py
    import numpy as np
    import torch

__all__ = ["HDF5_SIGNATURE", "HDF5Format", "HDF5Reader", "HDF5Writer", "default_chunk_rows"]

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
#: Root attribute holding the producer's metadata as one exact JSON document.
METADATA_ATTR = "actfmt_metadata"
#: Dataset attributes.
DTYPE_ATTR = "actfmt_dtype"
SHARD_ROWS_ATTR = "actfmt_shard_rows"
RESERVED_ATTRS = (ACTFMT_KEY, METADATA_ATTR)
H5Z_DEFLATE, H5Z_SHUFFLE, H5Z_LZF = 1, 2, 32000

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


def _import_hdf5plugin(path: Path | str, what: str) -> Any:
    try:
        import hdf5plugin
    except ImportError:
        raise ConversionError(f"{path}: {what} needs the hdf5plugin package; {_PIP_HINT}.") from None
    return hdf5plugin


def _jsonable(value: Any) -> bool:
    return value is None or isinstance(value, (list, dict, tuple))


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


class _Codec:
    """A resolved compression choice: h5py dataset keywords and, when actfmt encodes chunks itself, how."""

    def __init__(self, name: str, level: int | None, shuffle: bool, path: Path) -> None:
        self.name, self.level, self.shuffle = name, level, shuffle
        self.requires_plugins: list[str] = []
        self.kwargs: dict[str, Any] = {}
        if name == "gzip":
            self.kwargs = {"compression": "gzip", "compression_opts": level, "shuffle": shuffle}
        elif name == "lzf":
            self.kwargs = {"compression": "lzf", "shuffle": shuffle}
            self.requires_plugins = ["lzf"]
        elif name in PLUGIN_CODECS:
            hp = _import_hdf5plugin(path, f"compression {name!r}")
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
    def resolve(cls, options: WriteOptions, path: Path) -> _Codec:
        name = (options.compression or COMPRESSIONS[0]).lower()
        if name not in COMPRESSIONS:
            raise ConversionError(
                f"{path}: the hdf5 format has no compression {options.compression!r}; "
                f"choose one of: {', '.join(COMPRESSIONS)}."
            )
        level = options.level
        if level is not None and name not in LEVEL_RANGE:
            raise ConversionError(f"{path}: compression {name!r} takes no --level (got {level}).")
        if level is None:
            level = DEFAULT_LEVEL.get(name)
        elif not LEVEL_RANGE[name][0] <= level <= LEVEL_RANGE[name][1]:
            lo, hi = LEVEL_RANGE[name]
            raise ConversionError(f"{path}: --level {level} is out of range for {name!r} ({lo}..{hi}).")
        shuffle = bool(options.extra.get("shuffle", name in ("gzip", "lzf", "blosc-zstd")))
        if name == "none":
            shuffle = False
        return cls(name, level, shuffle, path)

    @classmethod
    def of_dataset(cls, dset: h5py.Dataset, path: Path) -> _Codec:
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


def _encode_gzip(raw: np.ndarray, itemsize: int, shuffle: bool, level: int) -> bytes:
    """One chunk exactly as HDF5's shuffle + deflate filters store it."""
    import zlib

    buf: Any = raw.reshape(-1).view("u1")
    if shuffle and itemsize > 1:
        buf = buf.reshape(-1, itemsize).T.copy()  # byte 0 of every element, then byte 1, ...
    return zlib.compress(memoryview(buf), level)


class HDF5Writer(Writer):
    """Writes every layer of a split into one HDF5 file, whole chunks at a time."""

    format = "hdf5"
    parallel_layers = False

    def __init__(self, path: str | Path, spec: SplitSpec, options: WriteOptions) -> None:
        super().__init__(path, spec, options)
        self._file: h5py.File | None = None
        self._pool: Any = None
        self._codecs: dict[int, _Codec] = {}
        self._requested = _Codec.resolve(options, self.path)

    # pickling (a writer may be sent to a worker process): never ship the open h5py handle or the pool
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_file=None, _pool=None, _codecs={})
        return state

    def chunk_rows(self, layer: int) -> int:
        info = self.spec.layers[layer]
        if self.options.chunk_rows:
            return max(1, min(int(self.options.chunk_rows), max(1, info.rows)))
        return default_chunk_rows(info.rows, info.hidden_dim, info.itemsize)

    @classmethod
    def create(cls, path: str | Path, spec: SplitSpec, options: WriteOptions) -> HDF5Writer:
        import h5py
        import numpy as np

        self = cls(path, spec, options)
        codec = self._requested
        if self.path.exists():
            raise ConversionError(f"{self.path}: already exists; the writer only creates new files.")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with h5py.File(self.path, "w", track_order=True) as f:
            meta = {k: v for k, v in spec.metadata.items() if k not in RESERVED_ATTRS}
            for key, value in meta.items():
                f.attrs[key] = _attr_value(value)
            f.attrs[METADATA_ATTR] = json.dumps(meta, ensure_ascii=False, allow_nan=True)
            for pos, info in enumerate(spec.layers):
                if info.dtype not in SUPPORTED_DTYPES:
                    raise ConversionError(
                        f"{self.path}: {info.name} has dtype {info.dtype}; hdf5 stores only "
                        f"{', '.join(SUPPORTED_DTYPES)} (use --dtype to cast)."
                    )
                rows = max(0, info.rows)
                dset = f.create_dataset(
                    info.name,
                    shape=(rows, info.hidden_dim),
                    maxshape=(None if rows == 0 else rows, info.hidden_dim),
                    dtype=storage_numpy_dtype(info.dtype),
                    chunks=(self.chunk_rows(pos), max(1, info.hidden_dim)),
                    fillvalue=0,
                    **codec.kwargs,
                )
                dset.attrs[DTYPE_ATTR] = info.dtype
                if info.shard_rows:
                    dset.attrs[SHARD_ROWS_ATTR] = np.asarray(info.shard_rows, dtype=np.int64)
        return self

    # -- file handle ---------------------------------------------------------------------------------------
    def _f(self) -> h5py.File:
        if self._file is None:
            import h5py

            try:
                self._file = h5py.File(self.path, "r+")
            except FileNotFoundError:
                raise ConversionError(f"{self.path}: not found; create() the file before writing.") from None
        return self._file

    def _dataset(self, layer: int) -> tuple[h5py.Dataset, _Codec]:
        info = self.spec.layers[layer]
        f = self._f()
        if info.name not in f:
            raise ConversionError(f"{self.path}: dataset {info.name} is missing; re-create the file.")
        dset = f[info.name]
        if layer not in self._codecs:
            self._codecs[layer] = _Codec.of_dataset(dset, self.path)
            if "hdf5plugin" in self._codecs[layer].requires_plugins:
                _import_hdf5plugin(self.path, f"{info.name} (compressed with a plugin filter)")
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
    def write(self, layer: int, start: int, data: torch.Tensor) -> None:
        import numpy as np

        info = self.spec.layers[layer]
        n = int(data.shape[0]) if data.dim() else 0
        if n == 0:
            return
        if data.dim() != 2 or data.shape[1] != info.hidden_dim:
            raise ConversionError(
                f"{self.path}: {info.name}: block of shape {tuple(data.shape)} does not fit "
                f"[{info.rows}, {info.hidden_dim}]."
            )
        if str(data.dtype).removeprefix("torch.") != info.dtype:
            raise ConversionError(f"{self.path}: {info.name}: got {data.dtype}, the layer is {info.dtype}.")
        if start < 0 or start + n > info.rows:
            raise ConversionError(
                f"{self.path}: {info.name}: rows {start}..{start + n} outside 0..{info.rows}."
            )
        arr = _to_numpy(data)
        dset, codec = self._dataset(layer)
        chunk = int(dset.chunks[0])
        if not codec.direct or start % chunk:
            dset.write_direct(arr, dest_sel=np.s_[start : start + n])
            return
        # whole chunks, written as stored (no HDF5 copy, no chunk cache); the last may be padded
        starts = range(start, start + n, chunk)
        pieces = [arr[s - start : min(s - start + chunk, n)] for s in starts]
        if pieces[-1].shape[0] != chunk and starts[-1] + pieces[-1].shape[0] != info.rows:
            # a block ending mid-chunk inside the layer: let HDF5 merge it
            dset.write_direct(arr, dest_sel=np.s_[start : start + n])
            return
        if pieces[-1].shape[0] != chunk:
            pad = np.zeros((chunk, info.hidden_dim), dtype=arr.dtype)
            pad[: pieces[-1].shape[0]] = pieces[-1]
            pieces[-1] = pad
        if codec.name == "none":
            encoded: Sequence[Any] = pieces
        else:
            itemsize, shuffle, level = arr.dtype.itemsize, codec.shuffle, int(codec.level or 0)
            encoded = list(self._executor().map(lambda p: _encode_gzip(p, itemsize, shuffle, level), pieces))
        for s, buf in zip(starts, encoded, strict=True):
            dset.id.write_direct_chunk((s, 0), buf)

    def _executor(self) -> Any:
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            workers = int(self.options.extra.get("threads") or min(4, os.cpu_count() or 1))
            self._pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="actfmt-h5")
        return self._pool

    def finish_layer(self, layer: int) -> None:
        # make everything so far durable in the file's own metadata: a killed run resumes layer by layer
        if self._file is not None:
            self._file.flush()

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
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        if self._file is not None:
            self._file.close()
            self._file = None
        self._codecs.clear()


def _to_numpy(data: torch.Tensor) -> np.ndarray:
    """The tensor's storage bits as a C-contiguous numpy array (bfloat16 -> ``<u2``), without a copy."""
    import torch

    t = data.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view("<u2")
    return t.numpy()


class HDF5Reader(Reader):
    """A split stored as one HDF5 file."""

    format = "hdf5"

    def __init__(self, path: str | Path) -> None:
        super().__init__(path)
        if not self.path.is_file():
            raise NotASplitError(f"{self.path}: no such file; an hdf5 split is one .h5 file.")
        self._file: h5py.File | None = None
        self._dsets: dict[int, h5py.Dataset] = {}
        self._maps: dict[int, np.ndarray | None] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_file=None, _dsets={}, _maps={})
        return state

    @property
    def file(self) -> h5py.File:
        """The open h5py File (read-only)."""
        if self._file is None:
            import h5py

            try:
                self._file = h5py.File(self.path, "r")
            except OSError as exc:
                raise FormatError(
                    f"{self.path}: cannot be opened as HDF5 ({_first_line(exc)}); the file is damaged or "
                    f"still being written: re-create it."
                ) from None
            block = self._block()
            if block and "hdf5plugin" in (block.get("requires_plugins") or []):
                _import_hdf5plugin(self.path, "this file (compressed with a plugin codec)")
        return self._file

    def _block(self) -> dict[str, Any] | None:
        f = self._file
        if f is None or ACTFMT_KEY not in f.attrs:
            return None
        raw = f.attrs[ACTFMT_KEY]
        try:
            data = json.loads(raw.decode() if isinstance(raw, bytes) else raw)
        except (TypeError, ValueError, UnicodeDecodeError):
            return None
        return data if isinstance(data, dict) else None

    @cached_property
    def metadata(self) -> dict[str, Any]:
        attrs = self.file.attrs
        if METADATA_ATTR in attrs:
            raw = attrs[METADATA_ATTR]
            try:
                data = json.loads(raw.decode() if isinstance(raw, bytes) else raw)
            except (TypeError, ValueError, UnicodeDecodeError) as exc:
                raise MetadataError(
                    f"{self.path}: attribute {METADATA_ATTR} is not valid JSON ({exc})."
                ) from None
            if not isinstance(data, dict):
                raise MetadataError(f"{self.path}: attribute {METADATA_ATTR} must hold a JSON object.")
            return data
        return {k: _from_attr(attrs[k]) for k in attrs if k not in RESERVED_ATTRS}

    @property
    def actfmt(self) -> dict[str, Any] | None:
        self.file  # noqa: B018 - opens it
        return self._block()

    @cached_property
    def _names(self) -> list[tuple[int, str]]:
        out = []
        for name, obj in self.file.items():
            i = layer_index(name)
            if i is not None and getattr(obj, "ndim", None) is not None:
                out.append((i, name))
        return sorted(out)

    @cached_property
    def layers(self) -> Sequence[LayerInfo]:
        out = []
        for pos, (i, name) in enumerate(self._names):
            dset = self._dataset(pos)
            if dset.ndim != 2:
                raise FormatError(f"{self.path}: dataset {name} must be 2-D, got shape {dset.shape}.")
            shard_rows = dset.attrs.get(SHARD_ROWS_ATTR)
            out.append(
                LayerInfo(
                    name=name,
                    index=i,
                    rows=int(dset.shape[0]),
                    hidden_dim=int(dset.shape[1]),
                    dtype=self._dtype_name(dset, name),
                    shard_rows=tuple(int(x) for x in shard_rows) if shard_rows is not None else None,
                )
            )
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

    def _dtype_name(self, dset: h5py.Dataset, name: str) -> str:
        raw = dset.attrs.get(DTYPE_ATTR)
        if isinstance(raw, bytes):
            raw = raw.decode()
        if raw is not None:
            if raw not in SUPPORTED_DTYPES or dset.dtype.itemsize != (4 if raw == "float32" else 2):
                raise FormatError(f"{self.path}: {name} has {DTYPE_ATTR}={raw!r} on {dset.dtype} data.")
            return str(raw)
        kind = {("f", 2): "float16", ("f", 4): "float32"}.get((dset.dtype.kind, dset.dtype.itemsize))
        if kind is None:
            raise FormatError(
                f"{self.path}: {name} holds {dset.dtype} without an {DTYPE_ATTR} attribute; "
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

    def _torch(self, arr: np.ndarray, dtype: str) -> torch.Tensor:
        import torch

        t = torch.from_numpy(arr)
        return t.view(torch.bfloat16) if dtype == "bfloat16" else t

    def read(self, layer: int, start: int = 0, stop: int | None = None) -> torch.Tensor:
        import numpy as np

        info = self.layers[layer]
        dset = self._dataset(layer)
        stop = info.rows if stop is None else min(stop, info.rows)
        start = max(0, start)
        n = max(0, stop - start)
        out = np.empty((n, info.hidden_dim), dtype=storage_numpy_dtype(info.dtype))
        if n:
            with _plugin_hint(self.path, info.name):
                dset.read_direct(out, source_sel=np.s_[start:stop])
        return self._torch(out, info.dtype)

    def take(self, layer: int, rows: Any) -> torch.Tensor:
        """Rows at any indices (any order, repeats allowed).

        Uncompressed layers whose chunks lie back to back in the file (what the writer produces) are gathered
        from a memory map of those bytes; otherwise each touched chunk is read once, as one contiguous run.
        """
        import numpy as np
        import torch

        info = self.layers[layer]
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if rows.size == 0:
            return torch.empty((0, info.hidden_dim), dtype=torch_dtype(info.dtype))
        if rows.min() < 0 or rows.max() >= info.rows:
            raise IndexError(f"row index out of range for {info.rows} rows of {info.name}")
        mapped = self._mapped(layer)
        if mapped is not None:
            return self._torch(np.asarray(mapped[rows]), info.dtype)  # fancy indexing copies: an owned array
        uniq, inverse = np.unique(rows, return_inverse=True)
        dset = self._dataset(layer)
        got = np.empty((uniq.size, info.hidden_dim), dtype=storage_numpy_dtype(info.dtype))
        chunk = int(dset.chunks[0]) if dset.chunks else info.rows
        which = uniq // chunk
        cuts = np.flatnonzero(np.diff(which)) + 1
        with _plugin_hint(self.path, info.name):
            for lo_i, hi_i in zip(np.r_[0, cuts], np.r_[cuts, uniq.size], strict=True):
                sel = uniq[lo_i:hi_i]
                lo, hi = int(sel[0]), int(sel[-1]) + 1
                if hi - lo == sel.size:
                    dset.read_direct(got, source_sel=np.s_[lo:hi], dest_sel=np.s_[lo_i:hi_i])
                else:
                    run = np.empty((hi - lo, info.hidden_dim), dtype=got.dtype)
                    dset.read_direct(run, source_sel=np.s_[lo:hi])
                    got[lo_i:hi_i] = run[sel - lo]
        out = got if uniq.size == rows.size and np.array_equal(uniq, rows) else got[inverse]
        return self._torch(np.ascontiguousarray(out), info.dtype)

    def _mapped(self, layer: int) -> np.ndarray | None:
        """A copy-on-write memory map of an uncompressed layer stored as one contiguous byte run, else None."""
        if layer in self._maps:
            return self._maps[layer]
        import numpy as np

        info = self.layers[layer]
        dset = self._dataset(layer)
        view = None
        if dset.chunks is not None and info.rows > 0 and dset.id.get_create_plist().get_nfilters() == 0:
            chunk = int(dset.chunks[0])
            chunk_bytes = chunk * info.hidden_dim * dset.dtype.itemsize
            n_expected = -(-info.rows // chunk)
            found: list[tuple[int, int, int, int]] = []
            if dset.id.get_num_chunks() == n_expected:
                dset.id.chunk_iter(
                    lambda c: found.append((c.chunk_offset[0] // chunk, c.byte_offset, c.size, c.filter_mask))
                )
            found.sort()
            if found and found[0][1] is not None:
                base = found[0][1]
                if (
                    all(
                        k == i and off == base + i * chunk_bytes and size == chunk_bytes and mask == 0
                        for i, (k, off, size, mask) in enumerate(found)
                    )
                    and len(found) == n_expected
                ):
                    mm = np.memmap(
                        self.path,
                        dtype=dset.dtype,
                        mode="c",
                        offset=base,
                        shape=(n_expected * chunk, info.hidden_dim),
                    )
                    view = mm[: info.rows]
        self._maps[layer] = view
        return view

    def missing_chunks(self, layer_pos: int) -> list[str]:
        """Chunks of a chunked layer that were never written, as ``"layer_03/chunk 12 (rows 6144-6655)"``.

        Those would read back as the fill value (zeros) silently.
        """
        info = self.layers[layer_pos]
        dset = self._dataset(layer_pos)
        if dset.chunks is None or info.rows == 0:
            return []
        chunk = int(dset.chunks[0])
        n_expected = -(-info.rows // chunk)
        did = dset.id
        n_have = did.get_num_chunks()
        if n_have >= n_expected:
            return []
        have = {int(did.get_chunk_info(k).chunk_offset[0]) // chunk for k in range(n_have)}
        return [
            f"{info.name}/chunk {k} (rows {k * chunk}-{min((k + 1) * chunk, info.rows) - 1})"
            for k in range(n_expected)
            if k not in have
        ]

    def close(self) -> None:
        self._dsets.clear()
        self._maps.clear()
        if self._file is not None:
            try:
                self._file.close()
            finally:
                self._file = None


class _plugin_hint:
    """Turn HDF5's "filter not available" read errors into an actionable message."""

    def __init__(self, path: Path, name: str) -> None:
        self.path, self.name = path, name

    def __enter__(self) -> None:
        return None

    def __exit__(self, typ: Any, exc: BaseException | None, tb: Any) -> None:
        if isinstance(exc, OSError) and "filter" in str(exc).lower():
            raise ConversionError(
                f"{self.path}: {self.name} is compressed with an HDF5 filter that is not available "
                f"({_first_line(exc)}); {_PIP_HINT}."
            ) from None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


class HDF5Format(Format):
    name = "hdf5"
    suffix = ".h5"
    compressions = COMPRESSIONS

    @classmethod
    def can_open(cls, path: Path) -> bool:
        """A regular file with the HDF5 signature (at 0, or after a user block); the name does not matter."""
        try:
            if not path.is_file():
                return False
            with open(path, "rb") as fh:
                for offset in (0, 512, 1024, 2048):
                    fh.seek(offset)
                    if fh.read(8) == HDF5_SIGNATURE:
                        return True
        except OSError:
            return False
        return False

    @classmethod
    def open_reader(cls, path: str | Path) -> HDF5Reader:
        from actfmt.remote import refuse_remote

        refuse_remote(path, "hdf5")
        return HDF5Reader(path)

    @classmethod
    def writer_class(cls) -> type[Writer]:
        return HDF5Writer
