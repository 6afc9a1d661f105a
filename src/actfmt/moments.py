"""Per-layer statistics of activations, exact and out-of-core: ``actfmt stats`` and :func:`stats`.

For each split and layer (definitions in the README, "Statistics"):

* ``rows``, ``nonfinite`` (NaN and ±Inf values, counted and left out of everything else), ``zero_rows``;
* ``mean_norm`` = ‖μ‖₂ of the per-dimension mean μ, ``rms`` = √(mean of x²), ``std`` = √(mean over dimensions
  of the per-dimension population variance), ``abs_max``;
* ``row_norm_mean`` and ``row_norm_max`` of the row norms ‖xᵢ‖₂ (rows holding a non-finite value left out),
  and ``scale_factor`` = √hidden_dim / row_norm_mean (SAELens' normalisation constant).

For each pair of sibling splits ``a`` / ``b`` of one dataset (EM is always ``a``; otherwise alphabetical), per
layer, along w = (μa - μb) / ‖μa - μb‖: ``diff_of_means_norm``, ``cosine_of_means``, ``cohens_d`` and
``midpoint_accuracy`` (the diff-in-means probe).

Values are accumulated in float64 from the stored values (bfloat16 / float16 / float32 are exact in float64),
in blocks of rows merged exactly (Chan et al.'s pairwise update of mean and M2 per dimension), so the result does
not depend on block size, thread count or executor beyond float64 rounding.  One pass gives the per-split
figures; a second pass, for pairs only, projects every row on w.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from actfmt.checksum import scan_blocks
from actfmt.kernel import BITS, BlockFigures, Sums, as_float64, block_moments

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

    from actfmt.formats.base import Reader

__all__ = [
    "LAYER_FIELDS",
    "PAIR_FIELDS",
    "SCHEMA_VERSION",
    "LayerStats",
    "Moments",
    "PairStats",
    "Projection",
    "RowNorms",
    "layer_moments",
    "pair_order",
]

#: Version of the JSON document ``actfmt stats --output-format json`` writes (and of the ``stats`` entry of a
#: store's ``actfmt`` block).
SCHEMA_VERSION = 1
#: Rows converted to float64 at a time by :class:`Projection`: a sub-block stays in the CPU's cache.
SUB_ROWS = 64
#: Rows a conversion collects before folding them in (a block's sums are merged once).
BATCH_ROWS = 1024
_BITS = BITS
_as_float64 = as_float64


class Moments:
    """Mergeable per-layer accumulators: per-dimension count, mean and M2, and the row-norm and extreme
    figures.  ``update`` with blocks of rows in any order, ``merge`` partial results in any grouping."""

    def __init__(self, hidden: int) -> None:
        import numpy as np

        self.hidden = hidden
        self.rows = 0
        self.count = np.zeros(hidden, dtype=np.int64)  # finite values per dimension
        self.mean = np.zeros(hidden, dtype=np.float64)
        self.m2 = np.zeros(hidden, dtype=np.float64)
        self.nonfinite = 0
        self.zero_rows = 0
        self.norm_rows = 0  # rows whose values are all finite
        self.norm_sum = 0.0
        self.norm_max = 0.0
        self.abs_max = 0.0
        self.mean_only = False  # built from a stored exact mean (for a pair's direction): no other figure

    # -- accumulate ----------------------------------------------------------------------------------------
    def _add(self, n: np.ndarray, mean: np.ndarray, m2: np.ndarray) -> None:
        """Chan's update: fold a group with per-dimension ``n``, ``mean``, ``m2`` into this one."""
        import numpy as np

        total = self.count + n
        with np.errstate(invalid="ignore", divide="ignore"):
            delta = mean - self.mean
            frac = np.where(total > 0, n / np.maximum(total, 1), 0.0)
            self.mean += delta * frac
            self.m2 += m2 + delta * delta * self.count * frac
        self.count = total

    def update(self, block: np.ndarray, dtype: str) -> None:
        """Fold in a block of rows in the stored dtype (bfloat16 as its ``uint16`` bits): one pass of
        :func:`actfmt.kernel.block_moments` (float64 sums of x and x² per dimension and of x² per row, NaN and
        Inf counted and left out), the block's sums then merged as a mean and M2 with Chan's update."""
        if block.shape[0]:
            self.add(block_moments(block, dtype), block.shape[0])

    def add(self, f: BlockFigures, rows: int) -> None:
        """Fold in the figures of one pass over a block of ``rows`` rows (its per-dimension sums included)."""
        import numpy as np

        assert f.col_sum is not None and f.col_sq is not None and f.col_bad is not None
        col = f.col_sum
        n = rows - f.col_bad
        self.zero_rows += f.zero_rows
        self.norm_rows += f.good_rows
        self.norm_sum += f.norm_sum
        self.norm_max = max(self.norm_max, f.norm_max)
        self.abs_max = max(self.abs_max, f.abs_max)
        self.nonfinite += f.nan + f.inf
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(n > 0, col / np.maximum(n, 1), 0.0)
        # squares of stored values are exact in float64, and so are their sums over a block to ~1e-13: M2 from
        # the sums loses nothing that matters (|mean| / std would have to exceed ~1e4 to reach 1e-8)
        self._add(n, mean, np.maximum(f.col_sq - col * mean, 0.0))
        self.rows += rows

    def merge(self, other: Moments) -> Moments:
        """Fold ``other`` (of another block of rows of the same layer) into this one; returns ``self``."""
        self._add(other.count, other.mean, other.m2)
        self.rows += other.rows
        self.nonfinite += other.nonfinite
        self.zero_rows += other.zero_rows
        self.norm_rows += other.norm_rows
        self.norm_sum += other.norm_sum
        self.norm_max = max(self.norm_max, other.norm_max)
        self.abs_max = max(self.abs_max, other.abs_max)
        return self

    # -- results -------------------------------------------------------------------------------------------
    @property
    def variance(self) -> np.ndarray:
        """Per-dimension population variance (0 where a dimension has no finite value)."""
        import numpy as np

        return np.where(self.count > 0, self.m2 / np.maximum(self.count, 1), 0.0)

    def summary(self) -> dict[str, Any]:
        """The per-split figures of the layer (see the module docstring)."""
        import numpy as np

        values = int(self.count.sum())
        sum_sq = float(np.sum(self.m2 + self.count * self.mean * self.mean))
        row_norm_mean = self.norm_sum / self.norm_rows if self.norm_rows else 0.0
        return {
            "rows": self.rows,
            "mean_norm": float(np.sqrt(np.dot(self.mean, self.mean))),
            "rms": math.sqrt(sum_sq / values) if values else 0.0,
            "std": math.sqrt(float(np.mean(self.variance))) if self.hidden else 0.0,
            "row_norm_mean": row_norm_mean,
            "row_norm_max": self.norm_max,
            "abs_max": self.abs_max,
            "nonfinite": self.nonfinite,
            "zero_rows": self.zero_rows,
            "scale_factor": math.sqrt(self.hidden) / row_norm_mean if row_norm_mean else None,
        }

    def state(self) -> dict[str, Any]:
        """Everything needed to merge later (JSON-friendly; a dask task returns it, a conversion's journal keeps
        it).  The per-dimension vectors are their little-endian bytes in base64 (``{"<f8": ...}``): exact, and
        about 50 times faster to write and read than a JSON list of 4096 floats."""
        return {
            "hidden": self.hidden,
            "rows": self.rows,
            # the finite values per dimension: one number when every dimension has as many (no NaN / Inf)
            "count": int(self.count[0])
            if self.hidden and (self.count == self.count[0]).all()
            else _pack(self.count, "<i8"),
            "mean": _pack(self.mean, "<f8"),
            "m2": _pack(self.m2, "<f8"),
            "nonfinite": self.nonfinite,
            "zero_rows": self.zero_rows,
            "norm_rows": self.norm_rows,
            "norm_sum": self.norm_sum,
            "norm_max": self.norm_max,
            "abs_max": self.abs_max,
        }

    @classmethod
    def from_mean(cls, mean: np.ndarray, rows: int) -> Moments:
        """Only the exact mean of ``rows`` rows (kept with a store): enough for a pair's direction."""
        import numpy as np

        m = cls(int(mean.shape[0]))
        m.mean = np.asarray(mean, dtype=np.float64)
        m.count[:] = rows
        m.rows = rows
        m.mean_only = True
        return m

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Moments:
        import numpy as np

        m = cls(int(state["hidden"]))
        m.rows = int(state["rows"])
        count = state["count"]
        m.count = (
            np.full(m.hidden, count, dtype=np.int64)
            if isinstance(count, int)
            else _unpack(count, "<i8", m.hidden).astype(np.int64)
        )
        m.mean = _unpack(state["mean"], "<f8", m.hidden)
        m.m2 = _unpack(state["m2"], "<f8", m.hidden)
        for key in ("nonfinite", "zero_rows", "norm_rows"):
            setattr(m, key, int(state[key]))
        for key in ("norm_sum", "norm_max", "abs_max"):
            setattr(m, key, float(state[key]))
        return m


