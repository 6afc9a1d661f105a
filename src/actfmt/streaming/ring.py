"""A shuffled training stream over one or more splits: :func:`stream`.

>>> s = actfmt.stream(["…/EM", "…/Neutral"], layers=15, batch_size=4096, seed=0)   # doctest: +SKIP
>>> for batch in s:                 # one epoch; the next ``for`` is the next epoch (a new order)
...     batch["x"], batch["index"], batch["label"]      # [4096, d] bf16, int64 rows, int64 split positions
>>> state = s.state_dict()          # after k batches; in a new process:
>>> s2 = actfmt.stream(...same arguments...); s2.load_state_dict(state)   # yields batch k+1, k+2, ...

**The order** is a pure function of ``(seed, epoch, the splits' geometry, block_rows, buffer_rows)``:

1. Every split is cut into *blocks* of ``block_rows`` consecutive rows, aligned to the store's chunks (a
   compressed chunk is never decoded twice).  The blocks of all splits are permuted with
   ``numpy.random.Generator(PCG64(seed + epoch))``.
2. The buffer holds ``W = buffer_rows // block_rows`` blocks.  Block ``j`` (in permuted order) has its rows
   permuted and dealt into ``W`` near-equal groups; group ``g`` goes to *slot* ``j + g``.  Slot ``s`` so holds a
   ``1/W`` share of each of the blocks ``s-W+1 .. s``, the blocks resident in the buffer while it is emitted;
   its rows are permuted once more.  (The first slot takes everything of the first ``W`` blocks that would go
   to earlier slots, the last one everything that would go to later ones, so the buffer is full at both ends.)
   The stream is the concatenation of the slots: every row exactly once per epoch, each batch drawn uniformly
   from the ``W`` blocks in the buffer.
3. Batches are consecutive slices of that global order.  A *step* takes ``batch_size * world_size`` rows;
   rank ``r`` takes the ``r``-th ``batch_size`` rows of it.  The global order does not depend on
   ``world_size``: a run resumed on another number of ranks continues the same sequence.

So the state is ``(epoch, position)`` -- rows of the epoch consumed -- and :meth:`Stream.load_state_dict`
jumps straight there: it recomputes the slot sizes (arithmetic, no data), and reads only the blocks resident at
that point.  Nothing is read from the start of the epoch.

**Reading**: two loader threads read whole blocks (``Reader.read_array`` of a row range: ``preadv`` into the
buffer for raw stores, chunk decoding straight into it otherwise) in the order the slots need them; an
assembler thread gathers each batch from the buffer with one ``numpy.take`` per batch (no Python work per
row, no OpenMP region) into output buffers recycled once the caller drops a batch, and puts it in a bounded
queue.

**Memory**: ``(W + span + 2)`` blocks of every requested layer (``span``: the blocks one batch can reach past
the buffer) plus the ``prefetch`` queue of batches.  More buffer, better mixing; see the README for figures.
"""

from __future__ import annotations

import math
import queue
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from actfmt.dataset import Split, as_locations
from actfmt.dataset import open as open_split
from actfmt.errors import ActfmtError
from actfmt.formats.base import stored_dtype
from actfmt.storage import Location, PathLike

__all__ = [
    "BLOCK_BYTES",
    "BUFFER_BYTES",
    "NORMALIZE",
    "Stream",
    "StreamError",
    "StreamReport",
    "measure",
    "mixing",
    "stream",
]

#: Default bytes per block (all requested layers of a row range): large sequential reads.
BLOCK_BYTES = 8 << 20
#: Smallest read per layer a default block makes.
MIN_READ_BYTES = 1 << 20
#: Default buffer size in bytes (all requested layers); ``buffer_rows`` overrides it.
BUFFER_BYTES = 256 << 20
#: ``normalize=`` choices (as :class:`actfmt.torch.ActivationDataset`).
NORMALIZE = (None, "scale", "standardize")
#: Blocks read at once.
LOAD_THREADS = 2
#: Format version of :meth:`Stream.state_dict`.
STATE_VERSION = 1


class StreamError(ActfmtError, ValueError):
    """A stream cannot be built, restored or read (names the split, the layer and the rows)."""


# ----------------------------------------------------------------------------------------------------------
# the order: a pure function of (seed, epoch, geometry, block rows, window)


