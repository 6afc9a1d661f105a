"""The reading side of a stream: a ring of blocks filled by loader threads and emptied by an assembler thread into
recycled output buffers, a bounded queue of batches between it and the caller (:class:`_Run`, one per
``iter()``)."""

from __future__ import annotations

import queue
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from actfmt.dataset import Split
from actfmt.errors import ActfmtError
from actfmt.formats.dtypes import stored_dtype
from actfmt.storage import Location
from actfmt.streaming.plan import LOAD_THREADS, Geometry, Plan, StreamError

# ----------------------------------------------------------------------------------------------------------
# output buffers recycled once the caller lets go of them


class _Pool:
    """Output arrays handed out as tensors (``torch.from_numpy``: the tensor's storage holds the array), taken
    back once nothing else refers to the array: no fresh pages (page faults cost more than the gather)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.arrays: list[np.ndarray] = []

    def get(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        for i in range(len(self.arrays)):
            # 2: the list and getrefcount's argument.  Anything more: a batch (or a view of it) still alive.
            if sys.getrefcount(self.arrays[i]) == 2:
                arr = self.arrays[i]
                if arr.shape == shape and arr.dtype == dtype:
                    return arr
        arr = _fresh(shape, dtype)
        if len(self.arrays) < self.limit:
            self.arrays.append(arr)
        else:  # all busy: replace a free one of the wrong shape, else hand out an unpooled array
            for i in range(len(self.arrays)):
                if sys.getrefcount(self.arrays[i]) == 2:
                    self.arrays[i] = arr
                    break
        return arr


def _fresh(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """A new array with its pages faulted in here, a write per page: numpy asks for huge pages, and faults taken
    by the kernel's copy in ``preadv`` (4 KiB each) cost ~10x more than faulting the memory first."""
    arr = np.empty(shape, dtype=dtype)
    arr.reshape(-1).view(np.uint8)[::4096] = 0
    return arr


def _tensor(arr: np.ndarray, dtype: str) -> torch.Tensor:
    """A stored-dtype array as a tensor of the real dtype, sharing memory (bfloat16 bits viewed back)."""
    if dtype == "bfloat16":
        return torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(arr)


@dataclass
class _Source:
    """One split as the stream reads it (picklable: a location, layer positions resolved per process)."""

    location: Location
    rows: int


@dataclass
class _Norm:
    """Per-layer normalisation: ``scale`` ``[L]`` or ``center``/``spread`` ``[L, d]`` float32."""

    scale: torch.Tensor | None = None
    center: torch.Tensor | None = None
    spread: torch.Tensor | None = None


@dataclass
class _Counters:
    blocks_read: int = 0
    rows_read: int = 0
    bytes_read: int = 0
    read_seconds: float = 0.0
    first_block: int | None = None  # the first block (stream order) this iteration read
    extra: dict[str, Any] = field(default_factory=dict)


class _Streamed(Protocol):
    """What a run reads of its :class:`~actfmt.streaming.Stream` (the settings, the order, what it keeps)."""

    locations: list[Location]
    layers: list[int]
    one_layer: bool
    paired: bool
    batch_size: int
    seed: int
    epoch: int
    position: int
    prefetch: int
    pin_memory: bool
    device: torch.device | None
    dtype: torch.dtype | None
    geometry: Geometry
    stored: str
    hidden_dim: int
    row_bytes: int
    width: int
    counters: _Counters
    _norm: _Norm | None
    _kept: dict[str, Any]

    def _open(self) -> list[Split]: ...


