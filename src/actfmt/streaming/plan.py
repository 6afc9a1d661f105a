"""The order of a stream: a pure function of ``(seed, epoch, the splits' geometry, block_rows, buffer_rows)``
(the steps are in the :mod:`actfmt.streaming` docstring), and the stream's defaults and error."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from actfmt.errors import ActfmtError

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
