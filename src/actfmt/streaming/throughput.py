"""Measuring a stream: its throughput (:func:`measure`, ``actfmt stream``) and how well its order is mixed
(:func:`mixing`)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from actfmt.storage import PathLike
from actfmt.streaming.iterable import stream


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
