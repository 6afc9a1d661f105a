"""The statistics kernel (actfmt.kernel.block_moments): the C extension, its portable version and the numpy
fallback against a float64 reference, on every stored dtype, with NaN, ±Inf, -0, subnormals and odd shapes."""

from __future__ import annotations

import itertools
import shutil
import sysconfig

import numpy as np
import pytest
import torch

from actfmt import kernel
from actfmt.moments import Moments, RowNorms

DTYPES = ["bfloat16", "float16", "float32"]
#: The C kernel's versions this CPU runs: "c" is the best (AVX-512 where the CPU has it), "c-avx2" the AVX2 one
#: (run on its own only when it is not already the best), "c-portable" the one for any CPU.
SIMD = {"c": 2, "c-avx2": 1, "c-portable": 0}
IMPLS = ["numpy"]
if kernel._c is not None:
    IMPLS += ["c", "c-portable"] + (["c-avx2"] if kernel._c.simd() == 2 else [])


def run(impl: str, bits: np.ndarray, dtype: str, columns: bool = True) -> kernel.BlockFigures:
    if impl == "numpy":
        return kernel.numpy_block_moments(bits, dtype, columns)
    return kernel._compiled(np.ascontiguousarray(bits), dtype, columns, simd=SIMD[impl])


def stored(values: torch.Tensor, dtype: str) -> np.ndarray:
    t = values.to(getattr(torch, dtype))
    return t.view(torch.int32 if dtype == "float32" else torch.int16).numpy().view(kernel.BITS[dtype][0])


