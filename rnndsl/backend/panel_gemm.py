"""The products over all T*B rows with a cell's weights, by the per-step product's micro-kernel.

A pass multiplies all its rows by a stack of weights outside the time loop: the input products
before it (x @ [W_i, W_f, ...].T) and the input gradients after it (dG @ [W_i, W_f, ...]). Both
are a tall matrix times a small one, which is what the per-step micro-kernel is built for
(packed.py): the weights packed once, in panels that stay in the cache while blocks of rows
stream past. The rows split between threads like the time loops' (row_threads.run_rows: the
kernels' row threads, or within the PyTorch bridge torch's own OpenMP team). Measured on this
project's 2-core AVX-512 machine (AMD EPYC, 2026-12-01, float32, medians of 9, both cores):
6400 x 512 @ 512 x 2048 at 369-408 GFLOP/s against 199 (OpenBLAS's Haswell kernels, which the
machine's environment selects), 319 (its own choice, SkylakeX) and 175-183 (torch.mm: MKL's
AVX2 code on AMD); 4000 x 256 @ 256 x 1024 at 398-420 against 246 / 471 / 167; the input
gradient 6400 x 2048 @ 2048 x 512 at 373-377 against 233 (Haswell) and 202 (torch.mm). At
1600 x 128 @ 128 x 512 all were within 10% of each other (209-244).

Against OpenBLAS's own kernels (nothing set in the environment) it wins only on large
products, and on torch's OpenMP team: on rnndsl's own pool a chunk's thread starts 50-130 us
after it is handed over (measured here), where BLAS's threads start at once. Measured,
float32, both cores, BLAS's own kernels, in turns, three runs: on the family 25 AMD EPYC (Zen
4) OpenBLAS was 20-35% faster at 1600 x 128 @ 128 x 512 (the LSTM at S), 3-14% at 4000 x 256
@ 256 x 1024 (L), 6-25% at 3200 x 64 @ 64 x 256, 15-20% at 1600 x 256 @ 256 x 512, and the
micro-kernel 5-9% faster at 6400 x 512 @ 512 x 2048 (M); on the family 26 one (Zen 5)
OpenBLAS 12-18% faster at L, within 10% at S, the micro-kernel 15-28% faster at M. So on
rnndsl's own threads the micro-kernel takes products of OWN_THREADS_MIN_WORK multiply-adds
and more; on torch's team (`row_threads.on_team`: the PyTorch bridge, where the alternative
is `torch.mm`, MKL's AVX2 code on AMD) every product that suits it (the bridge's training
step at S: 1.81x -> 1.44x of nn.LSTM's time on the Zen 5 machine).

The products the micro-kernel does not suit stay with `blas.gemm`: outputs whose width is not
a whole number of panels (the result must be exactly rows x N, and a padded one would be
copied), sums too deep for a panel to stay in the L2 cache, fewer rows than a chunk of the
micro-kernel's tiles, and float types other than float32 and float64.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from rnndsl.backend.blas import gemm
from rnndsl.backend.packed import pack, packed_dot, panel_width
from rnndsl.backend.row_threads import on_team, row_chunks, run_rows
from rnndsl.backend.scratch import empty

BLOCK_ROWS = 64  # rows a packed_dot call takes: 64 x K stays in L2 beside the panel
PANEL_BYTES = 512 << 10  # a panel (K x its columns) at most this large: half of an L2 cache
MIN_ROWS = 64  # fewer rows: one BLAS call costs less than packing and handing out chunks
# multiply-adds below which the product stays on the calling thread: handing a chunk to
# another thread and waiting for it cost about 50 us here, the time of 2^22 of them on one core
SPLIT_WORK = 1 << 22
# multiply-adds from which a product on rnndsl's own threads takes the micro-kernel (above):
# M's input products (6.7e9) do, L's (1.0e9) and smaller do not
OWN_THREADS_MIN_WORK = 1 << 31


def weight_product(rows: np.ndarray, w: np.ndarray) -> np.ndarray:
    """rows (R, K) @ w (K, N), as `blas.gemm` computes it: by the micro-kernel over row
    chunks where that suits the shapes (see the module's note), else by `gemm`."""
    r, k = rows.shape
    n = w.shape[1]
    if not _suits(rows, w):
        return gemm(rows, w)
    rows = np.ascontiguousarray(rows)
    out = empty((r, n), rows.dtype)
    chunks = row_chunks(r) if r * k * n >= SPLIT_WORK else [(0, r)]
    run_rows(_product_rows, 0, chunks, (), rows, pack(w, 1), out)
    return out


def _suits(rows: np.ndarray, w: np.ndarray) -> bool:
    k, n = w.shape
    if rows.dtype not in (np.float32, np.float64) or w.dtype != rows.dtype or \
            rows.shape[0] < MIN_ROWS:
        return False
    if rows.shape[0] * k * n < OWN_THREADS_MIN_WORK and not on_team():
        return False
    width = panel_width(rows.dtype)
    return n % width == 0 and k * width * rows.itemsize <= PANEL_BYTES


@njit(cache=True, nogil=True, error_model="numpy", boundscheck=False)
def _product_rows(T, r0, r1, rows, w, out):
    """out[r0:r1] = rows[r0:r1] @ the packed weights, BLOCK_ROWS rows a call (a time loop's
    signature, for run_rows: T is not used)."""
    for b in range(r0, r1, BLOCK_ROWS):
        e = min(b + BLOCK_ROWS, r1)
        packed_dot(rows[b:e], w, out[b:e])
