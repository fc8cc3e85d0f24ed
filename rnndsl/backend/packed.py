"""The CPU kernels' per-step recurrent product: weights packed once per pass, and a
register-blocked micro-kernel in explicit SIMD vectors.

A time loop multiplies the same weight matrix W (K, N) by a small block of rows h (B, K) at
every step. OpenBLAS re-packs W on every call and, above a size, splits the product over its
threads, which costs more than it gives at these sizes and collapses when the cores are busy.
Measured on this project's 2-core AVX-512 machine, float32, per step, the two alternated in
one process (medians of 21; load average 4-5, other jobs running): 16x128 @ 128x512 (LSTM S)
20 us against 231 us through `np.dot` (its best run 30 us; at load 1.8, 19 us against 35 us);
8x256 @ 256x1024 (LSTM L) 239 us against 2415 us (best runs 139-219 against 370); but
16x128 @ 128x384 (GRU S, where OpenBLAS stays on one thread) 15 us for both, and 1x64 @ 64x256
(T1) 0.72 against 0.74 us: single-threaded OpenBLAS is as fast as this micro-kernel.

The layout (`pack`): W's columns cut into panels of PANEL columns, each panel stored as one
contiguous (K, PANEL) block, the last one padded with zero columns. The product (`packed_dot`)
writes all P * PANEL columns of `out`; callers read only the first N. The micro-kernel keeps a
tile of 4 rows by 2 vectors of accumulators in registers for the whole K loop: per k, two
vector loads of the panel, four broadcasts of h, eight fused multiply-adds. Rows beyond a
multiple of 4 go one at a time. A vector is as wide as the machine's widest (512 bits with
AVX-512, 256 with AVX, else 128), written as LLVM vector values through simd.py's intrinsics,
since neither Numba nor LLVM's vectorisers keep a loop's accumulators in registers on their
own (written as scalars, LLVM vectorised the K loop with gathers or not at all: 5-12 GFLOP/s).

The rule, `use_micro_kernel`: up to MICRO_MAX_ROWS rows the micro-kernel (one core); larger
blocks stay with BLAS, one panel as wide as W (`pack` returns W itself and `packed_dot` calls
np.dot). The rows are a time loop's chunk of the batch (row_threads.py), so on 2 cores LSTM M's
64 rows run as two chunks of 32, each through the micro-kernel on its own core. Before the
chunks, at 64 rows on one core the micro-kernel ran at 105-112 GFLOP/s while threaded BLAS on
a quiet machine ran the whole LSTM forward at M at 140 GFLOP/s; the bound of 32 lies between
that and 16 rows, where the micro-kernel won by almost 2x; 32 itself was not measured quietly.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from rnndsl.backend.blas import gemm
from rnndsl.backend.scratch import aligned
from rnndsl.backend.simd import VECTOR_BITS, lanes, vadd, vfma, vload, vsplat, vstore

MICRO_MAX_ROWS = 32


def panel_width(dtype) -> int:
    """Columns per panel: the micro-kernel's two vectors."""
    return 2 * lanes(dtype)


@njit(cache=True)
def use_micro_kernel(rows: int) -> bool:
    """The rule `pack` applies; `packed_dot` follows the layout `pack` chose."""
    return rows <= MICRO_MAX_ROWS


