"""Uninitialised arrays for generated code, and a debug mode that fills them with NaN.

Generated glue allocates its buffers with `empty`: the kernels write every element before
reading it, which is what makes skipping the fill worth it. The debug mode (the `nan_scratch`
context, or RNNDSL_NAN_SCRATCH=1 in the environment) fills every such buffer with NaN instead,
so that a kernel that reads an element before writing it gives NaN every time rather than
whatever the allocator returned: the differential tests run in this mode.
"""
from __future__ import annotations

import os
from contextlib import contextmanager

import numpy as np

_fill_nan = os.environ.get("RNNDSL_NAN_SCRATCH") == "1"


def fill_nan() -> bool:
    return _fill_nan


def empty(shape, dtype) -> np.ndarray:
    if _fill_nan:
        return np.full(shape, np.nan, dtype)
    return np.empty(shape, dtype)


@contextmanager
def nan_scratch(on: bool = True):
    """Within the block, scratch buffers of generated code start as NaN."""
    global _fill_nan
    before, _fill_nan = _fill_nan, on
    try:
        yield
    finally:
        _fill_nan = before
