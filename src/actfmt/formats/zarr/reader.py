"""Reading a split stored as a Zarr group (v2 or v3), on any storage, without zarr-python when it can.

The group's and arrays' JSON documents are parsed by :mod:`actfmt.formats.zarr.meta` (one listing of the
group, one batch of reads for the arrays' documents).  Then, per array:

* uncompressed, in the layout actfmt writes (``ArrayMeta.direct``): a :class:`~actfmt.formats.rowstore.RowStore`
  whose segments are the chunk objects, so any rows are read straight into the output (``preadv`` locally,
  ranged GETs of just those rows remotely) and :meth:`ZarrReader.runs` hands their byte runs to a writer;
* compressed with a codec actfmt knows: whole chunk objects fetched in batches
  (:func:`~actfmt.storage.read_objects`: concurrent GETs remotely) and decoded on two threads, straight into
  the output where a chunk lies wholly inside it;
* anything else (sharding, transposes, filters, other fill values): zarr-python, imported only then.

A missing chunk reads as the fill value (zeros), as in every Zarr reader; :meth:`ZarrReader.missing_chunks`
lists them from one listing of the array (rule ACT601).  A damaged chunk is a
:class:`~actfmt.errors.FormatError` naming it.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import cached_property
from typing import TYPE_CHECKING, Any

from actfmt.errors import (
    ActfmtError,
    BadHeaderError,
    ChangedError,
    FormatError,
    NotASplitError,
    OutsideTreeError,
    TruncatedError,
)
from actfmt.formats.base import (
    ACTFMT_KEY,
    MAX_SHOWN_MISSING,
    VECTOR_NAMES,
    ByteRun,
    LayerInfo,
    MissingChunks,
    Reader,
    StoredVectors,
    check_shard_rows,
    fingerprint_of,
    stored_vectors_of,
)
from actfmt.formats.dtypes import scratch, stored_dtype
from actfmt.formats.rowstore import RowStore, Segment, row_across
from actfmt.formats.vectors import STATS_GROUP
from actfmt.formats.zarr.codecs import check_decoded_size, codec_name, decode_into
from actfmt.formats.zarr.meta import (
    DTYPE_ATTR,
    SHARD_ROWS_ATTR,
    ZARR_JSON,
    ZARRAY,
    ZGROUP,
    ArrayMeta,
    group_attributes,
    itemsize_of,
    probe_group,
    read_arrays,
)
from actfmt.layout import SUPPORTED_DTYPES, layer_index
from actfmt.storage import Location, read_objects
from actfmt.storage.fsspec_ import fsspec_options

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

__all__ = ["READ_THREADS", "ZarrReader"]

READ_THREADS = 2  # decode threads (the target machine has two cores)
#: Compressed chunks are fetched in batches of about this many decoded bytes (bounds the memory held).
FETCH_BATCH_BYTES = 64 << 20
_NATURAL = {"<f2": "float16", "<f4": "float32", "bfloat16": "bfloat16"}


def _row_chunk(m: ArrayMeta, key: str) -> int | None:
    """The row-chunk index of a chunk key of the first column of chunks (``c.3.0`` -> 3), else ``None``."""
    parts = key.split(m.separator)
    if m.prefix:
        if not parts or parts[0] != m.prefix:
            return None
        parts = parts[1:]
    if len(parts) != len(m.shape) or any(p != "0" for p in parts[1:]):
        return None
    first = parts[0]
    if not first.isdigit() or not first.isascii() or (len(first) > 1 and first[0] == "0"):
        return None
    return int(first)


@contextlib.contextmanager
def _zarr_python(where: Location) -> Iterator[None]:
    """What zarr-python raises on an array it cannot read (a malformed header, a chunk that does not decode) is
    a :class:`~actfmt.errors.FormatError` naming the array, never a library traceback."""
    try:
        yield
    except ActfmtError:
        raise
    except OSError:
        raise  # storage errors keep their own message
    except Exception as exc:
        text = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise FormatError(
            f"{where}: zarr-python cannot read this array ({type(exc).__name__}: {text}); the store is damaged "
            f"or not one actfmt reads: re-convert it."
        ) from None


@contextlib.contextmanager
def _damaged() -> Iterator[None]:
    """A chunk shorter than the rows it must hold is a damaged store."""
    try:
        yield
    except TruncatedError as exc:
        raise FormatError(f"{exc} The store is damaged: re-convert it.") from None


class ZarrReader(Reader):
    """A split stored as a Zarr group (see the module docstring)."""

    format = "zarr"

    def __init__(self, location: Location) -> None:
        super().__init__(location)
        try:
            entries = location.list_dir()
        except (FileNotFoundError, NotADirectoryError):
            entries = []  # other errors (permissions, object storage refusing) keep their own message
        probe = probe_group(location, entries)
        if probe is None:
            raise NotASplitError(
                f"{location}: not a Zarr group (no zarr.json or .zgroup); convert a split with "
                f"`actfmt convert SRC DST --to zarr`."
            )
        self._probe = probe
        # the group's document, as it was when opened: a store replaced since (``--overwrite`` renames a new one
        # into place) is told by its new document, checked around every read (local stores: one stat each)
        self._doc = location / (ZARR_JSON if probe.zarr_format == 3 else ZGROUP)
        self._identity = self._doc_identity() if location.local_path is not None else None
        found = [(i, e.name) for e in entries if (i := layer_index(e.name)) is not None and e.is_dir()]
        self._names = [name for _, name in sorted(found)]
        self._stores: dict[int, RowStore] = {}
        self._zarr_group: Any = None
        self._pool: Any = None
        self._lock = threading.Lock()

    # -- description ---------------------------------------------------------------------------------------
    @cached_property
    def _group_attrs(self) -> dict[str, Any]:
        return group_attributes(self.location, self._probe)

    @property
    def metadata(self) -> dict[str, Any]:
        return {k: v for k, v in self._group_attrs.items() if k != ACTFMT_KEY}

    @property
    def actfmt(self) -> dict[str, Any] | None:
        block = self._group_attrs.get(ACTFMT_KEY)
        return block if isinstance(block, dict) else None

    @cached_property
    def _metas(self) -> list[ArrayMeta]:
        return list(read_arrays(self.location, self._names).values())

    @cached_property
    def layers(self) -> Sequence[LayerInfo]:
        block = self.actfmt or {}
        dtypes: dict[str, Any] = block["dtype"] if isinstance(block.get("dtype"), dict) else {}
        recorded: dict[str, Any] = block["shard_rows"] if isinstance(block.get("shard_rows"), dict) else {}
        out = []
        for pos, m in enumerate(self._metas):
            where = self.location / m.name
            # the header declares what actfmt does not store: a bad store header (ACT606), not an incomplete one
            if len(m.shape) != 2:
                raise BadHeaderError(
                    f"{where}: array of shape {list(m.shape)}, expected [examples, hidden_dim]."
                )
            dtype = m.attributes.get(DTYPE_ATTR) or dtypes.get(m.name) or _NATURAL.get(m.dtype)
            if dtype not in SUPPORTED_DTYPES:
                raise BadHeaderError(
                    f"{where}: stored as {m.dtype} with no {DTYPE_ATTR!r} attribute; actfmt reads float16, "
                    f"bfloat16 and float32."
                )
            if stored_dtype(dtype).str != m.dtype and not (
                dtype == "bfloat16" and m.dtype in ("<i2", "bfloat16")
            ):
                raise BadHeaderError(f"{where}: stored as {m.dtype} but {DTYPE_ATTR} says {dtype}.")
            shard_rows = m.attributes.get(SHARD_ROWS_ATTR)
            sr = check_shard_rows(
                where, recorded.get(m.name) if shard_rows is None else shard_rows, m.shape[0]
            )
            if not m.direct:  # left to zarr-python: let it parse the header it will read with, now
                try:
                    with _zarr_python(where):
                        self._zarr_array(pos)
                except FormatError as exc:
                    raise BadHeaderError(str(exc)) from None
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
        return {
            "chunks": list(m.chunks),
            "compression": codec_name(m.codec) if m.direct else "other",
            "zarr_format": m.zarr_format,
        }

    @property
    def chunk_rows(self) -> list[int]:
        """Rows per chunk of each layer."""
        return [m.chunk_rows for m in self._metas]

    def chunk_rows_of(self, layer: int) -> int | None:
        return self._metas[layer].chunk_rows

    def fingerprint(self, layer: int) -> str | None:
        """A digest of the array's metadata document (its identity) and of its chunk objects (one listing:
        names and sizes)."""
        m = self._metas[layer]
        adir = self.location / m.name
        try:
            listing = adir.find()
        except FileNotFoundError:
            listing = {}
        except OSError:
            return "unreadable"
        h = hashlib.sha256(f"{m.name}:".encode())
        h.update(fingerprint_of([adir / (ZARR_JSON if m.zarr_format == 3 else ZARRAY)]).encode())
        for key in sorted(listing):
            h.update(f"{key}={listing[key]};".encode())
        return h.hexdigest()[:32]

    def missing_chunks(self, layer: int) -> list[str]:
        """Keys (relative to the group, ``layer_00/c.3.0``) of the chunks of layer position ``layer`` that
        are not in the store.  Zarr reads a missing chunk as the fill value without a word: this is how to
        notice."""
        m = self._metas[layer]
        try:
            present = set((self.location / m.name).find())
        except FileNotFoundError:
            present = set()
        # count the chunks present from the listing (bounded by what is on disk), never loop over what the
        # header declares: a shape of [10**12, 8] lists nothing and is 10**12 chunks missing, counted
        n = m.nchunks
        have = sum(1 for key in present if (i := _row_chunk(m, key)) is not None and i < n)
        total = n - have
        shown: list[str] = []
        i = 0
        while len(shown) < min(total, MAX_SHOWN_MISSING):  # at most ``have`` + MAX_SHOWN_MISSING steps
            key = m.chunk_key(i)
            if key not in present:
                shown.append(f"{m.name}/{key}")
            i += 1
        return MissingChunks(shown, total)

    # -- data ----------------------------------------------------------------------------------------------
    def _doc_identity(self) -> tuple[Any, ...] | None:
        try:
            return self._doc.stat().identity
        except OSError:
            return None

    def _check_unchanged(self) -> None:
        if self._doc_identity() != self._identity:
            raise ChangedError(
                f"{self.location}: the store was replaced or rewritten after it was opened; open it again."
            )

    @contextlib.contextmanager
    def _unchanged(self) -> Iterator[None]:
        """Raise :class:`ChangedError` if the store was replaced before or while the rows were read: a reader
        returns the rows of the store it opened, or an error, never another store's rows."""
        if self._identity is None:
            yield
            return
        self._check_unchanged()
        yield
        self._check_unchanged()

    def _chunk(self, m: ArrayMeta, k: int) -> Location:
        return self.location / m.name / m.chunk_key(k)

    def _row_store(self, layer: int) -> RowStore:
        """The chunk objects of an uncompressed direct array as raw segments (a missing one reads as zeros)."""
        store = self._stores.get(layer)
        if store is None:
            m, info = self._metas[layer], self.layers[layer]
            cr = m.chunk_rows
            segments = [Segment(self._chunk(m, k), 0, min(cr, m.shape[0] - k * cr)) for k in range(m.nchunks)]
            store = RowStore(segments, m.shape[1], info.dtype, missing_ok=True)
            self._stores[layer] = store
        return store

    def _threads(self) -> Any:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=READ_THREADS, thread_name_prefix="actfmt-zarr-r")
            return self._pool

    def _zarr_array(self, layer: int) -> Any:
        """The array through zarr-python (for codecs and layouts actfmt does not read itself)."""
        with self._lock:
            if self._zarr_group is None:
                import zarr

                loc = self.location
                store: Any
                if loc.local_path is not None:
                    # zarr-python opens files itself: only a store with no link out of the tree
                    store = loc.checked_path()
                    for rel, target in loc.escaping_links(limit=1):
                        raise OutsideTreeError(
                            f"{loc / rel}: a link to {target}, outside the tree; refused, not read.",
                            str(loc / rel),
                            target,
                        )
                else:
                    from zarr.storage import FsspecStore

                    store = FsspecStore.from_url(
                        loc.url,
                        storage_options=fsspec_options(loc.url, loc.storage_options) or None,
                        read_only=True,
                    )
                # the arrays' own documents, which actfmt parsed and checked: never a consolidated copy that may
                # disagree with them
                self._zarr_group = zarr.open_group(store, mode="r", use_consolidated=False)
        return self._zarr_group[self._metas[layer].name]

    def _stored(self, arr: Any, layer: int) -> np.ndarray:
        """What zarr-python returned, as a C-contiguous array of the layer's stored dtype."""
        import numpy as np

        out = np.ascontiguousarray(arr)
        want = stored_dtype(self.layers[layer].dtype)
        return out if out.dtype == want else out.view(want)

    def _decode(self, m: ArrayMeta, k: int, raw: bytes | None, dst: np.ndarray) -> None:
        """Chunk ``k`` (``None``: missing, the fill value) decoded into ``dst`` (a whole chunk's shape)."""
        if raw is None:
            dst[...] = 0
            return
        try:
            decode_into(m.codec, raw, dst)
        except Exception as exc:
            raise FormatError(
                f"{self._chunk(m, k)}: the chunk cannot be decoded ({exc}); the store is damaged: re-convert it."
            ) from None

    def _fetch_decode(self, m: ArrayMeta, keys: list[int], one: Any) -> None:
        """Fetch compressed chunks ``keys`` in batches and call ``one(k, raw)`` for each, on two threads."""
        row_bytes = m.shape[1] * itemsize_of(m.dtype)
        per = max(1, FETCH_BATCH_BYTES // max(1, m.chunk_rows * row_bytes))
        for i in range(0, len(keys), per):
            batch = keys[i : i + per]
            raws = read_objects([self._chunk(m, k) for k in batch], missing_ok=True)
            if len(batch) > 1:
                list(self._threads().map(one, batch, raws))
            else:
                one(batch[0], raws[0])

    def _guard_chunks(self, m: ArrayMeta, start: int, stop: int) -> None:
        """Before zarr-python decodes rows ``start:stop`` of an array actfmt does not read itself, check that
        each of their chunks decodes to at most its declared chunk size (a decompression bomb is a FormatError,
        never an allocation zarr-python would make).  Only arrays stored as ``bytes`` + one known compressor
        and no filters are checked; the others are zarr-python's alone."""
        if m.codec is None or stop <= start:
            return
        limit = m.chunk_nbytes
        cols = -(-m.shape[1] // m.chunks[1])
        keys = []
        for i in range(start // m.chunks[0], (stop - 1) // m.chunks[0] + 1):
            for j in range(cols):
                parts = ([m.prefix] if m.prefix else []) + [str(i), str(j)]
                keys.append(m.separator.join(parts))
        adir = self.location / m.name
        for lo in range(0, len(keys), 64):
            batch = keys[lo : lo + 64]
            for key, raw in zip(batch, read_objects([adir / k for k in batch], missing_ok=True), strict=True):
                if raw is None:
                    continue
                try:
                    check_decoded_size(m.codec, raw, limit)
                except ValueError as exc:
                    raise FormatError(
                        f"{adir / key}: the chunk cannot be decoded ({exc}); the store is damaged: re-convert it."
                    ) from None

    def read_array(
        self, layer: int, start: int = 0, stop: int | None = None, out: np.ndarray | None = None
    ) -> np.ndarray:
        with self._unchanged():
            return self._read_array(layer, start, stop, out)

    def _read_array(
        self, layer: int, start: int = 0, stop: int | None = None, out: np.ndarray | None = None
    ) -> np.ndarray:
        import numpy as np

        m, info = self._metas[layer], self.layers[layer]
        rows = m.shape[0]
        stop = rows if stop is None else min(stop, rows)
        start = max(0, start)
        dt = stored_dtype(info.dtype)
        if stop <= start:
            return np.empty((0, m.shape[1]), dtype=dt)
        if not m.direct:
            self._guard_chunks(m, start, stop)
            with _zarr_python(self.location / m.name):
                return self._stored(self._zarr_array(layer)[start:stop], layer)
        if m.codec is None:
            with _damaged():
                return self._row_store(layer).read(start, stop, out)
        out = scratch(out, stop - start, m.shape[1], dt)
        cr = m.chunk_rows

        def one(k: int, raw: bytes | None) -> None:
            lo, hi = max(start, k * cr), min(stop, (k + 1) * cr)
            if hi - lo == cr:  # the whole chunk lies in the output: decode straight into it
                self._decode(m, k, raw, out[lo - start : hi - start])
                return
            chunk = np.empty((cr, m.shape[1]), dtype=dt)
            self._decode(m, k, raw, chunk)
            out[lo - start : hi - start] = chunk[lo - k * cr : hi - k * cr]

        self._fetch_decode(m, list(range(start // cr, (stop - 1) // cr + 1)), one)
        return out

    def example_arrays(self, row: int) -> list[np.ndarray]:
        if all(m.direct and m.codec is None for m in self._metas):  # every layer raw: one batch of reads
            with self._unchanged(), _damaged():
                return row_across([self._row_store(pos) for pos in range(len(self._metas))], row)
        return super().example_arrays(row)

    def take_array(self, layer: int, rows: Any) -> np.ndarray:
        with self._unchanged():
            return self._take_array(layer, rows)

    def _take_array(self, layer: int, rows: Any) -> np.ndarray:
        import numpy as np

        m, info = self._metas[layer], self.layers[layer]
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if rows.size and (rows.min() < 0 or rows.max() >= m.shape[0]):
            raise IndexError(f"row index out of range for {m.shape[0]} rows of {self.location / m.name}")
        dt = stored_dtype(info.dtype)
        if rows.size == 0:
            return np.empty((0, m.shape[1]), dtype=dt)
        if m.direct and m.codec is None:
            with _damaged():
                return self._row_store(layer).take(rows)
        uniq, inverse = np.unique(rows, return_inverse=True)
        if not m.direct:
            self._guard_chunks(m, int(uniq[0]), int(uniq[-1]) + 1)
            with _zarr_python(self.location / m.name):
                got = self._stored(
                    self._zarr_array(layer).get_orthogonal_selection((uniq, slice(None))), layer
                )
        else:
            got = np.empty((uniq.size, m.shape[1]), dtype=dt)
            cr = m.chunk_rows
            which = uniq // cr
            cuts = np.flatnonzero(np.diff(which)) + 1
            groups = {int(which[sel[0]]): sel for sel in np.split(np.arange(uniq.size), cuts)}

            def one(k: int, raw: bytes | None) -> None:
                chunk = np.empty((cr, m.shape[1]), dtype=dt)
                self._decode(m, k, raw, chunk)
                sel = groups[k]
                got[sel] = chunk[uniq[sel] - k * cr]

            self._fetch_decode(m, list(groups), one)
        if uniq.size == rows.size and np.array_equal(uniq, rows):
            return got
        return got[inverse.reshape(-1)]

    def runs(self, layer: int, start: int, stop: int) -> list[ByteRun] | None:
        """The chunk byte runs holding rows ``[start, stop)`` of an uncompressed array, else ``None``."""
        m = self._metas[layer]
        if not (m.direct and m.codec is None):
            return None
        return self._row_store(layer).runs(start, stop)

    def stored_vectors(self) -> StoredVectors | None:
        import numpy as np

        group = self.location / STATS_GROUP
        metas = read_arrays(group, list(VECTOR_NAMES))
        probe = probe_group(group)
        if probe is None:
            return None
        names = list(metas)
        raws = read_objects([group / n / metas[n].chunk_key(0) for n in names])
        arrays = {}
        for n, raw in zip(names, raws, strict=True):
            m = metas[n]
            if (
                raw is None
                or m.codec is not None
                or len(raw) != m.chunks[0] * m.chunks[1] * np.dtype(m.dtype).itemsize
            ):
                return None
            arrays[n] = np.frombuffer(raw, dtype=m.dtype).reshape(m.chunks)[: m.shape[0]]
        return stored_vectors_of(arrays, group_attributes(group, probe).get("layers"))

    def own_bytes(self, layer: int) -> Iterator[memoryview] | None:
        m = self._metas[layer]
        if not (m.direct and m.codec is None and self.location.supports_mmap):
            return None
        return self._row_store(layer).mapped()

    def __enter__(self) -> ZarrReader:
        return self

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
            self._zarr_group = None
        if pool is not None:
            pool.shutdown(wait=True)
        self._stores.clear()
