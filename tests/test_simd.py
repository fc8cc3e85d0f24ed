"""The vector kernels' row reductions (simd.py) against NumPy: every length around the
vector blocks, at offsets, with the special values a kernel meets."""
import numpy as np
import pytest

from rnndsl.backend.simd import lanes, row_max, row_sum

DTYPES = (np.float32, np.float64)


def _lengths(dtype):
    """Empty, shorter than a vector, around one vector, one block of four and past it."""
    width = lanes(dtype)
    return sorted({0, 1, width - 1, width, width + 1, 4 * width - 1, 4 * width,
                   4 * width + 1, 5 * width + 3, 9 * width + width // 2})


@pytest.mark.parametrize("dtype", DTYPES)
def test_row_sum_and_max_match_numpy(dtype):
    rng = np.random.default_rng(0)
    data = rng.normal(size=20 * lanes(dtype) + 7).astype(dtype)
    tol = 1e-5 if dtype == np.float32 else 1e-13
    for start in (0, 3, lanes(dtype)):
        for n in _lengths(dtype):
            part = data[start:start + n]
            total = row_sum(data, start, n, dtype(0))
            np.testing.assert_allclose(total, part.astype(np.float64).sum(), rtol=tol,
                                       atol=tol * n)
            assert dtype(total) == total  # summed in the dtype
            best = row_max(data, start, n, dtype(-np.inf))
            assert best == (part.max() if n else -np.inf), (start, n)


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_nan_anywhere_wins_and_infinities_add(dtype):
    n = 6 * lanes(dtype) + 5
    for where in range(n):  # in a block of four, in a single vector, in the tail
        data = np.arange(n, dtype=dtype)
        data[where] = np.nan
        assert np.isnan(row_sum(data, 0, n, dtype(0))), where
        assert np.isnan(row_max(data, 0, n, dtype(-np.inf))), where
    data = np.ones(n, dtype)
    data[n // 2] = np.inf
    assert row_sum(data, 0, n, dtype(0)) == np.inf
    assert row_max(data, 0, n, dtype(-np.inf)) == np.inf
    data[0] = -np.inf
    assert np.isnan(row_sum(data, 0, n, dtype(0)))
    assert row_max(-np.full(n, np.inf, dtype), 0, n, dtype(-np.inf)) == -np.inf


def test_the_order_is_fixed():
    """The same numbers in the same places give the same bits, whatever precedes them in
    the buffer: the kernels that share a sum (forward with and without the tape) agree."""
    rng = np.random.default_rng(1)
    values = rng.normal(size=300).astype(np.float32) * 1e3
    a = np.concatenate([rng.normal(size=64).astype(np.float32), values])
    b = np.concatenate([np.zeros(64, np.float32), values])
    assert row_sum(a, 64, 300, np.float32(0)) == row_sum(b, 64, 300, np.float32(0))
