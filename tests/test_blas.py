"""rnndsl.backend.blas.gemm: every route it takes gives a @ b."""
import numpy as np
import pytest

from rnndsl.backend import blas


def _calls(monkeypatch) -> list:
    """The products `gemm` hands to the BLAS, recorded."""
    calls = []
    through = blas._blas_gemm

    def recorded(a, b):
        calls.append((a.shape, b.shape))
        return through(a, b)
    monkeypatch.setattr(blas, "_blas_gemm", recorded)
    return calls


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("rows, wide, narrow", [(1024, 64, 1), (3200, 256, 2), (1027, 512, 3),
                                                (1025, 128, 4), (4099, 33, 4)])
def test_sums_of_narrow_outer_products_agree_with_numpy(monkeypatch, dtype, rows, wide, narrow):
    """Weight gradients with a narrow side, both ways round (g.T @ x and x.T @ g), over row
    counts that are and are not a multiple of the kernel's four rows a pass, skip the BLAS
    and match float64 NumPy."""
    calls = _calls(monkeypatch)
    rng = np.random.default_rng(rows + narrow)
    g = rng.standard_normal((rows, wide)).astype(dtype)
    x = rng.standard_normal((rows, narrow)).astype(dtype)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    for a, b in ((g.T, x), (x.T, g)):
        got = blas.gemm(a, b)
        want = a.astype(np.float64) @ b.astype(np.float64)
        assert got.dtype == dtype and got.shape == want.shape and got.flags.c_contiguous
        assert np.abs(got - want).max() <= tol * np.abs(want).max()
    assert calls == []


@pytest.mark.parametrize("a_shape, b_shape, transposed", [
    ((1100, 17), (17, 2), False),  # the narrow side is the result's, but `a` is not a transpose
    ((17, 1100), (1100, 5), True),  # neither side narrow
    ((2, 1023), (1023, 64), True),  # a sum too short to take the narrow kernel
])
def test_other_products_go_to_the_blas(monkeypatch, a_shape, b_shape, transposed):
    calls = _calls(monkeypatch)
    rng = np.random.default_rng(0)
    a = rng.standard_normal(a_shape[::-1] if transposed else a_shape).astype(np.float32)
    a = a.T if transposed else a
    b = rng.standard_normal(b_shape).astype(np.float32)
    np.testing.assert_allclose(blas.gemm(a, b), a @ b, rtol=1e-4, atol=1e-4)
    assert calls == [(a_shape, b_shape)]


def test_a_routed_thread_hands_every_product_over():
    seen = []
    g = np.ones((300, 4), np.float32)
    with blas.gemm_through(lambda a, b: seen.append(a.shape) or a @ b):
        blas.gemm(g.T, g)
    assert seen == [(4, 300)]


@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-10), (np.float32, 1e-4)])
def test_an_lstm_with_a_two_wide_input_gets_its_input_weights_gradient_through_it(
        monkeypatch, dtype, tol):
    """The adding task's shape of problem (input 2, 1024 rows): the CPU kernels' gradients
    against the reference engine's, the input weights' gradient through the narrow pass."""
    import rnndsl
    from engines import differences

    narrow = []
    through = blas._narrow_sum
    monkeypatch.setattr(blas, "_narrow_sum",
                        lambda wide, side: narrow.append(side.shape) or through(wide, side))
    cells = [rnndsl.compile("lstm", target=t) for t in ("cpu", "reference")]
    diffs = differences(*cells, T=64, B=16, dtype=dtype, seed=3, problem_args=(2, 6))
    assert (1024, 2) in narrow
    assert max(diffs.values()) < tol, diffs
