"""backend/scratch.py: the generated glue's buffers and the packed weights start on a cache line
from ALIGN_FROM bytes up (the micro-kernel's 512-bit loads and stores then never split across
two lines), whatever malloc returned, and keep their shape, type and contents' rules."""
import numpy as np
import pytest

import rnndsl
from rnndsl.backend.packed import pack, pack_blocks
from rnndsl.backend.scratch import ALIGN_FROM, LINE, aligned, empty, nan_scratch


def _start(a: np.ndarray) -> int:
    return a.ctypes.data % LINE


@pytest.mark.parametrize("shape", [(1024,), (33, 65), (7, 3, 129), (ALIGN_FROM // 4,)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_large_buffers_start_on_a_line(shape, dtype):
    # many at once: malloc's 16-byte alignment would leave most of them mid-line
    arrays = [aligned(shape, dtype) for _ in range(16)]
    for a in arrays:
        assert a.shape == shape and a.dtype == dtype
        assert a.flags.c_contiguous and a.flags.writeable
        assert _start(a) == 0
    for k, a in enumerate(arrays):  # each its own memory
        a.fill(k)
    assert [float(a.flat[-1]) for a in arrays] == list(range(16))


@pytest.mark.parametrize("shape", [(0,), (0, 5), (3,), (2, 7)])
def test_small_and_empty_buffers(shape):
    a = aligned(shape, np.float32)
    assert a.shape == shape and a.dtype == np.float32 and a.flags.c_contiguous


def test_empty_takes_an_int_or_a_shape_and_fills_nan_in_the_debug_mode():
    assert empty(5000, np.float32).shape == (5000,)
    with nan_scratch():
        a = empty((40, 50), np.float64)
        assert np.isnan(a).all() and _start(a) == 0


def test_packed_weights_start_on_a_line():
    rng = np.random.default_rng(0)
    for k, n in [(128, 512), (64, 100), (256, 1024)]:
        w = rng.standard_normal((k, n)).astype(np.float32)
        for _ in range(8):
            assert _start(pack(w, 4)) == 0
    blocks = pack_blocks(rng.standard_normal((64, 64)), [(64, 4)], False)
    assert _start(blocks[0]) == 0 and blocks[0].sum() != 0


def test_a_cells_buffers_are_aligned_and_its_results_unchanged():
    """The LSTM's forward with every large buffer aligned gives the bits it gave through
    NumPy's own allocation (alignment changes where, not what, the kernels compute)."""
    from rnndsl.backend import packed, scratch
    cell = rnndsl.compile("lstm")
    rng = np.random.default_rng(1)
    T, B, I, H = 20, 8, 32, 64
    params = cell.init_params(input=I, hidden=H, seed=0)
    xs = {"x": rng.standard_normal((T, B, I)).astype(np.float32)}
    got = cell.forward(params, xs).outputs["h"]

    def numpy_own(shape, dtype):
        return np.empty(shape, dtype)
    before = scratch.aligned, packed.aligned
    scratch.aligned = packed.aligned = numpy_own
    try:
        want = cell.forward(params, xs).outputs["h"]
    finally:
        scratch.aligned, packed.aligned = before
    assert np.array_equal(got, want)
