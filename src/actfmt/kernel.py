"""The one pass over a block of rows that statistics (``actfmt stats``, ``convert``) and ``validate --deep`` make:
:func:`block_moments`.

It runs in the C extension ``actfmt._kernel`` when the package was built with it (``pip install`` builds it when
a C compiler is there; AVX-512 or AVX2 chosen at run time) and otherwise in numpy, with the same figures: every stored value
(bfloat16 / float16 / float32) and its square are exact in float64, so the only rounding is that of the float64
sums.  ``ACTFMT_KERNEL=numpy`` in the environment forces the numpy version.
"""

from __future__ import annotations

import importlib
import math
import os
from typing import TYPE_CHECKING, Any, NamedTuple

_c: Any
try:  # the compiled kernel is optional: a build without a C compiler falls back to numpy.  By name: it is a leaf
    # (it imports nothing of actfmt), not the package ``actfmt`` that ``from actfmt import _kernel`` would name
    _c = importlib.import_module("actfmt._kernel")
except ImportError:  # pragma: no cover - depends on the build
    _c = None

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

__all__ = ["BITS", "BlockFigures", "Sums", "as_float64", "block_moments", "compiled", "decode"]

#: Per stored dtype: (unsigned view, magnitude mask, exponent mask); an all-ones exponent is Inf or NaN.
BITS = {
    "bfloat16": ("<u2", 0x7FFF, 0x7F80),
    "float16": ("<u2", 0x7FFF, 0x7C00),
    "float32": ("<u4", 0x7FFFFFFF, 0x7F800000),
}
_KIND = {"bfloat16": 0, "float16": 1, "float32": 2}
#: Rows converted to float64 at a time by the numpy version: a sub-block stays in the CPU's cache.
SUB_ROWS = 64


class BlockFigures(NamedTuple):
    """What one pass over a block gives (``col_*`` are None when only row figures were asked for)."""

    col_sum: np.ndarray | None  #: per dimension, the sum of its finite values (float64)
    col_sq: np.ndarray | None  #: per dimension, the sum of their squares
    col_bad: np.ndarray | None  #: per dimension, how many values are NaN or Inf (int64)
    rownorm2: np.ndarray  #: per row, the sum of its squares: NaN if it holds a NaN, else Inf if an Inf
    abs_max: float  #: the largest magnitude of a finite value (0 when none)
    nan: int
    inf: int
    zero_rows: int  #: rows of zeros (±0) only
    good_rows: int  #: rows holding no NaN / Inf
    norm_sum: float  #: the sum of the good rows' norms √rownorm2
    norm_max: float  #: the largest of them (0 when none)
    norm_argmax: int  #: the first good row whose norm is norm_max, if above 0; else -1


def compiled() -> bool:
    """Whether :func:`block_moments` runs in the C extension."""
    return _c is not None and os.environ.get("ACTFMT_KERNEL", "") != "numpy"


def block_moments(block: np.ndarray, dtype: str, columns: bool = True) -> BlockFigures:
    """One pass over ``block`` (rows x dimensions, in the stored dtype; bfloat16 as its ``uint16`` bits).
    ``columns=False``: the row figures only (no per-dimension sums)."""
    import numpy as np

    block = np.ascontiguousarray(block).view(BITS[dtype][0])
    if block.ndim != 2:
        raise ValueError(f"a block of rows is 2-d, not {block.ndim}-d")
    if compiled():
        return _compiled(block, dtype, columns)
    return numpy_block_moments(block, dtype, columns)


def _compiled(block: np.ndarray, dtype: str, columns: bool, simd: int = 2) -> BlockFigures:
    """The C kernel on ``block``; ``simd``: 0 its portable version, 1 AVX2 at most, 2 the best the CPU runs."""
    import numpy as np

    rows, cols = block.shape
    rownorm2 = np.empty(rows, dtype=np.float64)
    s = np.zeros(cols) if columns else None
    q = np.zeros(cols) if columns else None
    bad = np.zeros(cols, dtype=np.int64) if columns else None
    assert _c is not None
    absbits, nan, inf, zero, good, nsum, nmax, arg = _c.moments(
        block, _KIND[dtype], rows, cols, s, q, bad, rownorm2, simd
    )
    return BlockFigures(s, q, bad, rownorm2, decode(absbits, dtype), nan, inf, zero, good, nsum, nmax, arg)


