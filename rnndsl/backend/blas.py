"""The process's matrix products outside the time loop, through the BLAS that Numba calls.

NumPy and SciPy (whose BLAS Numba's compiled `np.dot` calls) each bundle their own OpenBLAS,
each with a thread pool that spins for a while after a call. Once a kernel has run, both pools
compete for the cores, and on this project's 2-core machine a NumPy GEMM right after a kernel
ran 6x slower. So the generated glue, the layers and the heads multiply through `gemm`, and
only one pool exists. (The glue's products with a cell's weights that suit the per-step
micro-kernel run on it instead, on the time loops' threads: panel_gemm.py.)
"""
import functools
import threading
from contextlib import contextmanager

import numpy as np
from numba import njit


@njit(cache=True)
def _blas_gemm(a, b):
    return np.dot(a, b)


_ROUTE = threading.local()  # .gemm: a function that takes this thread's products, or absent


def gemm(a, b):
    """a @ b for 2-D arrays of one dtype (C- or Fortran-contiguous, such as a transpose), through
    the BLAS, or through what `gemm_through` installed on this thread."""
    route = getattr(_ROUTE, "gemm", None)
    if route is not None:
        return route(a, b)
    if a.shape[1] >= NARROW_MIN_DEPTH and a.T.flags.c_contiguous and a.dtype == b.dtype \
            and a.dtype in (np.float32, np.float64):
        if a.shape[0] <= NARROW and b.flags.c_contiguous:  # narrow.T @ wide
            return _narrow_sum(b, a.T)
        if b.shape[1] <= NARROW:  # wide.T @ narrow
            return np.ascontiguousarray(_narrow_sum(a.T, np.ascontiguousarray(b)).T)
    return _blas_gemm(a, b)


# A sum over many rows of outer products with a side a few wide (the weight gradient of a
# 2-wide input, as in the adding task): OpenBLAS ran these at 8-15 GFLOP/s. One pass over the
# rows with the narrow side's sums in L1 instead, measured (one core against OpenBLAS on two,
# float32, in turns, medians of 15; both ways round): 3200 rows, 256 x 2, 0.09-0.16 against
# 0.26-0.43 ms (the adding task's LSTM trained 5% faster, its GRU 12%), 3200 x 512 x 9 0.60
# against 1.50, but 2048 x 512 x 9 0.45-0.57 against 0.38-0.53, and under about 1000 rows the
# BLAS call was as fast or faster (800 x 256 x 2: 0.02 against 0.015).
NARROW = 4  # the narrow side's width up to which
NARROW_MIN_DEPTH = 1024  # rows summed, from which


@njit(cache=True, nogil=True, error_model="numpy", boundscheck=False)
def _narrow_sum(wide, narrow):
    """narrow.T @ wide for C-contiguous wide (K, M) and narrow (K, N), N small: each row of
    `wide` read once, four rows a pass over the (N, M) sums."""
    K, M = wide.shape
    N = narrow.shape[1]
    acc = np.zeros((N, M), wide.dtype)
    r = 0
    while r + 4 <= K:
        for n in range(N):
            v0, v1, v2, v3 = narrow[r, n], narrow[r + 1, n], narrow[r + 2, n], narrow[r + 3, n]
            for j in range(M):
                acc[n, j] += (v0 * wide[r, j] + v1 * wide[r + 1, j] + v2 * wide[r + 2, j]
                              + v3 * wide[r + 3, j])
        r += 4
    for rest in range(r, K):
        for n in range(N):
            v = narrow[rest, n]
            for j in range(M):
                acc[n, j] += v * wide[rest, j]
    return acc


@contextmanager
def gemm_through(product):
    """Within the block, this thread's `gemm`s call `product(a, b)` instead (the PyTorch bridge
    hands them to torch, whose thread pool is the one already running)."""
    before = getattr(_ROUTE, "gemm", None)
    _ROUTE.gemm = product
    try:
        yield
    finally:
        _ROUTE.gemm = before


def matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a (..., k) @ b (k, n) through `gemm`, in a's dtype."""
    a2 = np.ascontiguousarray(a).reshape(-1, a.shape[-1])
    return gemm(a2, np.asarray(b, a2.dtype)).reshape(*a.shape[:-1], b.shape[1])


def weight_grad(d: np.ndarray, a: np.ndarray) -> np.ndarray:
    """The gradient of W in y = a @ W.T given d = dL/dy: the sum over all leading axes of
    outer(d, a), shape (d's width, a's width)."""
    d2 = np.ascontiguousarray(d).reshape(-1, d.shape[-1])
    a2 = np.ascontiguousarray(a, d2.dtype).reshape(-1, a.shape[-1])
    return gemm(d2.T, a2)



# -- the kernels' BLAS thread pool ------------------------------------------------------------
@functools.cache  # the library is looked up once a process
def _openblas():
    """The functions of the OpenBLAS that SciPy bundles (the one Numba's np.dot calls): (set
    threads, get threads, kernels' name), or None where SciPy links another BLAS (conda,
    distribution packages): then threads stay as they are."""
    import ctypes
    import glob
    import os

    import scipy

    libs = os.path.join(os.path.dirname(scipy.__file__), os.pardir, "scipy.libs")
    for path in glob.glob(os.path.join(libs, "libscipy_openblas*.so*")):
        lib = ctypes.CDLL(path)  # already loaded by SciPy: the same library, not a copy
        for prefix in ("scipy_openblas", "openblas"):
            setter = getattr(lib, f"{prefix}_set_num_threads", None)
            getter = getattr(lib, f"{prefix}_get_num_threads", None)
            corename = getattr(lib, f"{prefix}_get_corename", None)
            if setter is not None and getter is not None:
                setter.argtypes, getter.restype = [ctypes.c_int], ctypes.c_int
                if corename is not None:
                    corename.restype = ctypes.c_char_p
                return setter, getter, corename
    return None


def blas_threads(n: int | None = None) -> int | None:
    """The number of threads of the kernels' BLAS (None where it cannot be told); with `n`, set
    it first. SciPy's OpenBLAS only: see `_openblas`."""
    functions = _openblas()
    if functions is None:
        return None
    setter, getter, _ = functions
    if n is not None:
        setter(int(n))
    return getter()


def blas_kernels() -> str | None:
    """The CPU whose kernels the kernels' BLAS runs ("SkylakeX", "Haswell", ...), or None where
    it cannot be told. OpenBLAS picks them by CPU model when it loads, unless the environment
    names one in OPENBLAS_CORETYPE; an older CPU's kernels can run at half the speed (Haswell's
    AVX2 on an AVX-512 machine), so the benchmarks print which ran."""
    functions = _openblas()
    if functions is None or functions[2] is None:
        return None
    return functions[2]().decode("ascii", "replace")
