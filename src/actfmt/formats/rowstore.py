"""Rows stored raw, read by one piece of code: :class:`RowStore` (segments of whole rows at known byte offsets, read
with batched :func:`~actfmt.storage.read_into` calls: ``preadv`` locally, concurrent ranged GETs remotely; its
:meth:`RowStore.runs` gives the byte runs a writer may copy in the kernel), and :class:`RowStoreReader`, a reader
whose every layer is one (a ``.pt`` shard's tensor, a safetensors file, an uncompressed zarr chunk).

This module imports neither torch nor numpy at import time.
"""

from __future__ import annotations

import abc
import bisect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

from actfmt.errors import TruncatedError
from actfmt.formats.base import ByteRun, Reader
from actfmt.formats.dtypes import scratch, stored_dtype
from actfmt.storage import Location, read_into, short_read

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

__all__ = ["SMALL_TAKE", "RowStore", "RowStoreReader", "Runs", "Segment", "row_across"]

#: Takes of at most this many rows skip the sorting and grouping of larger ones.
SMALL_TAKE = 8


def _truncated(loc: Location, got: int, want: int) -> Exception:
    return TruncatedError(
        f"{loc}: truncated (the file has {got} bytes, {want} expected); re-run the conversion."
    )


@dataclass(frozen=True)
class Segment:
    """``rows`` whole rows stored raw in ``location`` from byte ``offset`` -- or, when ``array`` is given,
    rows that had to be loaded another way (a legacy ``.pt`` shard), held in memory."""

    location: Location
    offset: int
    rows: int
    array: Any = field(default=None, compare=False, repr=False)


class Runs(list[ByteRun]):
    """The byte runs of a block of rows handed to a writer without the rows in memory, with the CRC-32 of
    their bytes when the writer asked for it (:attr:`Writer.wants_crc32`)."""

    def __init__(self, runs: Sequence[ByteRun] = (), crc32: int | None = None) -> None:
        super().__init__(runs)
        self.crc32 = crc32

    @property
    def nbytes(self) -> int:
        return sum(n for _, _, n in self)