class Sums:
    """:func:`block_moments` of consecutive blocks of rows summed as one: the per-dimension sums accumulate in
    place (the compiled kernel adds into them), so a stream of small pieces costs no copy into a batch."""

    def __init__(self, cols: int, dtype: str) -> None:
        import numpy as np

        self.cols, self.dtype = cols, dtype
        self._rownorm2: np.ndarray | None = None
        self.col_sum = np.zeros(cols)
        self.col_sq = np.zeros(cols)
        self.col_bad = np.zeros(cols, dtype=np.int64)
        self.reset()

    def reset(self) -> None:
        """Start again from nothing (the arrays are zeroed in place: :meth:`Moments.add` keeps no reference)."""
        self.col_sum.fill(0)
        self.col_sq.fill(0)
        self.col_bad.fill(0)
        self.rows = self.nan = self.inf = self.zero_rows = self.good_rows = 0
        self.norm_sum = self.norm_max = self.abs_max = 0.0
        self.abs_bits = 0
        self.norm_argmax = -1

    def add(self, block: np.ndarray) -> None:
        """Fold in a C-contiguous block (rows x cols, the stored dtype's unsigned view)."""
        import numpy as np

        rows = block.shape[0]
        if compiled():
            if self._rownorm2 is None or self._rownorm2.size < rows:
                self._rownorm2 = np.empty(max(rows, 1024))
            bits, nan, inf, zero, good, nsum, nmax, arg = _c.moments(
                block,
                _KIND[self.dtype],
                rows,
                self.cols,
                self.col_sum,
                self.col_sq,
                self.col_bad,
                self._rownorm2,
            )
            self.abs_bits = max(self.abs_bits, bits)
        else:
            f = numpy_block_moments(block, self.dtype)
            assert f.col_sum is not None and f.col_sq is not None and f.col_bad is not None
            self.col_sum += f.col_sum
            self.col_sq += f.col_sq
            self.col_bad += f.col_bad
            nan, inf, zero, good, nsum, nmax, arg = f[5:]
            self.abs_max = max(self.abs_max, f.abs_max)
        if nmax > self.norm_max:
            self.norm_max, self.norm_argmax = nmax, self.rows + arg
        self.nan += nan
        self.inf += inf
        self.zero_rows += zero
        self.good_rows += good
        self.norm_sum += nsum
        self.rows += rows

    def figures(self) -> BlockFigures:
        """The sums so far as one block's figures (no per-row norms: ``rownorm2`` is empty)."""
        import numpy as np

        abs_max = max(self.abs_max, decode(self.abs_bits, self.dtype))
        return BlockFigures(
            self.col_sum,
            self.col_sq,
            self.col_bad,
            np.empty(0),
            abs_max,
            self.nan,
            self.inf,
            self.zero_rows,
            self.good_rows,
            self.norm_sum,
            self.norm_max,
            self.norm_argmax,
        )


def as_float64(
    block: np.ndarray, dtype: str, out: np.ndarray, scratch: np.ndarray | None = None
) -> np.ndarray:
    """Stored values (bfloat16 as its ``uint16`` bits) as float64, into ``out`` (exact).  ``scratch``: a
    ``uint32`` array at least ``block``'s size, for bfloat16."""
    import numpy as np

    if dtype == "bfloat16":
        wide = np.left_shift(
            block,
            16,
            dtype=np.uint32,
            out=None if scratch is None else scratch.reshape(-1)[: block.size].reshape(block.shape),
        )
        np.copyto(out, wide.view(np.float32))
    else:
        np.copyto(out, block.view({"float16": np.float16, "float32": np.float32}[dtype]))
    return out


def decode(bits: int, dtype: str) -> float:
    """The value of one stored magnitude (bits of a non-negative number)."""
    import numpy as np

    if dtype == "bfloat16":
        return float(np.array([bits << 16], dtype=np.uint32).view(np.float32)[0])
    view = {"float16": (np.uint16, np.float16), "float32": (np.uint32, np.float32)}[dtype]
    return float(np.array([bits], dtype=view[0]).view(view[1])[0])


