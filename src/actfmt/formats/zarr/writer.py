"""Writing a split as a Zarr group, on any storage, without zarr-python.

``create`` writes the arrays' metadata documents and then the group's (:mod:`actfmt.formats.zarr.meta`: the
documents zarr-python 3.1 writes), the group's attributes being the producer's metadata only.  ``write`` takes
blocks of whole chunks (:meth:`ZarrWriter.block_rows`), encodes each chunk with the numcodecs codec the
metadata names (on two threads; nothing at all when uncompressed: the block's memory is written as is), pads the
edge chunk to the full chunk as Zarr requires, and writes the block's chunk objects with one
:meth:`~actfmt.storage.Location.put_many` (concurrent PUTs on object storage).  An uncompressed store whose
storage can copy ranges (:attr:`~actfmt.storage.Location.supports_copy_range`) copies the source's raw bytes
into each chunk file in the kernel when the conversion hands over their byte runs.  ``finalize`` adds the
``actfmt`` block to the group's attributes last: one atomic rewrite of ``zarr.json`` / ``.zattrs``, so an
interrupted conversion never looks complete.

Different layers may be written by different threads or processes at once: each layer's chunks are separate
objects and nothing but ``finalize`` touches the group's document.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from actfmt.errors import ConversionError
from actfmt.formats.base import (
    ACTFMT_KEY,
    ByteRun,
    LayerInfo,
    SplitSpec,
    StoredVectors,
    WriteOptions,
    Writer,
    check_write_chunks,
)
from actfmt.formats.dtypes import as_array, stored_dtype
from actfmt.formats.vectors import STATS_GROUP
from actfmt.formats.zarr.codecs import resolve_compression
from actfmt.formats.zarr.meta import (
    DIMENSION_NAMES,
    DTYPE_ATTR,
    SHARD_ROWS_ATTR,
    ZARR_JSON,
    ZARRAY,
    ZATTRS,
    ZGROUP,
    ArrayMeta,
    array_documents,
    encode_json,
    group_documents,
    parse_json,
    read_arrays,
    read_json,
    set_group_attribute,
    small_array_documents,
)
from actfmt.formats.zarr.options import ZarrOptions
from actfmt.layout import SUPPORTED_DTYPES
from actfmt.storage import Location, read_objects

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

__all__ = [
    "BLOCK_TARGET_BYTES",
    "CHUNK_TARGET_BYTES",
    "WRITE_THREADS",
    "ZarrWriter",
    "consolidate",
    "default_chunk_rows",
    "zarr_dtype",
]

CHUNK_TARGET_BYTES = 2 << 20  # 2 MiB per compressed chunk: four blosc blocks, small decodes for random rows
#: Uncompressed chunks are read by row offset whatever their size: bigger ones mean fewer files to create.
RAW_CHUNK_TARGET_BYTES = 4 << 20
BLOCK_TARGET_BYTES = 32 << 20  # ~32 MiB of whole chunks per write() block
WRITE_THREADS = 2  # encode threads (the target machine has two cores)


def default_chunk_rows(rows: int, hidden_dim: int, itemsize: int, target: int = CHUNK_TARGET_BYTES) -> int:
    """The largest power of two whose chunk stays within ``target`` bytes (2 MiB), capped at ``rows``
    (at least 1)."""
    row_bytes = max(1, hidden_dim * itemsize)
    n = 1 << (max(1, target // row_bytes).bit_length() - 1)
    return max(1, min(n, rows))


def _chunk_rows(info: LayerInfo, options: WriteOptions, compression: str) -> int:
    if options.chunk_rows:
        return min(int(options.chunk_rows), max(info.rows, 1))
    target = RAW_CHUNK_TARGET_BYTES if compression == "none" else CHUNK_TARGET_BYTES
    return default_chunk_rows(info.rows, info.hidden_dim, info.itemsize, target)


def zarr_dtype(dtype: str) -> str:
    """The stored data type of a layer of ``dtype``: bfloat16 as the ``bfloat16`` data type (zarr-extensions,
    v3; tensorstore's spelling in v2) so no reader takes its bits for integers; else the numpy spelling."""
    return "bfloat16" if dtype == "bfloat16" else stored_dtype(dtype).str


#: The consolidated metadata document of a v2 store (xarray and zarr-python read it in one GET).
ZMETADATA = ".zmetadata"


def _array_docs(
    location: Location, info: LayerInfo, options: WriteOptions, codec: str, level: int | None, zf: int
) -> dict[Location, bytes]:
    """The metadata documents of layer ``info``'s array (no chunk yet)."""
    attrs: dict[str, Any] = {DTYPE_ATTR: info.dtype}
    if info.shard_rows:
        attrs[SHARD_ROWS_ATTR] = list(info.shard_rows)
    adir = location / info.name
    shape = (info.rows, info.hidden_dim)
    dtype = zarr_dtype(info.dtype)
    return {
        adir / key: raw
        for key, raw in array_documents(
            shape, _chunk_rows(info, options, codec), dtype, codec, level, attrs, zf
        ).items()
    }


def _coordinate_docs(location: Location, spec: SplitSpec, zf: int) -> dict[Location, bytes]:
    """The coordinate arrays ``example`` (0 .. rows-1) and ``hidden`` (0 .. hidden_dim-1), int64, one
    uncompressed chunk each: what xarray makes the dimensions' indexes of (``ds.sel(example=...)``)."""
    import numpy as np

    if not spec.layers:
        return {}
    first = spec.layers[0]
    docs: dict[Location, bytes] = {}
    for dim, n in zip(DIMENSION_NAMES, (first.rows, first.hidden_dim), strict=True):
        docs.update(small_array_documents(location, dim, np.arange(n, dtype="<i8"), zf, (dim,)))
    return docs


def consolidate(location: Location, zf: int) -> None:
    """Consolidated metadata, as zarr-python's ``consolidate_metadata`` writes it: every array's and the
    statistics group's documents, in name order (so xarray lists the layers in order), inline in the group's
    ``zarr.json`` (v3, one atomic rewrite) or in ``.zmetadata`` (v2).  xarray and zarr-python then open the
    store with one read, and without the warning they give for a store that has none."""
    names = sorted(e.name for e in location.list_dir() if e.is_dir() and not e.name.startswith("."))
    stats = location / STATS_GROUP
    if STATS_GROUP in names:
        names.remove(STATS_GROUP)
        inner = sorted(e.name for e in stats.list_dir() if e.is_dir())
    else:
        inner = []
    if zf == 3:
        keys = names + ([STATS_GROUP] if inner else []) + [f"{STATS_GROUP}/{n}" for n in inner]
        raws = read_objects([location / k / ZARR_JSON for k in keys], missing_ok=True)
        found: dict[str, Any] = {}
        for k, raw in zip(keys, raws, strict=True):
            doc = parse_json(location / k / ZARR_JSON, raw)
            if isinstance(doc, dict):
                if doc.get("node_type") == "group":
                    doc = {**doc, "consolidated_metadata": _inline({})}
                found[k] = doc
        order = sorted(found, key=lambda k: (k.count("/"), k))  # zarr-python: the group's children first
        group = read_json(location / ZARR_JSON)
        if not isinstance(group, dict):
            raise ConversionError(f"{location / ZARR_JSON}: missing or damaged; restart without --resume.")
        doc = {
            "attributes": group.get("attributes", {}),
            "zarr_format": 3,
            "consolidated_metadata": _inline({k: found[k] for k in order}),
            "node_type": "group",
        }
        (location / ZARR_JSON).write_bytes(encode_json(doc), atomic=True)
        return
    keys = [ZGROUP, ZATTRS]
    for n in names:
        keys += [f"{n}/{ZARRAY}", f"{n}/{ZATTRS}"]
    if inner:
        keys += [f"{STATS_GROUP}/{ZGROUP}", f"{STATS_GROUP}/{ZATTRS}"]
        for n in inner:
            keys += [f"{STATS_GROUP}/{n}/{ZARRAY}", f"{STATS_GROUP}/{n}/{ZATTRS}"]
    raws = read_objects([location / k for k in keys], missing_ok=True)
    meta = {k: parse_json(location / k, raw) for k, raw in zip(keys, raws, strict=True) if raw is not None}
    doc2 = {"metadata": meta, "zarr_consolidated_format": 1}
    (location / ZMETADATA).write_bytes(encode_json(doc2), atomic=True)


def _inline(metadata: dict[str, Any]) -> dict[str, Any]:
    return {"kind": "inline", "must_understand": False, "metadata": metadata}


class ZarrWriter(Writer):
    """Writes the group's documents and whole chunk objects itself (see the module docstring)."""

    format = "zarr"

    def __init__(self, location: Location, spec: SplitSpec, options: WriteOptions) -> None:
        super().__init__(location, spec, options)
        self._metas: dict[int, ArrayMeta] = {}
        self._dirs: set[Location] = set()
        self._pool: Any = None
        self._lock = threading.Lock()

    @classmethod
    def create(cls, location: Location, spec: SplitSpec, options: WriteOptions) -> ZarrWriter:
        zf = ZarrOptions.of(options).zarr_format
        if zf not in (2, 3):
            raise ConversionError(f"{location}: --zarr-format must be 2 or 3, not {zf!r}.")
        name, level = resolve_compression(location, options.compression, options.level)
        if options.chunk_rows is not None and int(options.chunk_rows) < 1:
            raise ConversionError(f"{location}: --chunk-rows must be at least 1, not {options.chunk_rows}.")
        for info in spec.layers:
            if info.dtype not in SUPPORTED_DTYPES:
                raise ConversionError(
                    f"{location / info.name}: dtype {info.dtype} is not supported; use float16, bfloat16 or float32."
                )
            check_write_chunks(location / info.name, _chunk_rows(info, options, name), info)
        if location.exists():
            raise ConversionError(f"{location}: already exists; the zarr writer creates a new store.")
        docs: dict[Location, bytes] = {}
        location.mkdir()
        for info in spec.layers:
            (location / info.name).mkdir()
            docs.update(_array_docs(location, info, options, name, level, zf))
        docs.update(_coordinate_docs(location, spec, zf))
        for d in {loc.parent for loc in docs} - {location / info.name for info in spec.layers}:
            d.mkdir()
        location.put_many(docs)
        # the group last: a directory is a store only once every array's metadata is there
        attrs = {k: v for k, v in spec.metadata.items() if k != ACTFMT_KEY}
        location.put_many({location / key: raw for key, raw in group_documents(attrs, zf).items()})
        return cls(location, spec, options)

    def _meta(self, layer: int) -> ArrayMeta:
        m = self._metas.get(layer)
        if m is not None:
            return m
        info = self.spec.layers[layer]
        where = self.location / info.name
        m = read_arrays(self.location, [info.name]).get(info.name)
        if m is None:
            raise ConversionError(f"{where}: no such array; the partial store is damaged.")
        if not m.direct:
            raise ConversionError(f"{where}: not written by actfmt's zarr writer; use --overwrite.")
        if m.shape != (info.rows, info.hidden_dim) or zarr_dtype(info.dtype) != m.dtype:
            # the source of this layer changed shape or dtype since the partial store was started (--resume
            # redoes it): the array is made again, empty, before its rows are written from the first
            name, level = resolve_compression(self.location, self.options.compression, self.options.level)
            where.delete_tree()
            where.mkdir()
            zf = ZarrOptions.of(self.options).zarr_format
            self.location.put_many(_array_docs(self.location, info, self.options, name, level, zf))
            m = read_arrays(self.location, [info.name]).get(info.name)
            if m is None:  # pragma: no cover - just written
                raise ConversionError(f"{where}: the array cannot be made again; restart without --resume.")
        with self._lock:
            self._metas[layer] = m
        return m

    def block_rows(self, layer: int) -> list[int]:
        """Whole chunks of about 32 MiB; the source's shards when every shard but the last is whole chunks
        (then each block is one source shard, whose raw bytes can be copied as they are)."""
        info = self.spec.layers[layer]
        cr = self._meta(layer).chunk_rows
        shards = info.shard_rows
        if shards and sum(shards) == info.rows and all(n > 0 and n % cr == 0 for n in shards[:-1]):
            return list(shards)
        step = max(1, BLOCK_TARGET_BYTES // max(1, cr * info.row_bytes)) * cr
        return [min(step, info.rows - s) for s in range(0, info.rows, step)] or [0]

    def copies_raw(self, layer: int) -> bool:
        return self._meta(layer).codec is None and self.location.supports_copy_range

    def write(self, layer: int, start: int, data: Any, runs: list[ByteRun] | None = None) -> None:
        import numpy as np

        info = self.spec.layers[layer]
        m = self._meta(layer)
        cr, rows, hidden = m.chunk_rows, info.rows, info.hidden_dim
        if data is None:  # the source's bytes, copied in the kernel
            assert runs is not None
            arr, n = None, sum(r[2] for r in runs) // max(1, info.row_bytes)
        else:
            arr = as_array(data, info.dtype)
            if arr.ndim != 2 or arr.shape[1] != hidden:
                raise ValueError(f"zarr writer: block of shape {tuple(arr.shape)}, expected (n, {hidden})")
            n = int(arr.shape[0])
        if n == 0:
            return
        if start % cr or (start + n != rows and n % cr) or start + n > rows:
            raise ValueError(
                f"zarr writer: block at row {start} of {n} rows is not made of whole chunks of {cr} rows "
                f"(layer of {rows} rows)"
            )
        adir = self.location / m.name
        starts = range(0, n, cr)
        targets = [adir / m.chunk_key((start + s) // cr) for s in starts]
        self._mkdirs(t.parent for t in targets)
        codec = m.codec
        if codec is None and runs is not None and self.location.supports_copy_range:
            self._copy(
                [(t, s, min(cr, n - s)) for t, s in zip(targets, starts, strict=True)],
                runs,
                n,
                cr,
                info.row_bytes,
            )
            return
        assert arr is not None, "zarr writer: a block without rows"

        def chunk(s: int) -> np.ndarray:
            part = arr[s : s + cr]
            if part.shape[0] < cr:  # the edge chunk: padded to the full chunk, as Zarr requires
                full = np.zeros((cr, hidden), dtype=part.dtype)
                full[: part.shape[0]] = part
                part = full
            return part

        def one(s: int) -> Any:
            # blosc / zstd / zlib release the GIL: the chunks of a block encode in parallel
            return chunk(s) if codec is None else codec.encode(chunk(s))

        if codec is not None and len(starts) > 1:
            payloads = list(self._threads().map(one, starts))
        else:
            payloads = [one(s) for s in starts]
        self.location.put_many(dict(zip(targets, payloads, strict=True)))

    def _copy(
        self, chunks: list[tuple[Location, int, int]], runs: list[ByteRun], n: int, cr: int, row_bytes: int
    ) -> None:
        """Chunk files ``(target, first row in the block, rows)`` made of the source's raw bytes ``runs`` of the
        block's ``n`` rows (in the kernel where the storage can); an edge chunk is padded with zeros."""
        if sum(length for _, _, length in runs) != n * row_bytes:
            raise ValueError(
                f"zarr writer: the byte runs hold {sum(r[2] for r in runs)} bytes, the block {n * row_bytes}"
            )
        pending: list[ByteRun] = [r for r in runs if r[2] > 0]
        j, pos = 0, 0  # the current run, and the block byte where it starts
        for target, first, rows in chunks:
            lo, need = first * row_bytes, rows * row_bytes
            while pos + pending[j][2] <= lo:  # runs before this chunk
                pos += pending[j][2]
                j += 1
            with target.open_output() as out:
                at = lo
                while need:
                    src, off, length = pending[j]
                    skip = at - pos
                    take = min(need, length - skip)
                    out.copy_range(src, off + skip, take)
                    need -= take
                    at += take
                    if at == pos + length:
                        pos += length
                        j += 1
                if rows < cr:  # the edge chunk: padded to the full chunk, as Zarr requires
                    out.write(bytes((cr - rows) * row_bytes))

    def _mkdirs(self, dirs: Iterable[Location]) -> None:
        """Make the chunk directories (local storage; nothing to do on object storage)."""
        for d in dirs:
            if d not in self._dirs:
                d.mkdir()
                with self._lock:
                    self._dirs.add(d)

    def _threads(self) -> Any:
        with self._lock:
            if self._pool is None:
                threads = int(self.options.extra.get("threads") or WRITE_THREADS)
                self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="actfmt-zarr-w")
            return self._pool

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)

    def write_stats(self, vectors: StoredVectors) -> None:
        """The vectors as arrays of the group ``actfmt_stats`` (``mean``, ``std``, ``mean_f64``; zarr tools read
        them as any array), the rows' layer names as its attribute ``layers``."""
        zf = ZarrOptions.of(self.options).zarr_format
        group = self.location / STATS_GROUP
        docs = {group / k: v for k, v in group_documents({"layers": vectors.layers}, zf).items()}
        for name, arr in vectors.arrays.items():
            docs.update(small_array_documents(group, name, arr, zf))
        for d in {loc.parent for loc in docs}:
            d.mkdir()
        self.location.put_many(docs)

    def finalize(self, block: dict[str, Any]) -> None:
        """Add the actfmt block to the group attributes (last: one atomic rewrite of the group's document)."""
        out = dict(block)
        out.setdefault("dtype", {li.name: li.dtype for li in self.spec.layers})
        set_group_attribute(self.location, ACTFMT_KEY, out)
        if all(li.dtype != "bfloat16" for li in self.spec.layers):
            # zarr-python 3.1 cannot parse a bfloat16 array's metadata: consolidated, such a store would not
            # even open as a group there (its attributes, statistics and coordinates are readable unconsolidated)
            consolidate(self.location, ZarrOptions.of(self.options).zarr_format)