class RowStore:
    """A layer whose rows are stored raw, in segments of whole rows (shards, files or chunks).

    ``missing_ok``: a missing file reads as zeros (a zarr chunk that was never written reads as the fill value).
    """

    def __init__(
        self, segments: Sequence[Segment], hidden_dim: int, dtype: str, missing_ok: bool = False
    ) -> None:
        import numpy as np

        self.segments = list(segments)
        self.hidden_dim = hidden_dim
        self.dtype = stored_dtype(dtype)
        self.row_bytes = hidden_dim * self.dtype.itemsize
        self.missing_ok = missing_ok
        #: ``(location, file size)`` of a single-segment store whose file ends before its declared rows (a
        #: truncated or crafted file): a read past that end fails before anything is allocated for it.
        self.short_file: tuple[Location, int] | None = None
        self.offsets = np.zeros(len(self.segments) + 1, dtype=np.int64)
        np.cumsum([s.rows for s in self.segments], out=self.offsets[1:])

    @property
    def rows(self) -> int:
        return int(self.offsets[-1])

    def _pieces(self, start: int, stop: int) -> list[tuple[int, int, int]]:
        """``(segment index, first row in it, last row + 1 in it)`` covering rows ``[start, stop)``."""
        import numpy as np

        out = []
        k = int(np.searchsorted(self.offsets, start, side="right")) - 1
        while start < stop and k < len(self.segments):
            lo, hi = int(self.offsets[k]), int(self.offsets[k + 1])
            a, b = max(start, lo), min(stop, hi)
            if a < b:
                out.append((k, a - lo, b - lo))
            start = max(start, hi)
            k += 1
        return out

    def runs(self, start: int, stop: int) -> list[ByteRun] | None:
        """The byte runs holding rows ``[start, stop)``, in order (``None`` if some rows are not stored raw)."""
        rb = self.row_bytes
        pieces = self._pieces(start, stop)
        if any(self.segments[k].array is not None for k, _, _ in pieces):
            return None
        return [
            (self.segments[k].location, self.segments[k].offset + a * rb, (b - a) * rb) for k, a, b in pieces
        ]

    def mapped(self) -> Iterator[memoryview]:
        """The layer's raw bytes, segment by segment, as views of memory maps (no copy), in row order.

        Only for stores whose every segment is a local file actfmt itself owns (the partial store it has just
        written, under its lock): a file truncated by someone else while it is mapped would kill the process
        (SIGBUS).  ``None`` segments (in memory) are yielded as they are."""
        for seg in self.segments:
            n = seg.rows * self.row_bytes
            if seg.array is not None:
                yield seg.array.data.cast("B")
                continue
            mm = seg.location.mmap() if n else None
            if mm is None:
                yield self.read(0, 0).data.cast("B")  # an empty segment
                continue
            try:
                if len(mm) < seg.offset + n:
                    raise _truncated(seg.location, len(mm), seg.offset + n)
                view = memoryview(mm)[seg.offset : seg.offset + n]
                try:
                    yield view
                finally:
                    view.release()
            finally:
                mm.close()

    def read(self, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        import numpy as np

        start, stop = max(0, start), min(max(start, stop), self.rows)
        if self.short_file is not None and stop > start:
            loc, size = self.short_file
            want = self.segments[0].offset + stop * self.row_bytes
            if want > size:
                raise short_read(loc, size, want)
        out = scratch(out, max(0, stop - start), self.hidden_dim, self.dtype)
        reqs, pos = [], 0
        for k, a, b in self._pieces(start, stop):
            seg, dst = self.segments[k], out[pos : pos + b - a]
            if seg.array is not None:
                dst[...] = seg.array[a:b]
            else:
                reqs.append((seg.location, seg.offset + a * self.row_bytes, dst.reshape(-1).view(np.uint8)))
            pos += b - a
        for ok, (_, _, buf) in zip(read_into(reqs, self.missing_ok), reqs, strict=True):
            if not ok:
                buf[:] = 0
        return out

    def _take_few(self, rows: list[int]) -> np.ndarray:
        """A few rows (an example across layers, a probe's query): one request per row, no sorting."""
        import numpy as np

        got = np.empty((len(rows), self.hidden_dim), dtype=self.dtype)
        starts = self._starts
        reqs: list[tuple[Location, int, Any]] = []
        for j, r in enumerate(rows):
            k = bisect.bisect_right(starts, r) - 1
            seg, local = self.segments[k], r - starts[k]
            if seg.array is not None:
                got[j] = seg.array[local]
            else:
                reqs.append((seg.location, seg.offset + local * self.row_bytes, got[j].view(np.uint8)))
        for ok, (_, _, buf) in zip(read_into(reqs, self.missing_ok), reqs, strict=True):
            if not ok:
                buf[:] = 0
        return got

    def row_request(self, row: int, dst: np.ndarray) -> tuple[Location, int, Any] | None:
        """The read request that fills ``dst`` with row ``row`` (``None``: copied from memory already)."""
        starts = self._starts
        k = bisect.bisect_right(starts, row) - 1
        seg, local = self.segments[k], row - starts[k]
        if seg.array is not None:
            dst[...] = seg.array[local]
            return None
        return (seg.location, seg.offset + local * self.row_bytes, dst.reshape(-1).view("u1"))

    @cached_property
    def _starts(self) -> list[int]:
        return [int(x) for x in self.offsets[:-1]] if len(self.offsets) > 1 else [0]

    def take(self, rows: np.ndarray) -> np.ndarray:
        """Rows at sorted-or-not, repeated-or-not indices; runs of nearby rows are one request each."""
        import numpy as np

        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if rows.size and (rows.min() < 0 or rows.max() >= self.rows):
            raise IndexError(f"row index out of range for {self.rows} rows")
        if rows.size <= SMALL_TAKE:
            return self._take_few(rows.tolist())
        uniq, inverse = np.unique(rows, return_inverse=True)
        got = np.empty((uniq.size, self.hidden_dim), dtype=self.dtype)
        if uniq.size == 0:
            return got[inverse.reshape(-1)]
        which = np.searchsorted(self.offsets, uniq, side="right") - 1
        reqs: list[tuple[Location, int, Any]] = []
        scatter: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        for k in np.unique(which).tolist():
            seg = self.segments[k]
            sel = np.flatnonzero(which == k)
            local = uniq[sel] - int(self.offsets[k])
            if seg.array is not None:
                got[sel] = seg.array[local]
                continue
            gap = max(1, seg.location.merge_gap // max(1, self.row_bytes))
            cuts = np.flatnonzero(np.diff(local) > gap) + 1
            for part in np.split(np.arange(sel.size), cuts):
                a, b = int(local[part[0]]), int(local[part[-1]]) + 1
                off = seg.offset + a * self.row_bytes
                if b - a == part.size:  # consecutive rows: straight into the output
                    lo = int(sel[part[0]])
                    reqs.append((seg.location, off, got[lo : lo + part.size].reshape(-1).view(np.uint8)))
                else:
                    buf = np.empty((b - a, self.hidden_dim), dtype=self.dtype)
                    reqs.append((seg.location, off, buf.reshape(-1).view(np.uint8)))
                    scatter.append((buf, sel[part], local[part] - a))
        oks = read_into(reqs, self.missing_ok)
        for ok, (_, _, buf) in zip(oks, reqs, strict=True):
            if not ok:
                buf[:] = 0
        for buf, dst, src in scatter:
            got[dst] = buf[src]
        if uniq.size == rows.size and np.array_equal(uniq, rows):
            return got
        return got[inverse.reshape(-1)]


def row_across(stores: Sequence[RowStore], row: int) -> list[np.ndarray]:
    """Row ``row`` of every store (one per layer), each ``[1, hidden_dim]``, in one batch of reads."""
    import numpy as np

    outs, reqs, owners = [], [], []
    for store in stores:
        if not 0 <= row < store.rows:
            raise IndexError(f"row {row} out of range for {store.rows} rows")
        got = np.empty((1, store.hidden_dim), dtype=store.dtype)
        req = store.row_request(row, got[0])
        if req is not None:
            reqs.append(req)
            owners.append(store)
        outs.append(got)
    oks = read_into(reqs, missing_ok=any(s.missing_ok for s in owners))
    for ok, req, store in zip(oks, reqs, owners, strict=True):
        if not ok:
            if not store.missing_ok:
                raise FileNotFoundError(f"{req[0]}: missing")
            req[2][:] = 0
    return outs


class RowStoreReader(Reader):
    """A reader whose layers are :class:`RowStore` s (every row stored raw): reads, takes and byte runs all go
    through the layer's store."""

    @abc.abstractmethod
    def row_store(self, layer: int) -> RowStore:
        """The :class:`RowStore` of layer position ``layer`` (built on first use)."""

    def read_array(
        self, layer: int, start: int = 0, stop: int | None = None, out: np.ndarray | None = None
    ) -> np.ndarray:
        store = self.row_store(layer)
        return store.read(start, store.rows if stop is None else stop, out)

    def take_array(self, layer: int, rows: Any) -> np.ndarray:
        return self.row_store(layer).take(rows)

    def example_arrays(self, row: int) -> list[np.ndarray]:
        return row_across([self.row_store(pos) for pos in range(len(self.layers))], row)

    def runs(self, layer: int, start: int, stop: int) -> list[ByteRun] | None:
        return self.row_store(layer).runs(start, stop)

    def own_bytes(self, layer: int) -> Iterator[memoryview] | None:
        store = self.row_store(layer)
        if not all(s.location.supports_mmap or s.array is not None for s in store.segments):
            return None
        return store.mapped()
