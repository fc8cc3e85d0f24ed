"""The products over all T*B rows by the micro-kernel (rnndsl.backend.panel_gemm) against
NumPy in float64, on one to three threads, in the shapes it takes and the ones it leaves to
BLAS, and whole cells at sizes where their input products and input gradients take it."""
import numpy as np
import pytest

import rnndsl
from rnndsl.backend import panel_gemm
from rnndsl.backend.panel_gemm import BLOCK_ROWS, MIN_ROWS, PANEL_BYTES, weight_product
from rnndsl.backend.row_threads import loops_on, set_loop_threads
from rnndsl.backend.scratch import nan_scratch

from engines import differences

# rows: the fewest taken, a remainder of the four-row tiles and of a block, several blocks a
# thread; k: a panel's depth from one row to the deepest taken; n: one panel to many
TAKEN = [(MIN_ROWS, 1, 32), (BLOCK_ROWS + 3, 17, 64), (1001, 128, 512), (260, 256, 96)]
# too few rows, an output that is not whole panels, a panel too deep for the L2 rule
LEFT = [(MIN_ROWS - 1, 8, 32), (100, 8, 33), (100, PANEL_BYTES // (32 * 4) + 1, 32)]


@pytest.fixture
def blas_calls(monkeypatch):
    """The calls weight_product leaves to BLAS, recorded (and still computed); every product
    that suits the micro-kernel takes it, however small, on rnndsl's own threads too (the
    rule's size is tested below)."""
    calls = []
    monkeypatch.setattr(panel_gemm, "OWN_THREADS_MIN_WORK", 0)

    def recorded(a, b):
        calls.append((a.shape, b.shape))
        return a @ b
    monkeypatch.setattr(panel_gemm, "gemm", recorded)
    return calls


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-13), (np.float32, 1e-5)])
@pytest.mark.parametrize("rows, k, n", TAKEN + LEFT)
def test_weight_product_is_the_product(rows, k, n, dtype, tol, threads, blas_calls):
    rng = np.random.default_rng(rows + 7 * k + n)
    a = rng.standard_normal((rows, k)).astype(dtype)
    w_t = rng.standard_normal((n, k)).astype(dtype)  # as the glue passes a stack: W.T, a view
    set_loop_threads(threads)
    try:
        with nan_scratch():  # an output element the kernel does not write stays NaN
            got = weight_product(a, w_t.T)
    finally:
        set_loop_threads(None)
    want = a.astype(np.float64) @ w_t.T.astype(np.float64)
    scale = np.abs(a).astype(np.float64) @ np.abs(w_t.T).astype(np.float64)
    assert got.shape == (rows, n) and got.dtype == dtype and got.flags.c_contiguous
    assert np.all(np.abs(got - want) <= tol * (scale + 1e-30))
    taken = (rows, k, n) in TAKEN and (dtype == np.float32 or n % 16 == 0)
    assert (blas_calls == []) == taken, blas_calls


def test_own_threads_take_it_for_large_products_and_torchs_team_for_all():
    """On rnndsl's own pool a product below OWN_THREADS_MIN_WORK multiply-adds stays with
    BLAS; on a team (`loops_on`, as the PyTorch bridge runs them) it takes the micro-kernel.
    The shapes only are looked at: zero-stride arrays stand for the large ones."""
    def suits(r, k, n):
        return panel_gemm._suits(np.broadcast_to(np.float32(0), (r, k)),
                                 np.broadcast_to(np.float32(0), (k, n)))
    large = panel_gemm.OWN_THREADS_MIN_WORK
    assert suits(6400, 512, 2048)  # the LSTM's input products at M
    assert suits(large // (512 * 2048), 512, 2048)  # 2048 rows of that shape: the least
    assert not suits(large // (512 * 2048) - 1, 512, 2048)
    assert not suits(1600, 128, 512)  # the LSTM's at S
    ran = []

    def team(tasks):
        ran.append(len(tasks))
        for task in tasks:
            task()
    with loops_on(team, 2):
        assert suits(1600, 128, 512)
        a = np.random.default_rng(0).standard_normal((1600, 128)).astype(np.float32)
        w = np.random.default_rng(1).standard_normal((128, 512)).astype(np.float32)
        got = weight_product(a, w)
    assert ran and ran[0] >= 1  # the chunks (all, or all but one compiling it) on the team
    assert np.allclose(got, a.astype(np.float64) @ w, rtol=1e-4, atol=1e-4)


def test_float64_panels_are_half_as_wide(monkeypatch):
    """A float64 panel holds 16 columns: n = 48 takes the micro-kernel in float64, not in
    float32 (32 columns a panel)."""
    monkeypatch.setattr(panel_gemm, "OWN_THREADS_MIN_WORK", 0)
    a = np.ones((MIN_ROWS, 4))
    assert panel_gemm._suits(a, np.ones((4, 48)))
    assert not panel_gemm._suits(a.astype(np.float32), np.ones((4, 48), np.float32))


@pytest.mark.parametrize("spec", ["lstm", "gru", "peephole_lstm"])
@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-10), (np.float32, 1e-4)])
def test_cells_whose_products_take_it(spec, dtype, tol, blas_calls):
    """input = hidden = 32, T * B = 80 rows: the input products (4H, 3H = 96 or 128 columns)
    and the input gradient (32 columns) all go through the micro-kernel, on two threads,
    with padding (lengths) and NaN-filled scratch, against the reference engine."""
    cpu, ref = rnndsl.compile(spec), rnndsl.compile(spec, target="reference")
    set_loop_threads(2)
    try:
        with nan_scratch():
            diffs = differences(cpu, ref, 8, 10, [8, 3, 0, 8, 5, 1, 8, 2, 7, 6], dtype, seed=3,
                                problem_args=(32, 0))
    finally:
        set_loop_threads(None)
    bad = {k: v for k, v in diffs.items() if not v < tol}
    assert not bad, bad
    assert blas_calls == []
