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
training and the PyTorch bridge lower to one while they run), and never fewer than MIN_ROWS
rows a thread.
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

from rnndsl.backend.blas import blas_threads
from rnndsl.backend.packed import MICRO_MAX_ROWS
from rnndsl.backend.scratch import empty

MIN_ROWS = 4  # the micro-kernel's tile of rows: fewer a thread leave its registers idle

_SETTING: list[int | None] = [None]
_POOL: list[ThreadPoolExecutor | None] = [None]
_POOL_LOCK = threading.Lock()


def set_loop_threads(n: int | None) -> None:
    """Threads for the time loops of the CPU kernels: a number, or None (the default: as many
    as the kernels' BLAS has)."""
    if n is not None and (not isinstance(n, int) or n < 1):
        raise ValueError(f"threads must be a whole number of at least 1, got {n!r}")
    _SETTING[0] = n


def loop_threads() -> int:
    """The threads a time loop may use now."""
    return _SETTING[0] or blas_threads() or 1


def row_chunks(B: int) -> list[tuple[int, int]]:
    """Contiguous chunks of the B rows, one per thread, sizes differing by one at most."""
    n = max(1, min(loop_threads(), B // MIN_ROWS))
    return [(B * k // n, B * (k + 1) // n) for k in range(n)]


def chunk_rows(B: int) -> int:
    """The most rows one chunk has: what the per-step products are packed for."""
    return max(b1 - b0 for b0, b1 in row_chunks(B))


def _pool(workers: int) -> ThreadPoolExecutor:
    with _POOL_LOCK:
        pool = _POOL[0]
        if pool is None or pool._max_workers < workers:
            if pool is not None:
                pool.shutdown(wait=False)
            pool = _POOL[0] = ThreadPoolExecutor(workers, thread_name_prefix="rnndsl-rows")
        return pool


def _forget_pool():
    """A forked child has none of its parent's threads: it starts a pool of its own."""
    _POOL[0] = None


os.register_at_fork(after_in_child=_forget_pool)


def run_rows(kernel, T: int, B: int, row_width: int, dtype, *args) -> None:
    """kernel(T, b0, b1, row, *args) for every chunk of the B rows, `row` a scratch array of
    `row_width` elements per chunk; returns when all chunks are done."""
    chunks = row_chunks(B)
    rows = empty((len(chunks), max(row_width, 1)), dtype)
    if len(chunks) == 1:
        kernel(T, 0, B, rows[0], *args)
        return
    # Chunks of more rows than the micro-kernel takes multiply through BLAS: one BLAS thread
    # per chunk, or the chunks' BLAS pools would fight for the same cores.
    before = blas_threads() if max(b1 - b0 for b0, b1 in chunks) > MICRO_MAX_ROWS else None
    if before is not None:
        blas_threads(1)
    try:
        pool = _pool(len(chunks) - 1)
        others = [pool.submit(kernel, T, b0, b1, rows[k], *args)
                  for k, (b0, b1) in enumerate(chunks[1:], start=1)]
        try:
            kernel(T, chunks[0][0], chunks[0][1], rows[0], *args)
        finally:
            for f in others:
                f.result()
    finally:
        if before is not None:
            blas_threads(before)
