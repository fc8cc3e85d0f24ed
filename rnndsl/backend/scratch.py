"""Uninitialised arrays for generated code, and a debug mode that fills them with NaN.

Generated glue allocates its buffers with `empty`: the kernels write every element before
reading it, which is what makes skipping the fill worth it. The debug mode (the `nan_scratch`
context, or RNNDSL_NAN_SCRATCH=1 in the environment) fills every such buffer with NaN instead,
so that a kernel that reads an element before writing it gives NaN every time rather than
whatever the allocator returned: the differential tests run in this mode.

Buffers of a few KB and more start on a cache-line boundary (`aligned`): the kernels load and
store them in 512-bit vectors, and malloc's 16-byte alignment leaves three starts in four
mid-line, where a vector access splits across two lines. Which start a buffer got changed
from one process to the next, and the per-step micro-kernel with it (float32, AMD EPYC of
family 25, one core: 1600 x 128 @ 128 x 512 at 98 GFLOP/s with the packed weights and the
output aligned, 83-88 with either off by 16 bytes; two cores 127 against 101-121).
"""
from __future__ import annotations

import math
import os
from contextlib import contextmanager

import numpy as np

_fill_nan = os.environ.get("RNNDSL_NAN_SCRATCH") == "1"


def fill_nan() -> bool:
    return _fill_nan


LINE = 64  # bytes: a cache line, and one 512-bit vector
ALIGN_FROM = 4096  # bytes: smaller buffers keep NumPy's allocation (cheaper to make)


def aligned(shape, dtype) -> np.ndarray:
    """An uninitialised C-contiguous array whose data starts on a cache line if it is at least
    ALIGN_FROM bytes long."""
    dtype = np.dtype(dtype)
    size = math.prod(shape) * dtype.itemsize
    if size < ALIGN_FROM:
        return np.empty(shape, dtype)
    raw = np.empty(size + LINE, np.uint8)
    start = -raw.ctypes.data % LINE
    return raw[start:start + size].view(dtype).reshape(shape)


def empty(shape, dtype) -> np.ndarray:
    out = aligned((shape,) if isinstance(shape, (int, np.integer)) else tuple(shape), dtype)
    if _fill_nan:
        out.fill(np.nan)
    return out


@contextmanager
def nan_scratch(on: bool = True):
    """Within the block, scratch buffers of generated code start as NaN."""
    global _fill_nan
    before, _fill_nan = _fill_nan, on
    try:
        yield
    finally:
        _fill_nan = before
