"""Keeping freed memory in the process while a training loop runs.

A training step allocates the same arrays every step (the tape, the gate buffers, the
gradients: ~15 MB at the adding task's size) and frees them before the next. glibc's malloc
serves blocks above its mmap threshold (128 KiB at first) from fresh mappings and gives the
top of its heap back to the system once more than its trim threshold is free, so every step
faulted its pages in again: 3,200 page faults a step, half the time of a step in the first
`rnndsl train` of a process (measured: 96 steps/s with 1.55 s of system time over 200 steps;
187 steps/s with the thresholds below). glibc raises the thresholds itself only after it
frees a mapping larger than they are, which a run may never do. Inference alike: the LSTM's
forward pass at T=100, B=16, H=128 took 3.7 ms, 2.8 ms with the thresholds below. So a cpu
cell sets them when it is made (engines/cell.py), and `rnndsl train` whatever the target.
"""
from __future__ import annotations

import ctypes
import sys

_M_TRIM_THRESHOLD = -1  # mallopt's parameter numbers (malloc.h)
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's largest on 64-bit: a bigger block still gets a mapping
TRIM_THRESHOLD = 1 << 30  # free memory kept at the heap's top before it goes back


def keep_freed_memory() -> bool:
    """Have glibc's malloc reuse freed blocks up to MMAP_THRESHOLD instead of unmapping them,
    for the rest of the process; True where the settings took (glibc), else False (another
    C library: nothing changes). The process keeps up to TRIM_THRESHOLD of freed memory,
    which it reuses, instead of returning it to the system."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and \
        bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
