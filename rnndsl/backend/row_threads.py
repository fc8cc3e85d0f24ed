"""The CPU time loops on several cores: a pass's batch rows split between threads.

Batch rows never meet inside a time loop: each row's products, gate arithmetic, reductions
and tape are its own, and what sums over rows (weight and bias gradients, input gradients)
is done after the loop by GEMMs over all T*B rows. So the rows split into contiguous chunks,
one per thread, each running the whole loop over its chunk with no synchronisation until the
end. (Splitting the hidden units instead would need a barrier at every step; on this
project's 2-core machine that collapses whenever the cores are busy.)

The kernels release the GIL (`nogil=True`); the caller runs the first chunk itself and the
other chunks go to a small pool of threads. How many threads: `set_loop_threads(n)`, else the
kernels' BLAS threads (`blas.blas_threads`, which follows OPENBLAS_NUM_THREADS and which
the PyTorch bridge lowers to one while torch holds a pool of its own), else the cores; never
fewer than MIN_ROWS rows a thread. Within `loops_on(run, n)` a thread's loops split into n
chunks that `run` takes instead (the bridge: torch's OpenMP team, openmp_team.py).
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import partial
from typing import Callable

from rnndsl.backend.blas import blas_threads
from rnndsl.backend.packed import MICRO_MAX_ROWS

MIN_ROWS = 4  # the micro-kernel's tile of rows: fewer a thread leave its registers idle

_SETTING: list[int | None] = [None]
_POOL: list[tuple[int, ThreadPoolExecutor] | None] = [None]  # (its workers, the pool)
_POOL_LOCK = threading.Lock()
_ROUTE = threading.local()  # .run, .threads: where this thread's chunks go, or absent


def set_loop_threads(n: int | None) -> None:
    """Threads for the time loops of the CPU kernels: a number, or None (the default: as many
    as the kernels' BLAS has)."""
    if n is not None and (not isinstance(n, int) or n < 1):
        raise ValueError(f"threads must be a whole number of at least 1, got {n!r}")
    _SETTING[0] = n


def loop_setting() -> int | None:
    """What `set_loop_threads` last set."""
    return _SETTING[0]


def loop_threads() -> int:
    """The threads a time loop may use now: `loops_on`'s, else the setting, else the BLAS's,
    else the cores."""
    return getattr(_ROUTE, "threads", None) or _SETTING[0] or blas_threads() or _cores()


@contextmanager
def loops_on(run: Callable[[list[Callable[[], None]]], None], threads: int):
    """Within the block, this thread's time loops split their rows for `threads` threads, and
    `run(tasks)` runs all the chunks, the first included (which threads run them is the
    point: for the bridge, the ones torch's operations left spinning)."""
    before = getattr(_ROUTE, "run", None), getattr(_ROUTE, "threads", None)
    _ROUTE.run, _ROUTE.threads = run, threads
    try:
        yield
    finally:
        _ROUTE.run, _ROUTE.threads = before


def on_team() -> bool:
    """Whether this thread's chunks go to `loops_on`'s team (the bridge) rather than rnndsl's
    own pool."""
    return getattr(_ROUTE, "run", None) is not None


def _cores() -> int:
    if hasattr(os, "sched_getaffinity"):  # the cores this process may run on (Linux)
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


SMALL_WORK = 1 << 19  # elements a pass without per-step products keeps to one thread below


def row_chunks(B: int, elementwise: int | None = None) -> list[tuple[int, int]]:
    """Contiguous chunks of the B rows, one per thread, sizes differing by one at most.
    `elementwise`: for a loop with no per-step product, the elements a row's pass works
    through (T times the state's width); below SMALL_WORK for all rows, one chunk, as
    handing a chunk to another thread costs more than it saves (IndRNN at T=100, B=16,
    H=128, 205K elements: forward 0.43-0.48 ms on one thread against 0.54 on two; at T=500,
    B=8, H=256, 1M elements, forward and backward 5% faster on two)."""
    threads = loop_threads()
    if elementwise is not None and B * elementwise < SMALL_WORK:
        threads = 1
    n = max(1, min(threads, B // MIN_ROWS))
    return [(B * k // n, B * (k + 1) // n) for k in range(n)]


def chunk_rows(chunks: list[tuple[int, int]]) -> int:
    """The most rows one chunk has: what the per-step products are packed for."""
    return max(b1 - b0 for b0, b1 in chunks)


def _pool(workers: int) -> ThreadPoolExecutor:
    with _POOL_LOCK:
        if _POOL[0] is None or _POOL[0][0] < workers:
            if _POOL[0] is not None:
                _POOL[0][1].shutdown(wait=False)  # its queued chunks still run
            _POOL[0] = (workers, ThreadPoolExecutor(workers, thread_name_prefix="rnndsl-rows"))
        return _POOL[0][1]


def _forget_pool():
    """A forked child has none of its parent's threads: it starts a pool of its own."""
    _POOL[0] = None


os.register_at_fork(after_in_child=_forget_pool)


def run_rows(kernel, T: int, chunks: list[tuple[int, int]], private: tuple, *shared) -> None:
    """kernel(T, b0, b1, *(p[k] for p in private), *shared) for every chunk k of the rows:
    each array in `private` has one slice per chunk (scratch, and sums over the chunk's rows
    that the caller adds up). Returns when all chunks are done."""
    def run(k):
        b0, b1 = chunks[k]
        kernel(T, b0, b1, *(p[k] for p in private), *shared)

    first = 0
    if len(chunks) == 1 or not kernel.overloads:  # compile (or load) it on this thread, once
        run(0)
        first = 1
    if first == len(chunks):
        return
    # Chunks of more rows than the micro-kernel takes multiply through BLAS: one BLAS thread
    # per chunk, or the chunks' BLAS pools would fight for the same cores.
    before = blas_threads() if chunk_rows(chunks) > MICRO_MAX_ROWS else None
    if before is not None:
        blas_threads(1)
    try:
        route = getattr(_ROUTE, "run", None)
        if route is not None:
            route([partial(run, k) for k in range(first, len(chunks))])
        else:
            others = [_pool(len(chunks) - 1).submit(run, k)
                      for k in range(first + 1, len(chunks))]
            try:
                run(first)
            finally:
                for f in others:
                    f.result()
    finally:
        if before is not None:
            blas_threads(before)