@dataclass(frozen=True)
class Geometry:
    """Rows per split and how they are cut into blocks: what the order depends on besides seed and epoch."""

    rows: tuple[int, ...]  # per split (paired: one entry, the common row count)
    block_rows: int
    window: int  # W: blocks resident in the buffer
    shuffle: bool

    @property
    def total(self) -> int:
        return sum(self.rows)

    def blocks(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(split, start, rows)`` of every block, in storage order."""
        split, start, size = [], [], []
        for k, n in enumerate(self.rows):
            starts = np.arange(0, n, self.block_rows, dtype=np.int64)
            split.append(np.full(starts.size, k, dtype=np.int64))
            start.append(starts)
            size.append(np.minimum(self.block_rows, n - starts))
        cat = np.concatenate
        return (cat(split), cat(start), cat(size)) if split else (np.zeros(0, np.int64),) * 3

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows": list(self.rows),
            "block_rows": self.block_rows,
            "window": self.window,
            "shuffle": self.shuffle,
        }


class Plan:
    """One epoch's order (see the module docstring), computed lazily: block and slot permutations are drawn
    from per-block and per-slot seeds, so any slot is built without building the ones before it."""

    def __init__(self, geometry: Geometry, seed: int, epoch: int) -> None:
        self.geometry = geometry
        split, start, size = geometry.blocks()
        m = int(split.size)
        rng = np.random.Generator(np.random.PCG64(seed + epoch))
        order = rng.permutation(m) if geometry.shuffle else np.arange(m)
        self.block_seeds = rng.integers(0, 2**63 - 1, size=m, dtype=np.int64)
        self.slot_seeds = rng.integers(0, 2**63 - 1, size=m, dtype=np.int64)
        #: Blocks in stream order: split position, first row, rows.
        self.split, self.start, self.size = split[order], start[order], size[order]
        self.m = m
        w = min(geometry.window if geometry.shuffle else 1, max(m, 1))
        self.w = w
        self.lo, self.hi = min(w - 1, m - 1), m - 1  # slot ids
        # group g of block j: size r // w + (g < r % w), to slot clip(j + g, lo, hi)
        sizes = np.zeros(max(self.hi - self.lo + 1, 0), dtype=np.int64)
        jj = np.arange(m)
        for g in range(w if m else 0):
            gsize = self.size // w + (g < self.size % w)
            np.add.at(sizes, np.clip(jj + g, self.lo, self.hi) - self.lo, gsize)
        self.slot_sizes = sizes
        self.slot_ends = np.cumsum(self.slot_sizes)
        self._perms: dict[int, np.ndarray] = {}

    @property
    def slots(self) -> int:
        return int(self.slot_sizes.size)

    def slot_of(self, position: Any) -> Any:
        """Slot index (0-based) holding global position(s) ``position``."""
        return np.searchsorted(self.slot_ends, position, side="right")

    def slot_start(self, k: int) -> int:
        return int(self.slot_ends[k - 1]) if k else 0

    def first_block(self, k: int) -> int:
        """The first block slot ``k`` takes rows from (blocks ``first_block(k) .. k + lo`` are resident)."""
        return max(0, k + self.lo - self.w + 1)

    def group_bound(self, j: int, g: int) -> int:
        """Where group ``g`` of block ``j`` starts in the block's permuted rows (``g = w``: its end)."""
        r = int(self.size[j])
        return g * (r // self.w) + min(g, r % self.w)

    def last_block(self, k: int) -> int:
        return k + self.lo

    def last_use(self, j: int) -> int:
        """The last slot (0-based) that takes rows of block ``j``."""
        return int(np.clip(j + self.w - 1, self.lo, self.hi)) - self.lo

    def block_perm(self, j: int) -> np.ndarray:
        perm = self._perms.get(j)
        if perm is None:
            n = int(self.size[j])
            if self.geometry.shuffle:
                perm = np.random.Generator(np.random.PCG64(int(self.block_seeds[j]))).permutation(n)
            else:
                perm = np.arange(n, dtype=np.int64)
            self._perms[j] = perm
        return perm

    def forget(self, j: int) -> None:
        self._perms.pop(j, None)

    def slot(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Slot ``k`` in stream order: ``(block j, row within the block)`` of each of its rows."""
        s = k + self.lo
        blocks, locals_ = [], []
        for j in range(self.first_block(k), s + 1):
            g_lo = 0 if s == self.lo else s - j
            g_hi = self.w - 1 if s == self.hi else s - j
            g_lo, g_hi = max(g_lo, 0), min(g_hi, self.w - 1)
            if g_lo > g_hi:
                continue
            a, b = self.group_bound(j, g_lo), self.group_bound(j, g_hi + 1)
            if b > a:
                locals_.append(self.block_perm(j)[a:b])
                blocks.append(np.full(b - a, j, dtype=np.int64))
        if not blocks:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        blk, loc = np.concatenate(blocks), np.concatenate(locals_)
        if self.geometry.shuffle:
            p = np.random.Generator(np.random.PCG64(int(self.slot_seeds[s]))).permutation(blk.size)
            blk, loc = blk[p], loc[p]
        return blk, loc


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


# ----------------------------------------------------------------------------------------------------------
# the stream


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


class Stream(IterableDataset):  # type: ignore[type-arg]
    """An iterable of batches (see the module docstring and :func:`stream`).  Each ``iter()`` runs the rest of
    the current epoch; the next one starts the next epoch.  Picklable (files reopened in each process)."""

    def __init__(
        self,
        paths: Sequence[PathLike | Split] | PathLike | Split,
        layers: int | Sequence[int],
        batch_size: int = 4096,
        shuffle: bool = True,
        seed: int = 0,
        *,
        buffer_rows: int | None = None,
        block_rows: int | None = None,
        drop_last: bool = False,
        paired: bool = False,
        dtype: torch.dtype | None = None,
        normalize: str | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        prefetch: int = 2,
        pin_memory: bool = False,
        device: str | torch.device | None = None,
    ) -> None:
        if isinstance(paths, (str, bytes)) or not isinstance(paths, Sequence):
            paths = [paths]  # type: ignore[list-item]
        if not paths:
            raise StreamError("stream: give at least one split.")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if normalize not in NORMALIZE:
            raise ValueError(f"normalize={normalize!r}: choose one of {', '.join(map(repr, NORMALIZE))}")
        if prefetch < 1:
            raise ValueError(f"prefetch must be at least 1, got {prefetch}")
        self.locations = as_locations(list(paths))  # type: ignore[arg-type]
        self.one_layer = isinstance(layers, (int, np.integer))
        self.layers = [int(layers)] if isinstance(layers, (int, np.integer)) else [int(i) for i in layers]
        if not self.layers:
            raise StreamError("stream: give at least one layer.")
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.drop_last = drop_last
        self.paired = paired
        self.dtype = dtype
        self.normalize = normalize
        self.prefetch = int(prefetch)
        self.pin_memory = pin_memory
        self.device = torch.device(device) if device is not None else None
        self._rank, self._world = rank, world_size
        if paired and len(self.locations) < 2:
            raise StreamError("stream: paired=True needs two or more splits (row i of each together).")
        self._describe()
        self._norm = self._normalization() if normalize else None
        align = self._align
        per_row = self.row_bytes * len(self.layers) * self.width
        if block_rows is None:
            block_rows = max(BLOCK_BYTES // max(per_row, 1), MIN_READ_BYTES // max(self.row_bytes, 1), 1)
            block_rows = max(align, block_rows // align * align)
        if block_rows <= 0:
            raise ValueError(f"block_rows must be positive, got {block_rows}")
        if buffer_rows is None:
            buffer_rows = max(block_rows, BUFFER_BYTES // max(per_row, 1))
        if buffer_rows <= 0:
            raise ValueError(f"buffer_rows must be positive, got {buffer_rows}")
        rows = (self.sources[0].rows,) if paired else tuple(s.rows for s in self.sources)
        self.geometry = Geometry(rows, int(block_rows), max(1, int(buffer_rows) // int(block_rows)), shuffle)
        #: Split names (their last path component), in the order given: ``label`` k is ``splits[k]``.
        self.splits = [loc.name for loc in self.locations]
        self.epoch = 0
        self.position = 0  # rows of the epoch's global order consumed
        self.batches = 0  # batches this rank took in the epoch
        self.counters = _Counters()
        self._readers: list[Split] | None = None
        self._kept: dict[str, Any] = {}  # the ring and the output pools, kept from one epoch to the next

    # -- description ------------------------------------------------------------------------------------
    def _describe(self) -> None:
        self.sources: list[_Source] = []
        align = 1
        dt = width = None
        for loc in self.locations:
            with open_split(loc) as s:
                for li in self.layers:
                    try:
                        view = s.layer(li)
                    except IndexError as exc:
                        raise StreamError(f"stream: {exc}") from None
                    rows, d = view.shape
                    if dt is None:
                        dt, width = view.info.dtype, d
                    elif (view.info.dtype, d) != (dt, width):
                        raise StreamError(
                            f"{loc}: {view.name} is {view.info.dtype} x {d}, but the stream's first layer is "
                            f"{dt} x {width}: stream layers of one dtype and width."
                        )
                    if li == self.layers[0]:
                        n = rows
                    elif rows != n:
                        raise StreamError(
                            f"{loc}: {view.name} has {rows} rows, layer_{self.layers[0]:02d} has {n}."
                        )
                    cr = s._reader.chunk_rows_of(s._by_index[view.index])
                    if cr:  # whole chunks per block (a compressed chunk is decoded once)
                        lcm = math.lcm(align, int(cr))
                        align = lcm if lcm <= 1 << 16 else max(align, int(cr))
                self.sources.append(_Source(loc, n))
        if self.paired and len({s.rows for s in self.sources}) > 1:
            raise StreamError(
                "stream: paired=True needs splits of equal length, got "
                + ", ".join(f"{s.location.name}: {s.rows}" for s in self.sources)
            )
        assert dt is not None and width is not None
        self.stored = dt
        self.hidden_dim = int(width)
        self.row_bytes = int(width) * stored_dtype(dt).itemsize
        self.width = len(self.sources) if self.paired else 1  # splits read per block
        self._align = align

    def _normalization(self) -> _Norm:
        """As :class:`actfmt.torch.ActivationDataset` (``layer.stats()``, ``mean()``, ``std()``), per layer."""
        scales, centers, spreads = [], [], []
        for li in self.layers:
            figures: list[Any] = []
            for loc in self.locations:
                with open_split(loc) as s:
                    view = s.layer(li)
                    if self.normalize == "scale":
                        figures.append(view.stats())
                    else:
                        figures.append((len(view), view.mean().double(), view.std().double()))
            if self.normalize == "scale":
                rows = sum(f.rows for f in figures)
                norm = sum(f.row_norm_mean * f.rows for f in figures) / rows if rows else 0.0
                scales.append(math.sqrt(self.hidden_dim) / norm if norm else 1.0)
            else:
                n = sum(f[0] for f in figures)
                mean = sum(f[0] * f[1] for f in figures) / max(n, 1)
                var = sum(f[0] * (f[2] ** 2 + (f[1] - mean) ** 2) for f in figures) / max(n, 1)
                std = var.sqrt()
                centers.append(mean.float())
                spreads.append(torch.where(std > 0, std, torch.ones_like(std)).float())
        if self.normalize == "scale":
            return _Norm(scale=torch.tensor(scales, dtype=torch.float32))
        return _Norm(center=torch.stack(centers), spread=torch.stack(spreads))

    @property
    def block_rows(self) -> int:
        return self.geometry.block_rows

    @property
    def buffer_rows(self) -> int:
        return self.geometry.window * self.geometry.block_rows

    @property
    def total_rows(self) -> int:
        """Rows per epoch, all ranks together (before ``drop_last``)."""
        return self.geometry.total

    def ranks(self) -> tuple[int, int]:
        """``(rank, world_size)`` of this process (``DataLoader`` workers count as ranks of their own)."""
        rank, world = self._rank, self._world
        if rank is None or world is None:
            dist = torch.distributed
            if dist.is_available() and dist.is_initialized():
                rank = dist.get_rank() if rank is None else rank
                world = dist.get_world_size() if world is None else world
        rank, world = rank or 0, world or 1
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} out of range for world_size {world}")
        info = get_worker_info()
        if info is not None:
            rank, world = rank * info.num_workers + info.id, world * info.num_workers
        return rank, world

    def _end(self, world: int) -> int:
        step = self.batch_size * world
        n = self.geometry.total
        return n // step * step if self.drop_last else n

    def __len__(self) -> int:
        """Batches this rank yields in a full epoch."""
        rank, world = self.ranks()
        end, step = self._end(world), self.batch_size * world
        full, rest = divmod(end, step)
        return full + (1 if rest > rank * self.batch_size else 0)

    # -- state ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """``epoch`` and ``position`` (rows of the epoch's global order consumed), with what the order depends on
        (checked when loaded).  Small; the same on every rank."""
        _, world = self.ranks()
        epoch, position = self.epoch, self.position
        if position >= self._end(world):
            epoch, position = epoch + 1, 0
        return {
            "version": STATE_VERSION,
            "epoch": epoch,
            "position": position,
            "seed": self.seed,
            "geometry": self.geometry.to_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue where ``state`` (from :meth:`state_dict`, any world size) left off."""
        if state.get("version") != STATE_VERSION:
            raise StreamError(
                f"stream state version {state.get('version')!r}: this actfmt reads {STATE_VERSION}."
            )
        if state.get("seed") != self.seed or state.get("geometry") != self.geometry.to_dict():
            raise StreamError(
                "stream state was saved for another order "
                f"(seed {state.get('seed')}, {state.get('geometry')}; this stream: seed {self.seed}, "
                f"{self.geometry.to_dict()}): build the stream with the same splits, layers, seed, "
                "block_rows and buffer_rows."
            )
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self.batches = 0

    def set_epoch(self, epoch: int) -> None:
        """Start epoch ``epoch`` at its beginning (with ``DataLoader`` workers, which get copies of the stream,
        call this before each epoch, as with ``DistributedSampler``)."""
        self.epoch, self.position, self.batches = int(epoch), 0, 0

    def order(self, epoch: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The epoch's global order without reading data: ``(split position, row)`` of every row (tests, mixing)."""
        plan = Plan(self.geometry, self.seed, self.epoch if epoch is None else epoch)
        blk = [plan.slot(k) for k in range(plan.slots)]
        if not blk:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        j = np.concatenate([b for b, _ in blk])
        loc = np.concatenate([r for _, r in blk])
        return plan.split[j], plan.start[j] + loc

    # -- pickling ---------------------------------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_readers"] = None
        state["_kept"] = {}
        return state

    def close(self) -> None:
        for r in self._readers or []:
            r.close()
        self._readers = None
        self._kept = {}

    def _open(self) -> list[Split]:
        if self._readers is None:
            self._readers = [open_split(loc) for loc in self.locations]
        return self._readers

    # -- iteration --------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict[str, Any]]:
        rank, world = self.ranks()
        end = self._end(world)
        if self.position >= end:
            self.epoch, self.position, self.batches = self.epoch + 1, 0, 0
            return
        run = _Run(self, rank, world, end)
        try:
            while True:
                item = run.get()
                if item is None:
                    break
                batch, position = item
                self.position = position
                self.batches += 1
                yield batch
            self.epoch, self.position, self.batches = self.epoch + 1, 0, 0
        finally:
            run.stop()


class _Run:
    """One pass over the rest of an epoch: a loader thread (blocks into the ring) and an assembler thread
    (batches out of it), a bounded queue between the assembler and the caller."""

    def __init__(self, s: Stream, rank: int, world: int, end: int) -> None:
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


def stream(
    paths: Sequence[PathLike | Split] | PathLike | Split,
    layers: int | Sequence[int],
    batch_size: int = 4096,
    shuffle: bool = True,
    seed: int = 0,
    **options: Any,
) -> Stream:
    """A shuffled stream of batches over ``paths`` (one or more splits, any format, local or fsspec URLs).

    ``layers``: one layer index (``x`` is ``[batch, d]``) or a list (``x`` is ``[batch, n_layers, d]``).  Each
    batch is a dict: ``x`` (stored dtype: bfloat16 stays bfloat16), ``index`` (int64 row numbers in their
    split), and with several splits ``label`` (int64: the split's position in ``paths``; names in
    ``Stream.splits``).  ``paired=True``: row i of every split together, ``x`` ``[batch, n_splits, d]`` (or
    ``[batch, n_splits, n_layers, d]``), ``x[:, k]`` from ``paths[k]``, no ``label``.

    Options: ``buffer_rows`` (default: :data:`BUFFER_BYTES` worth), ``block_rows`` (default:
    :data:`BLOCK_BYTES` worth, a multiple of the store's chunk rows), ``drop_last``, ``dtype``,
    ``normalize`` (``"scale"``: times ``sqrt(d) / mean row norm``; ``"standardize"``: minus the mean over the
    std; both per layer from the statistics kept with the data, as ``ActivationDataset``; float32),
    ``rank``/``world_size`` (default: ``torch.distributed``), ``prefetch`` (batches queued), ``pin_memory``,
    ``device``.  See :class:`Stream` for ``state_dict`` / ``load_state_dict`` / ``set_epoch``.
    """
    return Stream(paths, layers, batch_size, shuffle, seed, **options)


# ----------------------------------------------------------------------------------------------------------
# measuring


def mixing(
    split: np.ndarray, rows: np.ndarray, block_rows: int, batch_size: int, offsets: Sequence[int]
) -> dict[str, float]:
    """How well an order is mixed: ``corr``, the mean |Pearson correlation| between position in the stream and
    the row's place in storage (0: no trace of storage order; 1: in order), and ``same_block``, the chance that
    two rows of one batch come from the same block, divided by what a full shuffle gives (1: as good as a
    full shuffle; ``batch_size`` -- every pair from one block -- at worst)."""
    n = rows.size
    if n < 2:
        return {"corr": 0.0, "same_block": 1.0}
    glob = np.asarray(offsets, dtype=np.int64)[split] + rows
    pos = np.arange(n, dtype=np.float64)
    corr = abs(float(np.corrcoef(pos, glob.astype(np.float64))[0, 1])) if glob.std() else 0.0
    block = split * (1 << 40) + rows // block_rows
    _, block = np.unique(block, return_inverse=True)
    m = int(block.max()) + 1
    pairs = same = 0.0
    for a in range(0, n, batch_size):
        b = block[a : a + batch_size]
        if b.size < 2:
            continue
        c = np.bincount(b, minlength=m).astype(np.float64)
        same += float((c * (c - 1)).sum())
        pairs += b.size * (b.size - 1)
    sizes = np.bincount(block, minlength=m).astype(np.float64)
    uniform = float((sizes * (sizes - 1)).sum()) / (n * (n - 1))
    return {"corr": corr, "same_block": (same / pairs) / uniform if pairs and uniform else 1.0}


@dataclass
class StreamReport:
    """What :func:`measure` saw: rows and bytes of ``x`` delivered, seconds, and the mixing of the order."""

    rows: int
    bytes: int
    seconds: float
    batches: int
    epochs: int
    buffer_rows: int
    block_rows: int
    mixing: dict[str, float]
    first_batch_seconds: float

    @property
    def gb_per_s(self) -> float:
        return self.bytes / self.seconds / 1e9 if self.seconds else 0.0

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "bytes": self.bytes,
            "seconds": self.seconds,
            "batches": self.batches,
            "epochs": self.epochs,
            "gb_per_s": self.gb_per_s,
            "rows_per_s": self.rows_per_s,
            "buffer_rows": self.buffer_rows,
            "block_rows": self.block_rows,
            "mixing": self.mixing,
            "first_batch_seconds": self.first_batch_seconds,
        }


def measure(
    paths: Sequence[PathLike] | PathLike, layers: int | Sequence[int], epochs: int = 1, **options: Any
) -> StreamReport:
    """Stream ``epochs`` epochs of ``paths`` and time it (``actfmt stream``): ``x`` bytes and rows delivered per
    second, and the mixing of the first epoch's order (:func:`mixing`)."""
    s = stream(paths, layers, **options)
    rows = nbytes = batches = 0
    first = 0.0
    splits: list[np.ndarray] = []
    idx: list[np.ndarray] = []
    t0 = time.perf_counter()
    try:
        for e in range(epochs):
            for batch in s:
                x = batch["x"]
                if not first:
                    first = time.perf_counter() - t0
                rows += x.shape[0]
                nbytes += x.numel() * x.element_size()
                batches += 1
                if e == 0:
                    idx.append(batch["index"].numpy().copy())
                    lab = batch.get("label")
                    splits.append(lab.numpy().copy() if lab is not None else np.zeros(x.shape[0], np.int64))
    finally:
        seconds = time.perf_counter() - t0
        s.close()
    offsets = np.concatenate([[0], np.cumsum(s.geometry.rows)])[:-1].tolist()
    mix = (
        mixing(np.concatenate(splits), np.concatenate(idx), s.block_rows, s.batch_size, offsets)
        if idx
        else {"corr": 0.0, "same_block": 1.0}
    )
    return StreamReport(rows, nbytes, seconds, batches, epochs, s.buffer_rows, s.block_rows, mix, first)