class _Run:
    """One pass over the rest of an epoch: a loader thread (blocks into the ring) and an assembler thread
    (batches out of it), a bounded queue between the assembler and the caller."""

    def __init__(self, s: _Streamed, rank: int, world: int, end: int) -> None:
        self.s = s
        self.rank, self.world, self.end = rank, world, end
        self.plan = plan = Plan(s.geometry, s.seed, s.epoch)
        self.step = s.batch_size * world
        self.start = s.position
        # this rank's batches: [a, b) global positions
        steps = np.arange(self.start, end, self.step, dtype=np.int64)
        a = np.minimum(steps + rank * s.batch_size, end)
        b = np.minimum(a + s.batch_size, end)
        keep = b > a
        self.batch_a, self.batch_b, self.batch_next = (
            a[keep],
            b[keep],
            np.minimum(steps + self.step, end)[keep],
        )
        # ring: blocks resident at once = the window + what one step spans past its first slot + 2 ahead
        if steps.size:
            first = np.maximum(plan.slot_of(steps) + plan.lo - plan.w + 1, 0)
            last = plan.slot_of(np.minimum(steps + self.step, end) - 1) + plan.lo
            span = int(np.max(last - first)) + 1
        else:
            span = 1
        self.capacity = cap = min(max(plan.m, 1), span + 2)
        g = s.geometry
        self.cap_rows = g.block_rows
        shape = (s.width, len(s.layers), cap * g.block_rows, s.hidden_dim)
        kept = s._kept.get("ring")
        if kept is None or kept.shape != shape:  # an epoch's ring is the next one's
            kept = s._kept["ring"] = None
            kept = s._kept["ring"] = _fresh(shape, stored_dtype(s.stored))
        self.ring = kept
        self.forgotten = 0  # block permutations below this are dropped
        self.occupant = [-1] * cap
        self.cond = threading.Condition()
        self.loaded: set[int] = set()
        self.low_slot = int(plan.slot_of(self.start)) if steps.size else 0  # slots below are done
        self.error: BaseException | None = None
        self.stopping = False
        self.queue: queue.Queue[Any] = queue.Queue(maxsize=s.prefetch)
        self.pool = s._kept.setdefault("pool", _Pool(limit=s.prefetch + 4))
        self.fpool = s._kept.setdefault("fpool", _Pool(limit=s.prefetch + 4))
        # blocks needed, in order: from the first block of the first slot still wanted
        if steps.size:
            k0 = int(plan.slot_of(self.start))
            first = plan.first_block(k0)
            blk, _ = plan.slot(k0)
            offset = self.start - plan.slot_start(k0)
            still = set(blk[offset:].tolist())
            while first < plan.last_block(k0) and first not in still and plan.last_use(first) <= k0:
                first += 1  # its rows in this slot were all consumed before the restore point
            self.first_block = first
        else:
            self.first_block = plan.m
        s.counters.first_block = self.first_block
        self.next_block = self.first_block
        self.last_block = plan.last_block(int(plan.slot_of(self.end - 1))) if steps.size else -1
        self.open_lock = threading.Lock()
        self.threads = [
            *(
                threading.Thread(target=self._load, name=f"actfmt-stream-load-{k}", daemon=True)
                for k in range(LOAD_THREADS)
            ),
            threading.Thread(target=self._assemble, name="actfmt-stream-assemble", daemon=True),
        ]
        self.cuda_stream = None
        if s.device is not None and s.device.type == "cuda" and torch.cuda.is_available():  # pragma: no cover
            self.cuda_stream = torch.cuda.Stream(s.device)
        for t in self.threads:
            t.start()

    # -- loader -----------------------------------------------------------------------------------------
    def _load(self) -> None:
        """One of :data:`LOAD_THREADS` loaders: take the next block in stream order, wait for its ring slot to be
        free (the block there no longer needed), read it.  Two reads in flight keep a disk busy (a cold epoch) and
        let two cores copy from the page cache."""
        plan = self.plan
        try:
            with self.open_lock:
                readers = self.s._open()
            positions = [[r._by_index[li] for li in self.s.layers] for r in readers]
            while True:
                with self.cond:
                    j = self.next_block
                    if j > self.last_block:
                        return
                    self.next_block += 1
                    ring = j % self.capacity
                    # the slot's previous block must be j - capacity (another loader may be far ahead: it must
                    # not take the slot before block j has had it) and no longer needed
                    before = j - self.capacity if j - self.capacity >= self.first_block else -1
                    while not self.stopping:
                        occ = self.occupant[ring]
                        # and read: a block still being read by the other loader is not free, even when no
                        # batch of this rank needs it (its read would land on top of the new one)
                        if occ == before and (
                            occ < 0 or (occ in self.loaded and plan.last_use(occ) < self.low_slot)
                        ):
                            break
                        self.cond.wait()
                    if self.stopping:
                        return
                    if self.occupant[ring] >= 0:
                        self.loaded.discard(self.occupant[ring])
                    self.occupant[ring] = j
                self._read_block(readers, positions, j, ring)
                with self.cond:
                    self.loaded.add(j)
                    self.cond.notify_all()
        except BaseException as exc:  # handed to the caller
            with self.cond:
                self.error = exc
                self.cond.notify_all()

    def _read_block(self, readers: list[Split], positions: list[list[int]], j: int, ring: int) -> None:
        plan, s = self.plan, self.s
        split, start, n = int(plan.split[j]), int(plan.start[j]), int(plan.size[j])
        which = range(s.width) if s.paired else [split]
        t0 = time.perf_counter()
        lo = ring * self.cap_rows
        for p_out, p in enumerate(which):
            reader = readers[p]._reader
            for l_out, pos in enumerate(positions[p]):
                dst = self.ring[0 if not s.paired else p_out, l_out, lo : lo + n]
                try:
                    got = reader.read_array(pos, start, start + n, out=dst)
                    if got.shape != dst.shape:
                        raise StreamError(f"{got.shape[0]} rows came back")
                    if got.__array_interface__["data"][0] != dst.__array_interface__["data"][0]:
                        dst[...] = got
                except (ActfmtError, OSError, ValueError, RuntimeError) as exc:
                    name = reader.layers[pos].name
                    raise StreamError(
                        f"{s.locations[p]}: {name}: rows {start}-{start + n - 1} cannot be read: {exc}"
                    ) from exc
        with self.cond:
            self._count(n * len(which), time.perf_counter() - t0)

    def _count(self, rows: int, seconds: float) -> None:
        s = self.s
        c = s.counters
        c.blocks_read += 1
        c.rows_read += rows
        c.bytes_read += rows * len(s.layers) * s.row_bytes
        c.read_seconds += seconds

    # -- assembler --------------------------------------------------------------------------------------
    def _assemble(self) -> None:
        plan = self.plan
        slots: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        try:
            for a, b, nxt in zip(
                self.batch_a.tolist(), self.batch_b.tolist(), self.batch_next.tolist(), strict=True
            ):
                k_a, k_b = int(plan.slot_of(a)), int(plan.slot_of(b - 1))
                with self.cond:
                    self.low_slot = k_a
                    self.cond.notify_all()
                    need = range(max(plan.first_block(k_a), self.first_block), plan.last_block(k_b) + 1)
                    while (
                        not self.stopping and self.error is None and not all(j in self.loaded for j in need)
                    ):
                        self.cond.wait()
                    if self.stopping:
                        return
                    if self.error is not None:
                        raise self.error
                for k in [k for k in slots if k < k_a]:
                    del slots[k]
                parts_b, parts_l = [], []
                for k in range(k_a, k_b + 1):
                    if k not in slots:
                        slots[k] = plan.slot(k)
                    base = plan.slot_start(k)
                    lo, hi = max(a - base, 0), min(b - base, int(plan.slot_sizes[k]))
                    parts_b.append(slots[k][0][lo:hi])
                    parts_l.append(slots[k][1][lo:hi])
                for j in range(self.forgotten, plan.first_block(k_a)):
                    plan.forget(j)
                self.forgotten = max(self.forgotten, plan.first_block(k_a))
                blk = np.concatenate(parts_b) if len(parts_b) > 1 else parts_b[0]
                loc = np.concatenate(parts_l) if len(parts_l) > 1 else parts_l[0]
                batch = self._batch(blk, loc)
                self._put((batch, nxt))
            self._put(None)
        except BaseException as exc:  # handed to the caller
            self._put(exc)

    def _put(self, item: Any) -> None:
        while not self.stopping:
            try:
                self.queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def _batch(self, blk: np.ndarray, loc: np.ndarray) -> dict[str, Any]:
        plan, s = self.plan, self.s
        n = blk.size
        width, nl, d = s.width, len(s.layers), s.hidden_dim
        addr = (blk % self.capacity) * self.cap_rows + loc
        sub = width * nl
        plane = self.capacity * self.cap_rows
        if sub == 1:
            flat = addr
        else:
            flat = (addr[:, None] + (np.arange(sub, dtype=np.int64) * plane)[None, :]).reshape(-1)
        out = self.pool.get((n, width, nl, d), self.ring.dtype)
        # numpy's take, one thread, no OpenMP: on a busy machine torch.index_select's parallel region waits for
        # a descheduled worker at its barrier (0.04 GB/s measured on 2 loaded cores, 40 GB/s with one thread).
        # mode="clip": every index is valid; "raise" would copy through a temporary buffer.
        np.take(self.ring.reshape(-1, d), flat, axis=0, out=out.reshape(-1, d), mode="clip")
        x = self._convert(out)
        if s.paired:
            shape: tuple[int, ...] = (n, width, d) if s.one_layer else (n, width, nl, d)
        else:
            shape = (n, d) if s.one_layer else (n, nl, d)
        batch: dict[str, Any] = {"x": x.view(shape), "index": torch.from_numpy(plan.start[blk] + loc)}
        if len(s.locations) > 1 and not s.paired:
            batch["label"] = torch.from_numpy(plan.split[blk])
        if self.cuda_stream is not None:  # pragma: no cover - no GPU on the test machines
            with torch.cuda.stream(self.cuda_stream):
                batch = {
                    k: (v.pin_memory() if s.pin_memory else v).to(s.device, non_blocking=True)
                    for k, v in batch.items()
                }
            event = torch.cuda.Event()
            event.record(self.cuda_stream)
            batch["_event"] = event
        elif s.pin_memory and torch.cuda.is_available():  # pragma: no cover
            batch = {k: v.pin_memory() for k, v in batch.items()}
        return batch

    def _convert(self, out: np.ndarray) -> torch.Tensor:
        """The batch as a tensor of the stored dtype, or cast / normalised to float32 in numpy (one thread,
        as the gather: no OpenMP region on the assembler's thread), any other ``dtype=`` by torch."""
        s = self.s
        norm = s._norm
        x = _tensor(out, s.stored)
        if norm is None and (s.dtype is None or s.dtype == x.dtype):
            return x
        if norm is None and s.dtype != torch.float32:
            return x.to(s.dtype)
        y = self.fpool.get(out.shape, np.dtype(np.float32))
        if s.stored == "bfloat16":  # bfloat16 -> float32 exactly: the bits are the high half
            np.left_shift(out.view(np.uint16), 16, out=y.view(np.uint32), dtype=np.uint32)
        else:
            y[...] = out
        if (
            norm is not None
        ):  # [n, width, L, d]: per layer; float32 arithmetic, as ActivationDataset's torch ops
            if norm.scale is not None:
                np.multiply(y, norm.scale.numpy().reshape(1, 1, -1, 1), out=y)
            elif norm.center is not None and norm.spread is not None:
                np.subtract(y, norm.center.numpy()[None, None], out=y)
                np.divide(y, norm.spread.numpy()[None, None], out=y)
        t = torch.from_numpy(y)
        return t if s.dtype is None or s.dtype == torch.float32 else t.to(s.dtype)

    # -- caller side ------------------------------------------------------------------------------------
    def get(self) -> tuple[dict[str, Any], int] | None:
        item = self.queue.get()
        if isinstance(item, BaseException):
            raise item
        if item is not None and "_event" in item[0]:  # pragma: no cover
            torch.cuda.current_stream(self.s.device).wait_event(item[0].pop("_event"))
        return item  # type: ignore[no-any-return]

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        while True:
            try:
                self.queue.get_nowait()
            except queue.Empty:
                break
        for t in self.threads:
            t.join(timeout=5)