def special_block(dtype: str, rows: int = 23, cols: int = 37, seed: int = 0) -> np.ndarray:
    """Gaussian values with NaN, ±Inf, -0, subnormals, a row of zeros, a row of -0 and a huge row."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g) * 3
    tiny = {"bfloat16": 1e-40, "float16": 3e-7, "float32": 1e-44}[dtype]
    x[0, 3] = float("nan")
    x[1, 5] = float("inf")
    x[1, 6] = float("-inf")
    x[2, 0] = float("-inf")
    x[2, 36] = float("nan")
    x[3, :] = 0.0
    x[4, :] = -0.0
    x[5, 1] = -0.0
    x[6, 2] = tiny
    x[6, 9] = -tiny
    x[7, :] = {"bfloat16": 1e38, "float16": 6e4, "float32": 3e38}[dtype]
    x[20, 30] = float("nan")  # in the rows after the last whole tile of 4
    return stored(x, dtype)


def reference(bits: np.ndarray, dtype: str) -> dict[str, object]:
    """The figures, plainly in float64."""
    x = kernel.as_float64(bits, dtype, np.empty(bits.shape))
    finite = np.isfinite(x)
    xf = np.where(finite, x, 0.0)
    good = finite.all(axis=1)
    sq = (x * x).sum(axis=1) if x.size else np.zeros(x.shape[0])
    norms = np.sqrt(sq[good])
    return {
        "col_sum": xf.sum(axis=0),
        "col_sq": (xf * xf).sum(axis=0),
        "col_bad": (~finite).sum(axis=0),
        "rownorm2": sq,
        "abs_max": float(np.abs(xf).max()) if xf.size else 0.0,
        "nan": int(np.isnan(x).sum()),
        "inf": int(np.isinf(x).sum()),
        "zero_rows": int((norms == 0).sum()),
        "good_rows": int(good.sum()),
        "norm_sum": float(norms.sum()),
        "norm_max": float(norms.max()) if norms.size else 0.0,
    }


def check(f: kernel.BlockFigures, ref: dict[str, object], columns: bool = True) -> None:
    if columns:
        np.testing.assert_allclose(f.col_sum, ref["col_sum"], rtol=1e-12, atol=1e-300)
        np.testing.assert_allclose(f.col_sq, ref["col_sq"], rtol=1e-12, atol=1e-300)
        np.testing.assert_array_equal(f.col_bad, ref["col_bad"])
    else:
        assert f.col_sum is None and f.col_sq is None and f.col_bad is None
    rn = np.asarray(ref["rownorm2"])
    np.testing.assert_array_equal(np.isnan(f.rownorm2), np.isnan(rn))
    np.testing.assert_array_equal(np.isinf(f.rownorm2), np.isinf(rn))
    ok = np.isfinite(rn)
    np.testing.assert_allclose(f.rownorm2[ok], rn[ok], rtol=1e-12, atol=1e-300)
    assert f.abs_max == ref["abs_max"]
    for key in ("nan", "inf", "zero_rows", "good_rows"):
        assert getattr(f, key) == ref[key], key
    assert f.norm_sum == pytest.approx(ref["norm_sum"], rel=1e-12)
    assert f.norm_max == pytest.approx(ref["norm_max"], rel=1e-12)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(23, 37), (64, 4096), (4, 8), (1, 1), (5, 3), (9, 16), (7, 48), (6, 8200)])
def test_block_moments_match_float64(impl: str, dtype: str, shape: tuple[int, int]) -> None:
    g = torch.Generator().manual_seed(shape[0] * 7 + shape[1])
    bits = stored(torch.randn(*shape, generator=g) * 5 - 1, dtype)
    f = run(impl, bits, dtype)
    check(f, reference(bits, dtype))
    # and the row figures alone are the same
    check(run(impl, bits, dtype, columns=False), reference(bits, dtype), columns=False)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_block_moments_special_values(impl: str, dtype: str) -> None:
    bits = special_block(dtype)
    f = run(impl, bits, dtype)
    ref = reference(bits, dtype)
    check(f, ref)
    assert (f.nan, f.inf, f.zero_rows) == (3, 3, 2)
    assert np.isnan(f.rownorm2[[0, 2, 20]]).all() and np.isposinf(f.rownorm2[1])
    assert f.norm_argmax == 7  # the huge row (its squares overflow float32, not float64)
    assert f.abs_max > 0 and np.isfinite(f.abs_max)
    check(run(impl, bits, dtype, columns=False), ref, columns=False)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_block_moments_nothing_finite_and_empty(impl: str, dtype: str) -> None:
    bits = stored(torch.full((5, 9), float("nan")), dtype)
    f = run(impl, bits, dtype)
    assert (f.nan, f.inf, f.good_rows, f.norm_argmax, f.abs_max) == (45, 0, 0, -1, 0.0)
    np.testing.assert_array_equal(f.col_bad, 5)
    assert f.col_sum is not None and not f.col_sum.any()
    zeros = stored(torch.zeros(6, 10), dtype)
    f = run(impl, zeros, dtype)
    assert (f.zero_rows, f.good_rows, f.norm_max, f.norm_argmax) == (6, 6, 0.0, -1)
    for shape in [(0, 7), (3, 0)]:
        check(
            run(impl, stored(torch.zeros(*shape), dtype), dtype),
            reference(stored(torch.zeros(*shape), dtype), dtype),
        )


def test_the_implementations_agree_on_a_large_block() -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(515, 4099, generator=g) * 2 + 0.5
    x[100, 4098] = float("nan")
    x[514, 7] = float("inf")
    for dtype in DTYPES:
        bits = stored(x, dtype)
        ref = reference(bits, dtype)
        for impl in IMPLS:
            check(run(impl, bits, dtype), ref)


@pytest.mark.skipif(kernel._c is None, reason="no C kernel in this build")
def test_every_c_version_adds_the_rows_of_a_dimension_in_the_same_order() -> None:
    """The per-dimension sums are bit for bit the same in every version of the C kernel (AVX-512, AVX2,
    portable): each adds a dimension's values row after row; only the row norms' lanes are summed otherwise."""
    bits = special_block("bfloat16", rows=131, cols=4099, seed=8)
    versions = [impl for impl in IMPLS if impl != "numpy"]
    got = {impl: run(impl, bits, "bfloat16") for impl in versions}
    first = got[versions[0]]
    for impl in versions[1:]:
        f = got[impl]
        assert f.col_sum is not None and first.col_sum is not None
        assert np.array_equal(f.col_sum, first.col_sum) and np.array_equal(f.col_sq, first.col_sq), impl
        np.testing.assert_array_equal(f.col_bad, first.col_bad)
        np.testing.assert_allclose(f.rownorm2, first.rownorm2, rtol=1e-14)
        assert (f.nan, f.inf, f.zero_rows, f.good_rows, f.norm_argmax) == (
            first.nan,
            first.inf,
            first.zero_rows,
            first.good_rows,
            first.norm_argmax,
        )


def test_moments_do_not_depend_on_blocks_or_implementation(monkeypatch: pytest.MonkeyPatch) -> None:
    bits = special_block("bfloat16", rows=301, cols=50, seed=5)
    whole = Moments(50)
    whole.update(bits, "bfloat16")
    pieces = Moments(50)
    for a in range(0, 301, 17):
        part = Moments(50)
        part.update(bits[a : a + 17], "bfloat16")
        pieces.merge(part)
    monkeypatch.setenv("ACTFMT_KERNEL", "numpy")
    assert not kernel.compiled()
    fallback = Moments(50)
    fallback.update(bits, "bfloat16")
    want = whole.summary()
    for other in (pieces.summary(), fallback.summary()):
        assert other.keys() == want.keys()
        for key, value in want.items():
            assert other[key] == pytest.approx(value, rel=1e-9), key
    np.testing.assert_array_equal(whole.count, fallback.count)


def test_row_norms_first_row_and_merge() -> None:
    bits = special_block("float16")
    n = RowNorms()
    norms = n.update(bits, "float16", first_row=100)
    assert n.max_row == 107 and n.rows == 19  # rows 0, 1, 2 and 20 hold NaN or Inf
    assert np.isnan(norms[0]) and np.isinf(norms[1]) and norms[3] == 0.0
    m = RowNorms().merge(n)
    assert (m.max, m.max_row, m.rows) == (n.max, n.max_row, n.rows)


def test_non_contiguous_and_wrong_blocks() -> None:
    bits = special_block("float32", rows=23, cols=40)
    f = kernel.block_moments(bits[:, ::2], "float32")  # copied to contiguous
    check(f, reference(np.ascontiguousarray(bits[:, ::2]), "float32"))
    with pytest.raises(ValueError, match="2-d"):
        kernel.block_moments(bits.reshape(-1), "float32")
    if kernel._c is not None:
        with pytest.raises(ValueError, match="sizes"):
            kernel._c.moments(bits, 2, 24, 40, None, None, None, np.empty(24))


@pytest.mark.skipif(
    not (sysconfig.get_config_var("CC") and shutil.which(str(sysconfig.get_config_var("CC")).split()[0])),
    reason="no C compiler: actfmt runs its numpy kernel",
)
def test_the_compiled_kernel_is_built_where_a_compiler_is() -> None:
    assert kernel._c is not None, "build it: python setup.py build_ext --inplace (or pip install -e .)"
    assert kernel.compiled()


@pytest.mark.parametrize("numpy_kernel", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_row_batcher_pieces_cut_anywhere(
    dtype: str, numpy_kernel: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A conversion's scan feeds pieces cut anywhere (mid-row too): the same figures as one update."""
    from actfmt import moments
    from actfmt.moments import RowBatcher

    monkeypatch.setattr(moments, "BATCH_ROWS", 64)  # several batches merged
    if numpy_kernel:
        monkeypatch.setenv("ACTFMT_KERNEL", "numpy")
    bits = special_block(dtype, rows=301, cols=37, seed=2)
    want = Moments(37)
    want.update(bits, dtype)
    got = Moments(37)
    batcher = RowBatcher(got, dtype, bits.shape[1] * bits.itemsize)
    raw = memoryview(bits.tobytes())
    cuts = [0, 1, 7, 300, 301, 5000, 5003, 9999, 20000, len(raw)]
    for a, b in itertools.pairwise(cuts):
        batcher.feed(raw[a:b])
    assert batcher.batch == 64
    batcher.flush()
    for key, value in want.summary().items():
        assert got.summary()[key] == pytest.approx(value, rel=1e-12), key
    np.testing.assert_array_equal(got.count, want.count)
    assert got.rows == 301
