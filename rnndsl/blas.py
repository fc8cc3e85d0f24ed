"""The process's matrix products outside the time loop, through the BLAS that Numba calls.

NumPy and SciPy (whose BLAS Numba's compiled `np.dot` calls) each bundle their own OpenBLAS,
each with a thread pool that spins for a while after a call. Once a kernel has run, both pools
compete for the cores, and on this project's 2-core machine a NumPy GEMM right after a kernel
ran 6x slower. So the generated glue, the layers and the heads multiply through `gemm`, and
only one pool exists.
"""
import numpy as np
from numba import njit


@njit(cache=True)
def gemm(a, b):
    """a @ b for 2-D arrays of one dtype (C- or Fortran-contiguous, such as a transpose)."""
    return np.dot(a, b)