def pack(w: np.ndarray, rows: int) -> np.ndarray:
    """W (K, N) as (P, K, width) panels for a product with `rows` rows: PANEL columns each if
    the micro-kernel takes it, else one panel, W itself."""
    k, n = w.shape
    if not use_micro_kernel(rows):
        return np.ascontiguousarray(w).reshape(1, k, n)
    width = panel_width(w.dtype)
    out = aligned((-(-n // width), k, width), w.dtype)
    _fill_panels(w, out)
    return out


@njit(cache=True, boundscheck=False)
def _fill_panels(w, out):
    """out[p, k, c] = w[k, p * width + c], zeros past W's last column: one pass over W, where
    padding, copying and transposing through NumPy took three (70 of 280 us of a one-step LSTM
    pass at B=16, I=H=128), reading W along its rows or its columns, whichever is contiguous."""
    k_size, n = w.shape
    count, _, width = out.shape
    if w.strides[1] <= w.strides[0]:  # rows contiguous (C order)
        for k in range(k_size):
            for p in range(count):
                for c in range(width):
                    col = p * width + c
                    out[p, k, c] = w[k, col] if col < n else 0
    else:  # columns contiguous (a transpose)
        for p in range(count):
            for c in range(width):
                col = p * width + c
                if col < n:
                    for k in range(k_size):
                        out[p, k, c] = w[k, col]
                else:
                    for k in range(k_size):
                        out[p, k, c] = 0


def packed_width(w) -> int:
    """The columns `packed_dot` (or `block_dot`, for `pack_blocks`'s tuple) writes."""
    if isinstance(w, tuple):
        return int(w[3].max()) + w[0].shape[2]
    return w.shape[0] * w.shape[2]


# -- block-diagonal weights ------------------------------------------------------------------
# A stack with block-diagonal weights (xLSTM's head-wise R, `blocks:` in a spec) is multiplied
# by its diagonal blocks alone. Its product h @ M (M the stack as the dense path multiplies it)
# is cut into output segments, each a run of columns that reads a known set of h's columns:
# forward (M = stack.T) one segment per block of each weight, reading that block's columns of
# h (all of them for a dense weight in the stack); transposed (M = stack, the W.T @ g sums)
# one segment per run of columns that lies within one block of every weight, reading each
# weight's rows of that block. Each segment is cut into panels of PANEL columns; a panel keeps
# the rows it reads (`index`, `depth` of them) and the column it writes from (`start`). Panels
# go in the order of their columns and write PANEL columns each, so a segment's padding lands
# in the next segment's columns, which its own panels then write (and past the last column:
# `packed_width` leaves room). Every stack with blocks takes the micro-kernel, whatever the
# rows: a block's product is too small for BLAS's threads.


def block_segments(parts, cols: int, transposed: bool) -> list[tuple[int, int, np.ndarray]]:
    """(first column, end, h's columns it reads) of each output segment of a stack's product;
    `parts` (rows, blocks) of each weight in the stack, `cols` their columns."""
    offsets = np.cumsum([0] + [rows for rows, _ in parts])
    if not transposed:
        out = []
        for (rows, blocks), off in zip(parts, offsets):
            size = rows // blocks
            out += [(off + j * size, off + (j + 1) * size,
                     np.arange(j * size, (j + 1) * size) if blocks > 1 else np.arange(cols))
                    for j in range(blocks)]
        return out
    edges = sorted({0, cols} | {j * (rows // blocks) for rows, blocks in parts if blocks > 1
                                for j in range(blocks)})
    out = []
    for first, end in zip(edges, edges[1:]):
        reads = [off + np.arange(rows) if blocks == 1 else
                 off + first // (rows // blocks) * (rows // blocks) + np.arange(rows // blocks)
                 for (rows, blocks), off in zip(parts, offsets)]
        out.append((first, end, np.concatenate(reads)))
    return out


def pack_blocks(m: np.ndarray, parts, transposed: bool):
    """The panels of h @ m for a stack with block-diagonal weights (see above): a tuple
    (panels (P, depth, PANEL), index (P, depth), depth (P,), start (P,)) for `block_dot`."""
    width = panel_width(m.dtype)
    cols = m.shape[1] if transposed else m.shape[0]
    panels = [(first + q, min(first + q + width, end), reads)
              for first, end, reads in block_segments(parts, cols, transposed)
              for q in range(0, end - first, width)]
    deepest = max(len(reads) for _, _, reads in panels)
    data = aligned((len(panels), deepest, width), m.dtype)
    data.fill(0)
    index = np.zeros((len(panels), deepest), np.int64)
    for p, (start, stop, reads) in enumerate(panels):
        data[p, :len(reads), :stop - start] = m[reads, start:stop]
        index[p, :len(reads)] = reads
    return (data, index, np.array([len(reads) for _, _, reads in panels], np.int64),
            np.array([start for start, _, _ in panels], np.int64))


def block_product(h: np.ndarray, w) -> np.ndarray:
    """h (rows, K) @ the stack that `pack_blocks` made `w` of, by the micro-kernel (one core):
    the products over all T*B rows of a stack with block-diagonal weights, as wide as
    `packed_width`."""
    out = aligned((h.shape[0], packed_width(w)), h.dtype)
    block_dot(np.ascontiguousarray(h), w, out)
    return out


def stacked_weight_grads(g: np.ndarray, v: np.ndarray, parts) -> list[np.ndarray]:
    """The gradients of a stack's weights W_k in y = v @ stack.T, from g = dL/dy (rows, N),
    each weight's columns side by side, and v (rows, C); `parts` the (rows, diagonal blocks)
    of each weight. Dense weights: one GEMM for all of them. A block-diagonal weight's
    gradient has its diagonal blocks alone, zero elsewhere (as the reference engine's): per
    block one product, v's block transposed times the blocks of all the weights with blocks
    of that size, by the per-step product's micro-kernel (packed.py): its blocks are as small
    as the per-step products, and BLAS's threads cost more than they give there (one BLAS
    call per block took 8 ms instead of 0.1 when the machine's two cores were busy)."""
    offsets = np.cumsum([0] + [rows for rows, _ in parts])

    def columns(ranges) -> np.ndarray:
        """g's columns in `ranges`, side by side (copying slices is 15x as fast as indexing
        with an array of the columns, measured at 1600 x 512)."""
        return np.concatenate([g[:, first:end] for first, end in ranges], axis=1)

    out: list = [None] * len(parts)
    dense = [k for k, (_, blocks) in enumerate(parts) if blocks == 1]
    if dense:
        m = gemm((g if len(dense) == len(parts) else
                  columns([(offsets[k], offsets[k + 1]) for k in dense])).T, v)
        for k, first in zip(dense, np.cumsum([0] + [parts[k][0] for k in dense])):
            out[k] = m[first:first + parts[k][0]]
    by_size: dict[int, list[int]] = {}
    for k, (rows, blocks) in enumerate(parts):
        if blocks > 1:
            by_size.setdefault(rows // blocks, []).append(k)
            out[k] = np.zeros((rows, rows), g.dtype)
    across = np.ascontiguousarray(v.T) if by_size else None
    for size, members in by_size.items():
        for first in range(0, v.shape[1], size):  # block (first, first): v's block by g's
            g_block = columns([(offsets[k] + first, offsets[k] + first + size) for k in members])
            panels = pack(g_block, size)
            m = aligned((size, packed_width(panels)), g.dtype)
            packed_dot(across[first:first + size], panels, m)
            for i, k in enumerate(members):
                out[k][first:first + size, first:first + size] = m[:, i * size:(i + 1) * size].T
    return out


# -- the product ------------------------------------------------------------------------------
@njit(cache=True, error_model="numpy", boundscheck=False)
def packed_dot(h, w, out):
    """out[:, :P * PANEL] = h (B, K) @ w, the weights as `pack` made them for at least these
    rows (panels: the micro-kernel; one panel as wide as W: BLAS); h and out C-contiguous.
    W packed as one panel exactly PANEL wide is the same array either way."""
    rows, k_size = h.shape
    count, _, width = w.shape
    if width * 8 * h.itemsize != 2 * VECTOR_BITS:
        np.dot(h, w[0], out)
        return
    flat_w, flat_h, flat_out = w.reshape(-1), h.reshape(-1), out.reshape(-1)
    for p in range(count):
        _panel_product(flat_h, k_size, rows, flat_w, p * k_size * width, width, k_size, None,
                       flat_out, out.shape[1], p * width)


@njit(cache=True, error_model="numpy", boundscheck=False)
def packed_matvec(v, w, out):
    """out[:P * PANEL] = v (K,) @ w, the weights packed by `pack(W, 1)`: one row of the
    product (the row kernels' products with a parameter, emit_rows.py); v and out
    C-contiguous 1-D arrays, out as long as `packed_width(w)`."""
    count, k_size, width = w.shape
    flat_w = w.reshape(-1)
    for p in range(count):
        _panel_product(v, k_size, 1, flat_w, p * k_size * width, width, k_size, None, out,
                       out.shape[0], p * width)


@njit(cache=True, error_model="numpy", boundscheck=False)
def _panel_product(flat_h, k_size, rows, flat_w, base, width, depth, index, flat_out, n, at):
    """One panel's columns of the product, for all rows: out[b, at:at + width] = the sum over
    k < depth of h[b, index[k]] times the panel's row k (stored from flat_w[base], `width`
    wide); index None: h's first `depth` columns (Numba compiles that case without it)."""
    step = width // 2  # the lanes of one vector
    zero = vsplat(flat_w[0] - flat_w[0])
    whole = rows - rows % 4
    for b in range(0, whole, 4):
        a00, a01, a10, a11 = zero, zero, zero, zero
        a20, a21, a30, a31 = zero, zero, zero, zero
        for k in range(depth):
            col = k if index is None else index[k]
            w0 = vload(flat_w, base + k * width)
            w1 = vload(flat_w, base + k * width + step)
            x = vsplat(flat_h[b * k_size + col])
            a00, a01 = vfma(x, w0, a00), vfma(x, w1, a01)
            x = vsplat(flat_h[(b + 1) * k_size + col])
            a10, a11 = vfma(x, w0, a10), vfma(x, w1, a11)
            x = vsplat(flat_h[(b + 2) * k_size + col])
            a20, a21 = vfma(x, w0, a20), vfma(x, w1, a21)
            x = vsplat(flat_h[(b + 3) * k_size + col])
            a30, a31 = vfma(x, w0, a30), vfma(x, w1, a31)
        here = b * n + at
        vstore(flat_out, here, a00)
        vstore(flat_out, here + step, a01)
        vstore(flat_out, here + n, a10)
        vstore(flat_out, here + n + step, a11)
        vstore(flat_out, here + 2 * n, a20)
        vstore(flat_out, here + 2 * n + step, a21)
        vstore(flat_out, here + 3 * n, a30)
        vstore(flat_out, here + 3 * n + step, a31)
    for b in range(whole, rows):
        a0, a1, c0, c1 = zero, zero, zero, zero  # two chains per vector: k even, k odd
        k = 0
        while k + 1 < depth:
            col = k if index is None else index[k]
            x = vsplat(flat_h[b * k_size + col])
            a0 = vfma(x, vload(flat_w, base + k * width), a0)
            a1 = vfma(x, vload(flat_w, base + k * width + step), a1)
            col = k + 1 if index is None else index[k + 1]
            x = vsplat(flat_h[b * k_size + col])
            c0 = vfma(x, vload(flat_w, base + (k + 1) * width), c0)
            c1 = vfma(x, vload(flat_w, base + (k + 1) * width + step), c1)
            k += 2
        if k < depth:
            col = k if index is None else index[k]
            x = vsplat(flat_h[b * k_size + col])
            a0 = vfma(x, vload(flat_w, base + k * width), a0)
            a1 = vfma(x, vload(flat_w, base + k * width + step), a1)
        vstore(flat_out, b * n + at, vadd(a0, c0))
        vstore(flat_out, b * n + at + step, vadd(a1, c1))


@njit(cache=True, error_model="numpy", boundscheck=False)
def block_dot(h, w, out):
    """out[:, :packed_width(w)] = h (rows, K) @ the stack `pack_blocks` made `w` of, its
    diagonal blocks alone; h and out C-contiguous, any number of rows."""
    data, index, depth, start = w
    rows, k_size = h.shape
    count, deepest, width = data.shape
    flat_w, flat_h, flat_out = data.reshape(-1), h.reshape(-1), out.reshape(-1)
    for p in range(count):  # in the order of their columns: see the note above pack_blocks
        _panel_product(flat_h, k_size, rows, flat_w, p * deepest * width, width, depth[p],
                       index[p], flat_out, out.shape[1], start[p])