def _pack(values: np.ndarray, dtype: str) -> dict[str, str]:
    """A vector as ``{dtype: base64 of its bytes}`` (JSON-friendly and exact)."""
    import base64

    import numpy as np

    return {dtype: base64.b64encode(np.ascontiguousarray(values, dtype=dtype).tobytes()).decode("ascii")}


def _unpack(value: Any, dtype: str, n: int) -> np.ndarray:
    """The vector :func:`_pack` wrote (or a plain list, as earlier versions wrote), of exactly ``n`` values;
    ``ValueError`` for anything else (a damaged or crafted journal)."""
    import base64
    import binascii

    import numpy as np

    if isinstance(value, dict) and set(value) == {dtype} and isinstance(value[dtype], str):
        try:
            raw = base64.b64decode(value[dtype], validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("a statistics vector is not valid base64") from None
        if len(raw) != n * np.dtype(dtype).itemsize:
            raise ValueError(f"a statistics vector holds {len(raw)} bytes, not {n} values")
        return np.frombuffer(raw, dtype=dtype).astype(np.float64 if dtype == "<f8" else np.int64)
    if isinstance(value, list) and len(value) == n:
        return np.asarray(value, dtype=np.float64 if dtype == "<f8" else np.int64)
    raise ValueError(f"a statistics vector is not {n} values")


class RowNorms:
    """The row norms ‖xᵢ‖₂ of a layer: their count, sum and maximum (and which row), for the deep validation
    rule norm-outlier (ACT408), from the same kernel as :class:`Moments` (float64).  Rows holding NaN or Inf
    are left out.  Mergeable."""

    def __init__(self) -> None:
        self.rows = 0
        self.total = 0.0
        self.max = 0.0
        self.max_row = -1

    def update(self, block: np.ndarray, dtype: str, first_row: int = 0) -> np.ndarray:
        """Fold in a block of rows (stored dtype; bfloat16 as its bits) whose first row is ``first_row``.
        Returns each row's norm: NaN for the rows holding a NaN, Inf for those holding an Inf (and no NaN); 0
        exactly for rows of zeros."""
        import numpy as np

        f = block_moments(block, dtype, columns=False)
        self.add(f, first_row)
        return np.sqrt(f.rownorm2)

    def add(self, f: BlockFigures, first_row: int = 0) -> None:
        """Fold in the figures of one pass over a block whose first row is ``first_row``."""
        self.rows += f.good_rows
        self.total += f.norm_sum
        if f.norm_max > self.max:
            self.max, self.max_row = f.norm_max, first_row + f.norm_argmax

    def merge(self, other: RowNorms) -> RowNorms:
        self.rows += other.rows
        self.total += other.total
        if other.max > self.max:
            self.max, self.max_row = other.max, other.max_row
        return self

    @property
    def mean(self) -> float:
        return self.total / self.rows if self.rows else 0.0


class Projection:
    """Rows projected on a unit direction ``w``: count, mean and M2 of the projections (Chan), and how many
    fall above the threshold ``t`` (mergeable like :class:`Moments`)."""

    def __init__(self, w: np.ndarray, t: float) -> None:
        self.w, self.t = w, t
        self._work: tuple[np.ndarray, np.ndarray] | None = None
        self.n = 0
        self.mean = 0.0
        self.m2 = 0.0
        self.above = 0

    def update(self, block: np.ndarray, dtype: str) -> None:
        """Fold in a block of rows (stored dtype; bfloat16 as its bits): each row's x·w in float64."""
        import numpy as np

        block = np.ascontiguousarray(block).view(_BITS[dtype][0])
        rows = block.shape[0]
        if rows == 0:
            return
        if self._work is None or self._work[0].shape[0] < min(SUB_ROWS, rows):
            k = min(SUB_ROWS, rows)
            self._work = (np.empty((k, self.w.size)), np.empty(k * self.w.size, dtype=np.uint32))
        x_buf, wide = self._work
        p = np.empty(rows, dtype=np.float64)
        for a in range(0, rows, SUB_ROWS):
            part = block[a : a + SUB_ROWS]
            x = _as_float64(part, dtype, x_buf[: part.shape[0]], wide)
            np.matmul(x, self.w, out=p[a : a + part.shape[0]])
        finite = np.isfinite(p)  # a row holding NaN or Inf projects to NaN or Inf: it has no projection
        if not finite.all():
            p = p[finite]
        if p.size:
            mean = float(p.mean())
            self._add(int(p.size), mean, float(np.square(p - mean).sum()))
            self.above += int(np.count_nonzero(p > self.t))

    def _add(self, n: int, mean: float, m2: float) -> None:
        total = self.n + n
        if total == 0:
            return
        delta = mean - self.mean
        self.mean += delta * n / total
        self.m2 += m2 + delta * delta * self.n * n / total
        self.n = total

    def merge(self, other: Projection) -> Projection:
        self._add(other.n, other.mean, other.m2)
        self.above += other.above
        return self

    def state(self) -> dict[str, Any]:
        return {"n": self.n, "mean": self.mean, "m2": self.m2, "above": self.above}

    @classmethod
    def from_state(cls, w: np.ndarray, t: float, state: dict[str, Any]) -> Projection:
        p = cls(w, t)
        p.n, p.mean, p.m2, p.above = (
            int(state["n"]),
            float(state["mean"]),
            float(state["m2"]),
            int(state["above"]),
        )
        return p

    @property
    def variance(self) -> float:
        return self.m2 / self.n if self.n else 0.0


# ----------------------------------------------------------------------------------------------------------
# results


#: The per-split figures of a layer, in the order of the JSON and CSV outputs.
LAYER_FIELDS = (
    "rows",
    "mean_norm",
    "rms",
    "std",
    "row_norm_mean",
    "row_norm_max",
    "abs_max",
    "nonfinite",
    "zero_rows",
    "scale_factor",
)
#: The pair figures of a layer.
PAIR_FIELDS = ("diff_of_means_norm", "cosine_of_means", "cohens_d", "midpoint_accuracy")


@dataclass
class LayerStats:
    """The per-split figures of one layer (``actfmt stats``; ``split.layer(i).stats()``)."""

    layer: str
    index: int
    rows: int
    mean_norm: float
    rms: float
    std: float
    row_norm_mean: float
    row_norm_max: float
    abs_max: float
    nonfinite: int
    zero_rows: int
    scale_factor: float | None

    @classmethod
    def from_summary(cls, name: str, index: int, summary: dict[str, Any]) -> LayerStats:
        return cls(name, index, **{k: summary[k] for k in LAYER_FIELDS})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class PairStats:
    """The pair figures of one layer of two sibling splits."""

    layer: str
    index: int
    diff_of_means_norm: float
    cosine_of_means: float | None
    cohens_d: float | None
    midpoint_accuracy: float | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def pair_figures(
    name: str, index: int, ma: Moments, mb: Moments, pa: Projection, pb: Projection
) -> PairStats:
    """The pair figures from both splits' moments and projections on w (see the module docstring)."""
    import numpy as np

    diff = ma.mean - mb.mean
    norm = float(np.sqrt(diff @ diff))
    na, nb = float(np.sqrt(ma.mean @ ma.mean)), float(np.sqrt(mb.mean @ mb.mean))
    cosine = float(ma.mean @ mb.mean) / (na * nb) if na and nb else None
    pooled = math.sqrt((pa.variance + pb.variance) / 2)
    d = (pa.mean - pb.mean) / pooled if pooled and norm else None
    total = pa.n + pb.n
    accuracy = (pa.above + (pb.n - pb.above)) / total if total and norm else None
    return PairStats(name, index, norm, cosine, d, accuracy)


def direction(ma: Moments, mb: Moments) -> tuple[np.ndarray, float]:
    """w = (μa - μb) / ‖μa - μb‖ and the midpoint threshold t = (μa·w + μb·w) / 2 (both from the exact means)."""
    import numpy as np

    diff = ma.mean - mb.mean
    norm = float(np.sqrt(diff @ diff))
    w = diff / norm if norm else np.zeros_like(diff)
    return w, float((ma.mean @ w + mb.mean @ w) / 2)


def pair_order(names: Sequence[str]) -> list[tuple[str, str]]:
    """Every pair of sibling split names as ``(a, b)``: EM is always ``a``; otherwise alphabetical."""
    out = []
    ordered = sorted(names)
    for i, x in enumerate(ordered):
        for y in ordered[i + 1 :]:
            out.append((y, x) if y == "EM" else (x, y))
    return out


# ----------------------------------------------------------------------------------------------------------
# passes over one layer of an open reader


def layer_moments(reader: Reader, pos: int, on_bytes: Callable[[int], None] | None = None) -> Moments:
    """One pass over layer position ``pos``: its :class:`Moments`."""
    info = reader.layer_info(pos)
    m = Moments(info.hidden_dim)
    for block in _blocks(reader, pos):
        m.update(block, info.dtype)
        if on_bytes:
            on_bytes(block.nbytes)
    return m


def layer_projection(
    reader: Reader, pos: int, w: np.ndarray, t: float, on_bytes: Callable[[int], None] | None = None
) -> Projection:
    """The second pass, for pairs: every row of layer position ``pos`` projected on ``w``."""
    info = reader.layer_info(pos)
    p = Projection(w, t)
    for block in _blocks(reader, pos):
        p.update(block, info.dtype)
        if on_bytes:
            on_bytes(block.nbytes)
    return p


def _blocks(reader: Reader, pos: int) -> Iterable[np.ndarray]:
    import numpy as np

    info = reader.layer_info(pos)
    buf = np.empty(0, dtype=np.uint8)
    for start, stop in scan_blocks(info, 8 << 20):
        if buf.size < (stop - start) * info.row_bytes:
            buf = np.empty((stop - start) * info.row_bytes, dtype=np.uint8)
        yield reader.read_array(pos, start, stop, buf)


class RowBatcher:
    """Folds pieces of raw bytes (a conversion's scan of the source, in row order) into :class:`Moments`: the
    whole rows of each piece go through the kernel where they lie (a row split between pieces is put together
    first), their sums accumulate over up to :data:`BATCH_ROWS` rows (4 MiB at most), then merge once."""

    def __init__(self, moments: Moments, dtype: str, row_bytes: int) -> None:
        import numpy as np

        self.moments, self.dtype, self.row_bytes = moments, dtype, row_bytes
        self.batch = max(SUB_ROWS, min(BATCH_ROWS, (4 << 20) // max(1, row_bytes)))
        self.sums = Sums(moments.hidden, dtype)
        self.carry = np.empty(row_bytes, dtype=np.uint8)  # the start of a row the last piece cut
        self.fill = 0
        self.store = BITS[dtype][0]

    def feed(self, piece: memoryview) -> None:
        import numpy as np

        data = np.frombuffer(piece, dtype=np.uint8)
        if self.row_bytes == 0:
            return
        if self.fill:
            take = min(data.size, self.row_bytes - self.fill)
            self.carry[self.fill : self.fill + take] = data[:take]
            self.fill += take
            data = data[take:]
            if self.fill < self.row_bytes:
                return
            self._add(self.carry.view(self.store).reshape(1, -1))
            self.fill = 0
        whole = data.size // self.row_bytes
        if whole:
            self._add(data[: whole * self.row_bytes].view(self.store).reshape(whole, -1))
        rest = data.size - whole * self.row_bytes
        if rest:
            self.carry[:rest] = data[whole * self.row_bytes :]
            self.fill = rest

    def _add(self, block: np.ndarray) -> None:
        self.sums.add(block)
        if self.sums.rows >= self.batch:
            self.flush()

    def flush(self) -> None:
        """Merge what was fed so far (a cut row stays for the next piece)."""
        if self.sums.rows:
            self.moments.add(self.sums.figures(), self.sums.rows)
            self.sums.reset()