def _largest_magnitude(bits: np.ndarray, magnitude: int, exponent: int, special: int) -> int:
    """The largest magnitude (sign bit cleared) among sign-magnitude floats given as unsigned bits, leaving out
    NaN / Inf when ``special``.  Without them: two reductions and no copy (as unsigned, the largest is the largest
    negative when there is one; as signed, the largest non-negative)."""
    import numpy as np

    if bits.size == 0:
        return 0
    if special:
        mags = np.bitwise_and(bits, magnitude)
        mags[(bits & exponent) == exponent] = 0
        return int(mags.max())
    top = int(bits.max())
    signed = int(bits.view(np.int16 if bits.dtype.itemsize == 2 else np.int32).max())
    return max(top & magnitude if top > magnitude else 0, signed if signed >= 0 else 0)


def numpy_block_moments(block: np.ndarray, dtype: str, columns: bool = True) -> BlockFigures:
    """:func:`block_moments` in numpy (the fallback): per sub-block of :data:`SUB_ROWS` rows, the values exactly
    as float64, the column sums of x and x² and the row sums of x² as BLAS matrix-vector products; a sub-block
    holding NaN or Inf takes a slower path that leaves those values out."""
    import numpy as np

    _, magnitude, exponent = BITS[dtype]
    block = np.ascontiguousarray(block).view(BITS[dtype][0])
    rows, cols = block.shape
    k0 = max(1, min(SUB_ROWS, rows))
    x_buf, wide = np.empty((k0, cols)), np.empty(k0 * cols, dtype=np.uint32)
    ones_r, ones_d = np.ones(k0), np.ones(cols)
    col, col_sq, bad_col = np.zeros(cols), np.zeros(cols), np.zeros(cols, dtype=np.int64)
    rownorm2 = np.empty(rows)
    nan = inf = 0
    for a in range(0, rows, SUB_ROWS):
        part = block[a : a + SUB_ROWS]
        k = part.shape[0]
        x = as_float64(part, dtype, x_buf[:k], wide)
        if columns:
            s = ones_r[:k] @ x
        np.multiply(x, x, out=x)
        sq_rows = x @ ones_d
        if math.isfinite(float(sq_rows.sum())):
            if columns:
                col += s
                col_sq += ones_r[:k] @ x
            rownorm2[a : a + k] = sq_rows
            continue
        special = (part & exponent) == exponent  # NaN or Inf in this sub-block: count them and leave them out
        is_nan = special & ((part & (magnitude ^ exponent)) != 0)
        n_nan = int(np.count_nonzero(is_nan))
        nan += n_nan
        inf += int(np.count_nonzero(special)) - n_nan
        x = as_float64(part, dtype, x_buf[:k], wide)
        x[special] = 0.0
        if columns:
            col += ones_r[:k] @ x
            bad_col += np.count_nonzero(special, axis=0)
        np.multiply(x, x, out=x)
        if columns:
            col_sq += ones_r[:k] @ x
        sq_rows = x @ ones_d
        sq_rows[special.any(axis=1)] = np.inf
        sq_rows[is_nan.any(axis=1)] = np.nan
        rownorm2[a : a + k] = sq_rows
    good = np.isfinite(rownorm2)
    norms = np.sqrt(rownorm2[good] if nan + inf else rownorm2)
    top = int(np.argmax(norms)) if norms.size else -1
    norm_max = float(norms[top]) if norms.size else 0.0
    if norm_max <= 0:
        top = -1
    elif nan + inf:
        top = int(np.flatnonzero(good)[top])
    return BlockFigures(
        col if columns else None,
        col_sq if columns else None,
        bad_col if columns else None,
        rownorm2,
        decode(_largest_magnitude(block, magnitude, exponent, nan + inf), dtype),
        nan,
        inf,
        int(np.count_nonzero(norms == 0)),
        int(norms.size),
        float(norms.sum()),
        norm_max,
        top,
    )
