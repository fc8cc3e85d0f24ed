"""Numba's CUDA simulator, made to run the blocks of a grid at the same time, so that a kernel
that synchronises its whole grid (the multi-block persistent kernels) can be tested there.

The simulator runs one block after another and takes `grid.sync()` for a block barrier, which
is right for one block only. Inside `concurrent_blocks(n)`, every launch starts the threads of
all its blocks together: `cuda.syncthreads()` waits for the threads of the block,
`grid.sync()` for every thread of the grid, each block has its own shared memory, and the
device reports `n` multiprocessors to rnndsl (so the multi-block kernel may get n blocks).
A missing grid sync then lets a block read what another has not written yet (NaN, with
rnndsl.backend.scratch's NaN-filled buffers), where the one-block simulator could not tell.
"""
from __future__ import annotations

import math
import sys
import threading
import traceback
from contextlib import contextmanager

import numpy as np
from numba.cuda.simulator import kernel as simulated_kernel
from numba.cuda.simulator import kernelapi

from rnndsl.backend import cuda_support as cs


class _GridThread(threading.Thread):
    """One GPU thread: the attributes the simulator's cuda module reads, and both barriers."""

    def __init__(self, run, block: tuple, thread: tuple, block_dim: tuple, barriers: dict):
        super().__init__(target=self._guarded, daemon=True)
        self.run_kernel = run
        self.blockIdx = kernelapi.Dim3(*block)
        self.threadIdx = kernelapi.Dim3(*thread)
        self.thread_id = thread[0] + block_dim[0] * (thread[1] + block_dim[1] * thread[2])
        self.barriers = barriers
        self.exception = None

    def _guarded(self):
        try:
            self.run_kernel()
        except threading.BrokenBarrierError as exc:  # another thread failed first
            self.exception = exc
        except Exception as exc:  # noqa: BLE001 (re-raised by the launch)
            self.exception = exc
            for barrier in self.barriers.values():
                barrier.abort()

    def syncthreads(self):
        self.barriers[tuple(self.blockIdx)].wait()

    def grid_sync(self):
        self.barriers["grid"].wait()


class _ConcurrentBlocks:
    """Stands in for the simulator's BlockManager, which FakeCUDAKernel makes once per block
    and runs at once: this one collects the launch's blocks and runs them together when the
    last one arrives."""

    pending: list = []

    def __init__(self, f, grid_dim, block_dim, debug):
        self.f, self.grid_dim, self.block_dim = f, tuple(grid_dim), tuple(block_dim)

    def run(self, grid_point, *args):
        _ConcurrentBlocks.pending.append(tuple(grid_point))
        if len(_ConcurrentBlocks.pending) < math.prod(self.grid_dim):
            return
        blocks, _ConcurrentBlocks.pending = _ConcurrentBlocks.pending, []
        per_block = math.prod(self.block_dim)
        barriers = {"grid": threading.Barrier(len(blocks) * per_block)}
        barriers.update({b: threading.Barrier(per_block) for b in blocks})
        threads = [_GridThread(lambda: self.f(*args), b, t, self.block_dim, barriers)
                   for b in blocks for t in np.ndindex(*self.block_dim)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        failed = [t.exception for t in threads if t.exception is not None]
        first = next((e for e in failed if not isinstance(e, threading.BrokenBarrierError)),
                     failed[0] if failed else None)
        if first is not None:
            raise first


_shared_lock = threading.Lock()


def _block_shared(module):
    """The shared memory of the calling thread's block (one allocator per block)."""
    key = ("shared", tuple(threading.current_thread().blockIdx))
    with _shared_lock:
        if key not in module.__dict__:
            module.__dict__[key] = _LockedShared(module._shared._dynshared_size)
        return module.__dict__[key]


class _LockedShared(kernelapi.FakeCUDAShared):
    """The simulator's shared memory (one array per line of the kernel that allocates it),
    with allocation made safe for threads that arrive at the line together."""

    def array(self, shape, dtype, alignment=None):
        if shape == 0:  # the dynamic shared memory, made with the allocator
            # (Numba's built-in simulator takes no alignment; numba-cuda's does)
            extra = () if alignment is None else (alignment,)
            return super().array(shape, dtype, *extra)
        caller = traceback.extract_stack(sys._getframe(1), limit=1)[0][0:2]
        with _shared_lock:
            if caller not in self._allocations:
                self._allocations[caller] = np.empty(shape, dtype)
            return self._allocations[caller]


@contextmanager
def concurrent_blocks(multiprocessors: int):
    """Within: the simulator runs a grid's blocks concurrently, and rnndsl sees a device with
    `multiprocessors` co-resident blocks."""
    saved = (simulated_kernel.BlockManager, kernelapi.GridGroup.sync,
             kernelapi.FakeCUDAModule.shared, cs.SIMULATED_MULTIPROCESSORS)
    simulated_kernel.BlockManager = _ConcurrentBlocks
    kernelapi.GridGroup.sync = lambda self: threading.current_thread().grid_sync()
    kernelapi.FakeCUDAModule.shared = property(_block_shared)
    cs.SIMULATED_MULTIPROCESSORS = multiprocessors
    try:
        yield
    finally:
        (simulated_kernel.BlockManager, kernelapi.GridGroup.sync,
         kernelapi.FakeCUDAModule.shared, cs.SIMULATED_MULTIPROCESSORS) = saved
