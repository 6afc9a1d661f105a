"""One split as one Zarr group (``EM`` -> ``EM.zarr``): Zarr v3 by default, v2 on request.

Layout (the contract, readable by zarr-python, tensorstore and any Zarr v2/v3 reader):

* Group attributes: every key of the producer's metadata, verbatim and in order, then the ``actfmt`` block,
  written by ``finalize`` last (it holds ``complete: true``; until then the group has no ``actfmt`` key).
* Arrays ``layer_00`` ... of shape ``[total_examples, hidden_dim]``, chunks ``(chunk_rows, hidden_dim)`` (the
  full hidden dimension in every chunk), default chunk key encoding (v3 ``c/<i>/0``, v2 ``<i>.0``), fill value 0,
  C order.  float16 / float32 are stored natively little-endian; bfloat16 as its ``uint16`` bits.  Every array
  carries the attribute ``actfmt_dtype`` (``"bfloat16"``, ...) and, when the source was sharded,
  ``actfmt_shard_rows``; the actfmt block repeats both (``dtype``, ``shard_rows``).
* Only standard codecs: v3 ``bytes`` (little) + ``blosc`` / ``zstd`` / ``gzip``; v2 the same numcodecs ids.

Compression names: ``none``, ``blosc-zstd`` (default), ``zstd``, ``lz4`` (blosc-lz4 + bitshuffle: neither
Zarr v3 nor tensorstore's v2 has a plain lz4), ``gzip``.  ``level`` overrides the level.

Default = blosc, zstd level 1, **byte** shuffle, 512 KiB blosc blocks.  Measured on the real sample
(``real-minilm-bf16``: 12 layers x 600 x 384 bf16, 5.5 MB, cut into ~2 MiB chunks) and on a heavy-tailed
synthetic bf16 layer (Student-t(3) x a log-normal scale per dim, 768 x 4096), one core, numcodecs 0.16,
ratio / compress MB/s / decompress MB/s::

                                       real                    heavy-tailed synthetic
      blosc zstd1 byte  bs 512K   1.476x  1140 / 3502        1.413x  2179 / 6358   <- default
      blosc zstd1 byte  bs auto   1.287x  1024 / 1546        1.227x  1525 / 1966
      blosc zstd1 byte  bs 256K   1.456x   944 / 3580        1.400x  1168 / 4079
      blosc zstd3 byte  bs 512K   1.442x   422 / 3198        1.367x   422 / 3652
      blosc zstd1 bit   bs auto   1.379x  1194 / 2836        1.016x  1405 / 1831
      blosc zstd1 bit   bs 512K   1.425x  1985 / 3268        1.182x  2565 / 3505
      blosc zstd3 bit   bs auto   1.413x  1054 / 4186        1.000x  3130 / 20181
      blosc lz4   bit   bs 512K   1.355x  3777 / 5825        1.141x  5029 / 8204   <- "lz4"
      zstd1 (plain)               1.274x  1300 / 1693        1.229x  1324 / 1660   <- "zstd"
      gzip1                       1.243x    51 /  210        1.201x    51 /  203   <- "gzip"

  Bitshuffle+zstd does well on the real sample (1.38-1.44x) but collapses on heavy-tailed or Gaussian data
  (1.00-1.25x: blosc stores many blocks raw), so byte shuffle is the robust choice; blosc's automatic block size
  (32 KiB at level 1) costs 13 %, 512 KiB blocks fix that; higher levels cost 2.5x the time for less.

Default ``chunk_rows``: the largest power of two whose chunk holds at most 2 MiB (256 rows at 4096 x bf16,
128 at 4096 x float32, 2048 at 384 x bf16), capped at the layer's rows.  2 MiB chunks write at ``cp`` speed and
hold four blosc blocks; random rows of an uncompressed store never read whole chunks (see below).

Speed: the writer does not go through zarr-python's codec pipeline per chunk.  ``create`` makes the group and
the arrays' metadata with zarr-python; ``write`` takes chunk-aligned blocks (``block_rows``: ~32 MiB of whole
chunks), encodes each chunk with the numcodecs codec the metadata names (nothing at all when uncompressed: the
tensor's memory is written as is) and writes the chunk file directly (edge chunks padded to the full chunk, as
Zarr requires).  Different layers may be written by different threads or processes at once.  The reader
likewise reads chunk files of a local store itself: uncompressed chunks with ``readinto`` / ``preadv`` straight
into the output tensor (random rows read just their rows), compressed chunks decoded straight into it on two
threads; stores with other codecs (sharding, transposes, filters) are read through zarr-python.  A missing chunk
reads as the fill value, as in every Zarr reader; :meth:`ZarrReader.missing_chunks` lists them (ACT601).

Measured (one 7049 x 4096 bf16 layer, 57.7 MB, page cache warm, 2 busy cores, best of 5-7): writing it
uncompressed 42 ms vs ``cp -r`` of its 88 ``.pt`` shards 42-54 ms (0.8-1.0x; zarr-python's ``arr[...] = x``
with the same chunks: 70 ms); the default codec 73 ms (790 MB/s, 2 threads).  Full-layer read: 6-8 ms
uncompressed, 14-15 ms default codec (zarr-python ``arr[:]``: 19-22 / 25 ms), vs 28-30 ms for the seed loader
(``torch.load`` of every shard + ``torch.cat``); 256 random rows: 1.0 ms uncompressed (``preadv`` of each row),
15-16 ms default codec (every 256-row chunk is touched and decoded), vs 12-13 ms the seed way.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
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
    import numpy as np
    import torch

__all__ = [
    "COMPRESSIONS",
    "ZarrFormat",
    "ZarrReader",
    "ZarrWriter",
    "default_chunk_rows",
]

#: Array attributes.
DTYPE_ATTR = "actfmt_dtype"
SHARD_ROWS_ATTR = "actfmt_shard_rows"

COMPRESSIONS = ("blosc-zstd", "none", "zstd", "lz4", "gzip")  # the first is the default
DEFAULT_LEVEL = {"blosc-zstd": 1, "zstd": 1, "lz4": 5, "gzip": 1}
LEVEL_RANGE = {"blosc-zstd": (0, 9), "zstd": (-131072, 22), "lz4": (0, 9), "gzip": (0, 9)}
BLOSC_BLOCKSIZE = 512 << 10
CHUNK_TARGET_BYTES = 2 << 20  # 2 MiB per chunk
BLOCK_TARGET_BYTES = 32 << 20  # ~32 MiB of whole chunks per write() block
READ_THREADS = 2  # decode threads of a reader (the machine target has 2 cores)
WRITE_THREADS = 2  # encode threads of a writer

_lock = threading.Lock()


def default_chunk_rows(rows: int, hidden_dim: int, itemsize: int) -> int:
    """The largest power of two whose chunk stays within 2 MiB, capped at ``rows`` (at least 1)."""
    row_bytes = max(1, hidden_dim * itemsize)
    n = 1 << (max(1, CHUNK_TARGET_BYTES // row_bytes).bit_length() - 1)
    return max(1, min(n, rows))


# ----------------------------------------------------------------------------------------------------------
# codecs


def _resolve_compression(
    path: Path | str, compression: str | None, level: int | None
) -> tuple[str, int | None]:
    name = COMPRESSIONS[0] if compression is None else compression.lower()
    if name not in COMPRESSIONS:
        raise ConversionError(
            f"{path}: the zarr format has no compression {compression!r}; choose one of {', '.join(COMPRESSIONS)}."
        )
    if name == "none":
        return name, None
    lvl = DEFAULT_LEVEL[name] if level is None else int(level)
    lo, hi = LEVEL_RANGE[name]
    if not lo <= lvl <= hi:
        raise ConversionError(f"{path}: --level {lvl} is out of range for {name} ({lo}..{hi}).")
    return name, lvl


def _numcodec(name: str, level: int | None, itemsize: int) -> Any:
    """The numcodecs codec that encodes a chunk for compression ``name`` (``None`` when uncompressed)."""
    from numcodecs import GZip, Zstd
    from numcodecs.blosc import Blosc

    if name == "none":
        return None
    if name == "blosc-zstd":
        return Blosc(
            cname="zstd", clevel=level, shuffle=Blosc.SHUFFLE, blocksize=BLOSC_BLOCKSIZE, typesize=itemsize
        )
    if name == "lz4":
        return Blosc(
            cname="lz4", clevel=level, shuffle=Blosc.BITSHUFFLE, blocksize=BLOSC_BLOCKSIZE, typesize=itemsize
        )
    if name == "zstd":
        return Zstd(level=level)
    if name == "gzip":
        return GZip(level=level)
    raise AssertionError(name)  # pragma: no cover


def _zarr_compressors(name: str, level: int | None, itemsize: int, zarr_format: int) -> Any:
    """``compressors=`` for ``create_array``: zarr v3 codec objects, or the numcodecs codec for v2."""
    codec = _numcodec(name, level, itemsize)
    if codec is None:
        return None
    if zarr_format == 2:
        return codec
    from zarr.codecs import BloscCodec, GzipCodec, ZstdCodec

    assert level is not None  # every compressed name has a level

    if name in ("blosc-zstd", "lz4"):
        return BloscCodec(
            cname="zstd" if name == "blosc-zstd" else "lz4",
            clevel=level,
            shuffle="shuffle" if name == "blosc-zstd" else "bitshuffle",
            typesize=itemsize,
            blocksize=BLOSC_BLOCKSIZE,
        )
    if name == "zstd":
        return ZstdCodec(level=level)
    return GzipCodec(level=level)


def _codec_from_config(cfg: dict[str, Any], zarr_format: int) -> Any:
    """The numcodecs codec for one stored compressor config, or ``None`` if actfmt does not decode it itself."""
    import numcodecs

    if zarr_format == 2:
        if cfg.get("id") in ("blosc", "zstd", "gzip", "zlib", "lz4"):
            return numcodecs.get_codec(dict(cfg))
        return None
    name, conf = cfg.get("name"), dict(cfg.get("configuration") or {})
    if name == "blosc":
        shuffle = {"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}.get(conf.get("shuffle", "noshuffle"), 0)
        return numcodecs.get_codec(
            {
                "id": "blosc",
                "cname": conf.get("cname", "zstd"),
                "clevel": conf.get("clevel", 5),
                "shuffle": shuffle,
                "blocksize": conf.get("blocksize", 0),
                "typesize": conf.get("typesize"),
            }
        )
    if name == "zstd":
        return numcodecs.get_codec({"id": "zstd", "level": conf.get("level", 0)})
    if name == "gzip":
        return numcodecs.get_codec({"id": "gzip", "level": conf.get("level", 5)})
    return None


def _no_blosc_threads() -> None:
    # zarr-python does the same on import: blosc's global thread pool is not safe from several threads.
    import numcodecs.blosc

    numcodecs.blosc.use_threads = False


# ----------------------------------------------------------------------------------------------------------
# array metadata, parsed from the store's own JSON


@dataclass(frozen=True)
class _ArrayMeta:
    """What actfmt needs of one array's metadata, read from ``zarr.json`` / ``.zarray`` without zarr-python."""

    name: str
    zarr_format: int
    shape: tuple[int, ...]
    chunks: tuple[int, ...]
    dtype: str  # numpy spelling of the stored dtype, e.g. "<u2"
    attributes: dict[str, Any]
    separator: str
    prefix: str  # v3: "c" (default encoding), "" (v2 encoding) ; v2: ""
    codec: Any  # numcodecs codec, None = raw bytes
    direct: bool  # can actfmt read / write chunk files itself?

    def chunk_key(self, i: int) -> str:
        """The key of row-chunk ``i`` relative to the array (``c/3/0`` or ``3.0``)."""
        parts = [str(i)] + ["0"] * (len(self.shape) - 1)
        if self.prefix:
            parts.insert(0, self.prefix)
        return self.separator.join(parts)

    @property
    def chunk_rows(self) -> int:
        return self.chunks[0]

    @property
    def nchunks(self) -> int:
        return -(-self.shape[0] // self.chunks[0]) if self.shape[0] else 0


_V3_DTYPES = {"float16": "<f2", "float32": "<f4", "uint16": "<u2", "int16": "<i2", "bfloat16": "bfloat16"}


def _read_json(p: Path) -> Any:
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MetadataError(f"{p}: not valid JSON ({exc}); the store is damaged: re-convert it.") from None


def _array_meta(group: Path, name: str) -> _ArrayMeta | None:
    """Parse array ``name`` of the group at ``group`` (``None`` when it is not an array)."""
    adir = group / name
    v3 = _read_json(adir / "zarr.json")
    if isinstance(v3, dict) and v3.get("node_type") == "array":
        try:
            shape = tuple(int(n) for n in v3["shape"])
            chunks = tuple(int(n) for n in v3["chunk_grid"]["configuration"]["chunk_shape"])
            dt = v3["data_type"]
        except (KeyError, TypeError, ValueError):
            raise MetadataError(
                f"{adir / 'zarr.json'}: incomplete array metadata; re-convert the store."
            ) from None
        enc = v3.get("chunk_key_encoding") or {"name": "default"}
        sep = (enc.get("configuration") or {}).get("separator", "/" if enc.get("name") == "default" else ".")
        prefix = "c" if enc.get("name") == "default" else ""
        codecs = list(v3.get("codecs") or [])
        direct, codec = False, None
        if (
            codecs
            and codecs[0].get("name") == "bytes"
            and (codecs[0].get("configuration") or {}).get("endian", "little") == "little"
        ):
            rest = codecs[1:]
            if not rest:
                direct = True
            elif len(rest) == 1:
                codec = _codec_from_config(rest[0], 3)
                direct = codec is not None
        dtype = _V3_DTYPES.get(dt, dt) if isinstance(dt, str) else str(dt)
        fill = v3.get("fill_value", 0)
        attrs = v3.get("attributes") or {}
        zarr_format = 3
    else:
        v2 = _read_json(adir / ".zarray")
        if not isinstance(v2, dict):
            return None
        try:
            shape = tuple(int(n) for n in v2["shape"])
            chunks = tuple(int(n) for n in v2["chunks"])
            dtype = str(v2["dtype"])
        except (KeyError, TypeError, ValueError):
            raise MetadataError(
                f"{adir / '.zarray'}: incomplete array metadata; re-convert the store."
            ) from None
        sep, prefix = v2.get("dimension_separator") or ".", ""
        comp = v2.get("compressor")
        codec = _codec_from_config(comp, 2) if comp else None
        direct = (comp is None or codec is not None) and not v2.get("filters") and v2.get("order", "C") == "C"
        fill = v2.get("fill_value", 0)
        attrs = _read_json(adir / ".zattrs") or {}
        zarr_format = 2
    if dtype.startswith("|") or dtype.startswith("="):
        dtype = "<" + dtype[1:]
    direct = (
        direct
        and len(shape) == 2
        and len(chunks) == 2
        and chunks[1] == shape[1]
        and dtype in ("<u2", "<f2", "<f4", "<i2")
        and fill in (0, 0.0, None)
    )
    return _ArrayMeta(name, zarr_format, shape, chunks, dtype, dict(attrs), sep, prefix, codec, direct)


# ----------------------------------------------------------------------------------------------------------
# reader


class ZarrReader(Reader):
    """A split stored as a Zarr group (v2 or v3) on the local file system."""

    format = "zarr"

    def __init__(self, path: str | Path) -> None:
        super().__init__(path)
        if not ZarrFormat.can_open(self.path):
            raise NotASplitError(
                f"{self.path}: not a Zarr group (no zarr.json or .zgroup); convert a split with "
                f"`actfmt convert SRC DST --to zarr`."
            )
        self._zarr_group: Any = None
        self._pool: Any = None

    # -- description -----------------------------------------------------------------------------------
    @cached_property
    def _group_attrs(self) -> dict[str, Any]:
        v3 = _read_json(self.path / "zarr.json")
        if isinstance(v3, dict):
            attrs = v3.get("attributes") or {}
        else:
            attrs = _read_json(self.path / ".zattrs") or {}
        if not isinstance(attrs, dict):
            raise MetadataError(
                f"{self.path}: the group attributes are not a JSON object; re-convert the store."
            )
        return attrs

    @property
    def metadata(self) -> dict[str, Any]:
        return {k: v for k, v in self._group_attrs.items() if k != ACTFMT_KEY}

    @property
    def actfmt(self) -> dict[str, Any] | None:
        block = self._group_attrs.get(ACTFMT_KEY)
        return block if isinstance(block, dict) else None

    @cached_property
    def _metas(self) -> list[_ArrayMeta]:
        found = []
        for entry in self.path.iterdir():
            i = layer_index(entry.name)
            if i is None or not entry.is_dir():
                continue
            meta = _array_meta(self.path, entry.name)
            if meta is not None:
                found.append((i, meta))
        return [m for _, m in sorted(found, key=lambda t: t[0])]

    @cached_property
    def layers(self) -> Sequence[LayerInfo]:
        block = self.actfmt or {}
        dtypes: dict[str, Any] = block["dtype"] if isinstance(block.get("dtype"), dict) else {}
        recorded: dict[str, Any] = block["shard_rows"] if isinstance(block.get("shard_rows"), dict) else {}
        out = []
        for m in self._metas:
            if len(m.shape) != 2:
                raise FormatError(
                    f"{self.path / m.name}: array of shape {list(m.shape)}, expected [examples, hidden_dim]."
                )
            dtype = m.attributes.get(DTYPE_ATTR) or dtypes.get(m.name) or _natural_dtype(m.dtype)
            if dtype not in SUPPORTED_DTYPES:
                raise FormatError(
                    f"{self.path / m.name}: stored as {m.dtype} with no {DTYPE_ATTR!r} attribute; actfmt reads "
                    f"float16, bfloat16 (as uint16 + {DTYPE_ATTR}) and float32."
                )
            if storage_numpy_dtype(dtype) != _np_dtype(m.dtype) and not (
                dtype == "bfloat16" and m.dtype in ("<u2", "<i2")
            ):
                raise FormatError(f"{self.path / m.name}: stored as {m.dtype} but {DTYPE_ATTR} says {dtype}.")
            shard_rows = m.attributes.get(SHARD_ROWS_ATTR) or recorded.get(m.name)
            sr = tuple(int(n) for n in shard_rows) if isinstance(shard_rows, list) else None
            if sr is not None and sum(sr) != m.shape[0]:
                sr = None
            out.append(
                LayerInfo(
                    name=m.name,
                    index=layer_index(m.name) or 0,
                    rows=m.shape[0],
                    hidden_dim=m.shape[1],
                    dtype=dtype,
                    shard_rows=sr,
                )
            )
        return out

    def describe(self) -> dict[str, Any]:
        """Chunk shape, compression and Zarr version of the first layer (for ``actfmt info``)."""
        if not self._metas:
            return {}
        m = self._metas[0]
        return {"chunks": list(m.chunks), "compression": _codec_name(m), "zarr_format": m.zarr_format}

    @property
    def chunk_rows(self) -> list[int]:
        """Rows per chunk of each layer."""
        return [m.chunk_rows for m in self._metas]

    def missing_chunks(self, layer: int) -> list[str]:
        """Keys (relative to the group, ``layer_00/c/3/0``) of the chunks of layer position ``layer`` that
        are not in the store.  Zarr reads a missing chunk as the fill value without a word: this is how to
        notice."""
        m = self._metas[layer]
        adir = self.path / m.name
        present: set[str] = set()
        for root, _dirs, files in os.walk(adir):
            rel = os.path.relpath(root, adir)
            for f in files:
                present.add(f if rel == "." else f"{rel}/{f}".replace(os.sep, "/"))
        return [f"{m.name}/{k}" for k in (m.chunk_key(i) for i in range(m.nchunks)) if k not in present]

    # -- data ------------------------------------------------------------------------------------------
    def _torch(self, arr: np.ndarray, layer: int) -> torch.Tensor:
        import torch

        t = torch.from_numpy(arr)
        want = torch_dtype(self.layers[layer].dtype)
        return t if t.dtype == want else t.view(want)

    def _array(self, layer: int) -> Any:
        import zarr

        if self._zarr_group is None:
            self._zarr_group = zarr.open_group(str(self.path), mode="r")
        return self._zarr_group[self._metas[layer].name]

    def _threads(self) -> Any:
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            _no_blosc_threads()
            self._pool = ThreadPoolExecutor(max_workers=READ_THREADS, thread_name_prefix="actfmt-zarr")
        return self._pool

    def read(self, layer: int, start: int = 0, stop: int | None = None) -> torch.Tensor:
        import numpy as np

        m = self._metas[layer]
        rows = m.shape[0]
        stop = rows if stop is None else min(stop, rows)
        start = max(0, start)
        if stop <= start:
            return self._torch(np.empty((0, m.shape[1]), dtype=_np_dtype(m.dtype)), layer)
        if not m.direct:
            arr = np.ascontiguousarray(self._array(layer)[start:stop])
            return self._torch(arr, layer)
        out = np.empty((stop - start, m.shape[1]), dtype=_np_dtype(m.dtype))
        cr = m.chunk_rows
        jobs = [
            (k, max(start, k * cr), min(stop, (k + 1) * cr)) for k in range(start // cr, (stop - 1) // cr + 1)
        ]
        adir = self.path / m.name

        def one(job: tuple[int, int, int]) -> None:
            k, lo, hi = job
            dst = out[lo - start : hi - start]
            _read_chunk_rows(adir / m.chunk_key(k), m, k, lo, hi, dst)

        if m.codec is not None and len(jobs) > 1:
            list(self._threads().map(one, jobs))
        else:
            for job in jobs:
                one(job)
        return self._torch(out, layer)

    def take(self, layer: int, rows: Any) -> torch.Tensor:
        import numpy as np
        import torch

        m = self._metas[layer]
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if rows.size and (rows.min() < 0 or rows.max() >= m.shape[0]):
            raise IndexError(f"row index out of range for {m.shape[0]} rows of {self.path / m.name}")
        if rows.size == 0:
            return self.read(layer, 0, 0)
        uniq, inverse = np.unique(rows, return_inverse=True)
        if not m.direct:
            got = np.ascontiguousarray(self._array(layer).get_orthogonal_selection((uniq, slice(None))))
        elif m.codec is None:
            got = np.empty((uniq.size, m.shape[1]), dtype=_np_dtype(m.dtype))
            _pread_rows(self.path / m.name, m, uniq, got)
        else:
            got = np.empty((uniq.size, m.shape[1]), dtype=_np_dtype(m.dtype))
            cr = m.chunk_rows
            which = uniq // cr
            bounds = np.flatnonzero(np.diff(which)) + 1
            groups = np.split(np.arange(uniq.size), bounds)

            def one(sel: np.ndarray) -> None:
                k = int(which[sel[0]])
                chunk = _decode_chunk(self.path / m.name / m.chunk_key(k), m)
                got[sel] = chunk[uniq[sel] - k * cr]

            if len(groups) > 1:
                list(self._threads().map(one, groups))
            else:
                one(groups[0])
        if uniq.size == rows.size and np.array_equal(uniq, rows):
            return self._torch(got, layer)
        return self._torch(got, layer)[torch.from_numpy(inverse)]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self._zarr_group = None


def _codec_name(m: _ArrayMeta) -> str:
    """``none``, ``blosc-zstd level 1 (shuffle)``, ``zstd level 1``, ``gzip level 1``, or ``other``."""
    if not m.direct:
        return "other"
    c = m.codec
    if c is None:
        return "none"
    cfg = c.get_config()
    if cfg["id"] == "blosc":
        shuffle = {0: "noshuffle", 1: "shuffle", 2: "bitshuffle"}.get(cfg.get("shuffle"), "?")
        return f"blosc-{cfg['cname']} level {cfg['clevel']} ({shuffle})"
    lvl = cfg.get("level")
    return cfg["id"] if lvl is None else f"{cfg['id']} level {lvl}"


def _natural_dtype(stored: str) -> str | None:
    return {"<f2": "float16", "<f4": "float32", "bfloat16": "bfloat16"}.get(stored)


def _np_dtype(stored: str) -> np.dtype:
    import numpy as np

    return np.dtype(stored)


def _decode_chunk(path: Path, m: _ArrayMeta) -> np.ndarray:
    """A whole chunk as a ``(chunk_rows, hidden)`` array (the fill value, zeros, when the file is missing)."""
    import numpy as np

    shape = (m.chunk_rows, m.shape[1])
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return np.zeros(shape, dtype=_np_dtype(m.dtype))
    out = np.empty(shape, dtype=_np_dtype(m.dtype))
    if m.codec is None:
        _check_size(path, len(raw), out.nbytes)
        out.reshape(-1).view(np.uint8)[:] = np.frombuffer(raw, dtype=np.uint8)
    else:
        m.codec.decode(raw, out=out)
    return out


def _check_size(path: Path, got: int, want: int) -> None:
    if got != want:
        raise FormatError(
            f"{path}: chunk of {got} bytes, expected {want}; the store is damaged: re-convert it."
        )


def _read_chunk_rows(path: Path, m: _ArrayMeta, k: int, lo: int, hi: int, dst: np.ndarray) -> None:
    """Rows ``[lo, hi)`` (all in chunk ``k``) into ``dst`` with no intermediate copy where possible."""
    cr = m.chunk_rows
    full = lo == k * cr and hi - lo == cr
    if m.codec is None:
        row_bytes = m.shape[1] * dst.itemsize
        try:
            fh = open(path, "rb", buffering=0)  # noqa: SIM115 - closed below
        except FileNotFoundError:
            dst[...] = 0
            return
        with fh:
            size = os.fstat(fh.fileno()).st_size
            _check_size(path, size, cr * row_bytes)
            fh.seek((lo - k * cr) * row_bytes)
            view = dst.reshape(-1).data.cast("B")
            n = 0
            while n < len(view):
                got = fh.readinto(view[n:])
                if not got:
                    raise FormatError(f"{path}: chunk ends early; the store is damaged: re-convert it.")
                n += got
        return
    if full:
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            dst[...] = 0
            return
        m.codec.decode(raw, out=dst)
        return
    chunk = _decode_chunk(path, m)
    dst[...] = chunk[lo - k * cr : hi - k * cr]


def _pread_rows(adir: Path, m: _ArrayMeta, rows: np.ndarray, out: np.ndarray) -> None:
    """Sorted unique ``rows`` of an uncompressed array into ``out``, reading only those rows."""
    import numpy as np

    cr = m.chunk_rows
    row_bytes = m.shape[1] * out.itemsize
    which = rows // cr
    bounds = np.flatnonzero(np.diff(which)) + 1

    for sel in np.split(np.arange(rows.size), bounds):
        k = int(which[sel[0]])
        path = adir / m.chunk_key(k)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            out[sel] = 0
            continue
        try:
            if os.fstat(fd).st_size != cr * row_bytes:
                _check_size(path, os.fstat(fd).st_size, cr * row_bytes)
            for j in sel:
                view = out[j].data.cast("B")
                off = int(rows[j] - k * cr) * row_bytes
                if os.preadv(fd, [view], off) != row_bytes:
                    raise FormatError(f"{path}: chunk ends early; the store is damaged: re-convert it.")
        finally:
            os.close(fd)


# ----------------------------------------------------------------------------------------------------------
# writer


class ZarrWriter(Writer):
    """Creates the group and arrays with zarr-python, then writes whole chunk files itself."""

    format = "zarr"
    parallel_layers = True

    def __init__(self, path: str | Path, spec: SplitSpec, options: WriteOptions) -> None:
        super().__init__(path, spec, options)
        self._metas: dict[int, _ArrayMeta] = {}
        self._dirs: set[str] = set()
        self._pool: Any = None

    @classmethod
    def create(cls, path: str | Path, spec: SplitSpec, options: WriteOptions) -> ZarrWriter:
        import zarr

        if _remote_writer(cls, path):  # object storage: actfmt.formats.zarr_remote
            from actfmt.formats.zarr_remote import RemoteZarrWriter

            return RemoteZarrWriter.create(path, spec, options)
        p = Path(path)
        zf = int(options.zarr_format or 3)
        if zf not in (2, 3):
            raise ConversionError(f"{p}: --zarr-format must be 2 or 3, not {options.zarr_format!r}.")
        name, level = _resolve_compression(p, options.compression, options.level)
        if options.chunk_rows is not None and int(options.chunk_rows) < 1:
            raise ConversionError(f"{p}: --chunk-rows must be at least 1, not {options.chunk_rows}.")
        for info in spec.layers:
            if info.dtype not in SUPPORTED_DTYPES:
                raise ConversionError(
                    f"{p}/{info.name}: dtype {info.dtype} is not supported; use float16, bfloat16 or float32."
                )
        if p.exists():
            raise ConversionError(f"{p}: already exists; the zarr writer creates a new store.")
        attrs = {k: v for k, v in spec.metadata.items() if k != ACTFMT_KEY}
        group = zarr.create_group(str(p), zarr_format=zf, attributes=attrs)  # type: ignore[arg-type]
        for info in spec.layers:
            itemsize = info.itemsize
            rows = info.rows
            chunk_rows = min(int(options.chunk_rows), max(rows, 1)) if options.chunk_rows else None
            chunk_rows = chunk_rows or default_chunk_rows(rows, info.hidden_dim, itemsize)
            arr_attrs: dict[str, Any] = {DTYPE_ATTR: info.dtype}
            if info.shard_rows:
                arr_attrs[SHARD_ROWS_ATTR] = list(info.shard_rows)
            kwargs: dict[str, Any] = {}
            if zf == 3:
                kwargs["dimension_names"] = ("example", "hidden")
            else:
                kwargs["order"] = "C"
            group.create_array(
                info.name,
                shape=(rows, info.hidden_dim),
                chunks=(chunk_rows, info.hidden_dim),
                dtype=storage_numpy_dtype(info.dtype),
                compressors=_zarr_compressors(name, level, itemsize, zf),
                filters=None,
                fill_value=0,
                attributes=arr_attrs,
                **kwargs,
            )
        return cls(p, spec, options)

    @classmethod
    def open(cls, path: str | Path, spec: SplitSpec, options: WriteOptions) -> ZarrWriter:
        if _remote_writer(cls, path):
            from actfmt.formats.zarr_remote import RemoteZarrWriter

            return RemoteZarrWriter.open(path, spec, options)
        return cls(path, spec, options)

    def _meta(self, layer: int) -> _ArrayMeta:
        m = self._metas.get(layer)
        if m is None:
            name = self.spec.layers[layer].name
            m = _array_meta(self.path, name)
            if m is None:
                raise ConversionError(f"{self.path / name}: no such array; the partial store is damaged.")
            if not m.direct:
                raise ConversionError(
                    f"{self.path / name}: not written by actfmt's zarr writer; use --overwrite."
                )
            info = self.spec.layers[layer]
            if m.shape != (info.rows, info.hidden_dim) or storage_numpy_dtype(info.dtype) != _np_dtype(
                m.dtype
            ):
                raise ConversionError(
                    f"{self.path / name}: the partial store holds {list(m.shape)} {m.dtype}, the source "
                    f"[{info.rows}, {info.hidden_dim}] {info.dtype}; restart without --resume."
                )
            with _lock:
                self._metas[layer] = m
        return m

    def block_rows(self, layer: int) -> list[int]:
        info = self.spec.layers[layer]
        m = self._meta(layer)
        cr = m.chunk_rows
        step = max(1, BLOCK_TARGET_BYTES // max(1, cr * info.hidden_dim * info.itemsize)) * cr
        return [min(step, info.rows - s) for s in range(0, info.rows, step)] or [0]

    def _block(self, layer: int, start: int, data: torch.Tensor) -> tuple[_ArrayMeta, np.ndarray] | None:
        """Check that a block is made of whole chunks of ``layer``; its rows as numpy (no copy), or ``None``."""
        import torch

        m = self._meta(layer)
        info = self.spec.layers[layer]
        cr, rows, hidden = m.chunk_rows, info.rows, info.hidden_dim
        n = int(data.shape[0])
        if n == 0:
            return None
        if start % cr or (start + n != rows and n % cr) or start + n > rows:
            raise ValueError(
                f"zarr writer: block at row {start} of {n} rows is not made of whole chunks of {cr} rows "
                f"(layer of {rows} rows)"
            )
        if tuple(data.shape) != (n, hidden):
            raise ValueError(f"zarr writer: block of shape {tuple(data.shape)}, expected ({n}, {hidden})")
        t = data.contiguous()
        if t.dtype == torch.bfloat16:
            t = t.view(torch.int16)
        return m, t.numpy().view(_np_dtype(m.dtype))  # no copy: the tensor's memory

    def write(self, layer: int, start: int, data: torch.Tensor) -> None:
        import numpy as np

        block = self._block(layer, start, data)
        if block is None:
            return
        m, arr = block
        cr, hidden, n = m.chunk_rows, self.spec.layers[layer].hidden_dim, arr.shape[0]
        adir = self.path / m.name

        def one(s: int) -> None:
            part = arr[s : s + cr]
            target = adir / m.chunk_key((start + s) // cr)
            parent = str(target.parent)
            if parent not in self._dirs:
                os.makedirs(parent, exist_ok=True)
                self._dirs.add(parent)
            pad = cr - part.shape[0]
            if m.codec is None:
                with open(target, "wb", buffering=0) as fh:
                    _write_all(fh, part.data.cast("B"))
                    if pad:
                        _write_all(fh, memoryview(bytes(pad * hidden * part.itemsize)))
                return
            if pad:
                full = np.zeros((cr, hidden), dtype=part.dtype)
                full[: part.shape[0]] = part
                part = full
            encoded = m.codec.encode(part)  # blosc / zstd / zlib release the GIL: chunks encode in parallel
            with open(target, "wb", buffering=0) as fh:
                _write_all(fh, memoryview(encoded).cast("B"))

        starts = range(0, n, cr)
        if m.codec is not None and len(starts) > 1:
            list(self._threads().map(one, starts))
        else:
            for s in starts:
                one(s)

    def _threads(self) -> Any:
        with _lock:
            if self._pool is None:
                from concurrent.futures import ThreadPoolExecutor

                _no_blosc_threads()
                threads = int(self.options.extra.get("threads") or WRITE_THREADS)
                self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="actfmt-zarr-w")
            return self._pool

    def close(self) -> None:
        with _lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)

    def finalize(self, block: dict[str, Any]) -> None:
        """Add the actfmt block to the group attributes (one atomic rewrite of the group's metadata)."""
        import zarr

        group = zarr.open_group(str(self.path), mode="r+")
        out = dict(block)
        out.setdefault("dtype", {li.name: li.dtype for li in self.spec.layers})
        group.attrs.update({ACTFMT_KEY: out})


def _remote_writer(cls: type[ZarrWriter], path: Any) -> bool:
    """Should ``ZarrWriter.create/open(path)`` hand over to the object-storage writer?"""
    from actfmt.remote import RemotePath

    return isinstance(path, RemotePath) and cls is ZarrWriter


def _write_all(fh: Any, view: memoryview) -> None:
    n = 0
    while n < len(view):
        n += fh.write(view[n:])


# ----------------------------------------------------------------------------------------------------------
# format


class ZarrFormat(Format):
    name = "zarr"
    suffix = ".zarr"
    compressions = COMPRESSIONS

    @classmethod
    def can_open(cls, path: Path) -> bool:
        """A directory holding a v3 group's ``zarr.json`` or a v2 ``.zgroup`` (zarr is not imported)."""
        try:
            if not path.is_dir():
                return False
            v3 = path / "zarr.json"
            if v3.is_file():
                try:
                    doc = json.loads(v3.read_text(encoding="utf-8"))
                except (OSError, ValueError):
                    return True  # a damaged store is still a store: the reader says what is wrong
                return not (isinstance(doc, dict) and doc.get("node_type") == "array")
            return (path / ".zgroup").is_file()
        except OSError:
            return False

    @classmethod
    def open_reader(cls, path: str | Path) -> ZarrReader:
        from actfmt.remote import RemotePath

        if isinstance(path, RemotePath):
            from actfmt.formats.zarr_remote import RemoteZarrReader

            return RemoteZarrReader(path)
        return ZarrReader(path)

    @classmethod
    def writer_class(cls) -> type[Writer]:
        return ZarrWriter
