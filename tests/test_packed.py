"""The per-step product of the CPU kernels (rnndsl.backend.packed): packed weights and the
register-blocked micro-kernel against NumPy in float64, on every path it has (blocks of four
rows, single rows, a last panel padded with zeros, BLAS above the rows rule), and whole cells
at batch sizes that take each path."""
import numpy as np
import pytest

import rnndsl
from rnndsl.backend.packed import (MICRO_MAX_ROWS, block_dot, pack, pack_blocks, packed_dot,
                                   packed_matvec, packed_width, panel_width, stacked_weight_grads,
                                   use_micro_kernel)
from rnndsl.backend.row_threads import set_loop_threads
from rnndsl.backend.scratch import nan_scratch
from rnndsl.symbolic.ops import block_diagonal

from engines import differences

SHAPES = [(1, 64, 256), (4, 8, 16), (6, 7, 13), (9, 33, 70), (3, 1, 1), (0, 4, 8),
          (MICRO_MAX_ROWS + 3, 20, 30)]


@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-13), (np.float32, 1e-5)])
@pytest.mark.parametrize("rows, k, n", SHAPES)
def test_packed_dot_is_the_product(dtype, tol, rows, k, n):
    rng = np.random.default_rng(rows * 1000 + k + n)
    h = rng.standard_normal((rows, k)).astype(dtype)
    w = rng.standard_normal((k, n)).astype(dtype)
    packed = pack(w, rows)
    out = np.full((rows, packed_width(packed)), np.nan, dtype)
    packed_dot(h, packed, out)
    want = h.astype(np.float64) @ w.astype(np.float64)
    scale = np.abs(h).astype(np.float64) @ np.abs(w).astype(np.float64)  # the sum's magnitude
    assert np.all(np.abs(out[:, :n] - want) <= tol * (scale + 1e-30))
    assert np.all(out[:, n:] == 0)  # the padding columns: zero weights, written



@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-13), (np.float32, 1e-5)])
@pytest.mark.parametrize("k, n", [(9, 100), (100, 100), (100, 1), (1, 100), (20, 3), (0, 5)])
def test_packed_matvec_is_one_row_of_the_product(dtype, tol, k, n):
    """The row kernels' product with a parameter: a 1-D row, its padded output."""
    rng = np.random.default_rng(k * 1000 + n)
    v = rng.standard_normal(k).astype(dtype)
    w = rng.standard_normal((k, n)).astype(dtype)
    packed = pack(w, 1)
    out = np.full(packed_width(packed), np.nan, dtype)
    packed_matvec(v, packed, out)
    want = v.astype(np.float64) @ w.astype(np.float64)
    scale = np.abs(v).astype(np.float64) @ np.abs(w).astype(np.float64)
    assert np.all(np.abs(out[:n] - want) <= tol * (scale + 1e-30))
    assert np.all(out[n:] == 0)

def test_pack_layout():
    w = np.arange(5 * 19, dtype=np.float32).reshape(5, 19)
    width = panel_width(np.float32)
    packed = pack(w, 2)
    assert packed.shape == (-(-19 // width), 5, width) and packed.flags.c_contiguous
    assert np.array_equal(packed.transpose(1, 0, 2).reshape(5, -1)[:, :19], w)
    assert not packed.transpose(1, 0, 2).reshape(5, -1)[:, 19:].any()
    big = MICRO_MAX_ROWS + 1
    assert not use_micro_kernel(big) and np.array_equal(pack(w, big)[0], w)


@pytest.mark.parametrize("spec", ["lstm", "gru"])
@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-10), (np.float32, 1e-5)])
@pytest.mark.parametrize("B, lengths", [(6, [6, 2, 0, 5, 1, 3]), (MICRO_MAX_ROWS + 2, None)])
def test_cells_on_every_path(spec, dtype, tol, B, lengths):
    """Blocks of four rows and a remainder (B = 6), and BLAS (B above the rule, on one loop
    thread: rnndsl.backend.row_threads would otherwise cut the rows into smaller chunks)."""
    cpu, ref = rnndsl.compile(spec), rnndsl.compile(spec, target="reference")
    set_loop_threads(1)
    try:
        with nan_scratch():
            diffs = differences(cpu, ref, 6, B, lengths, dtype, seed=B)
    finally:
        set_loop_threads(None)
    bad = {k: v for k, v in diffs.items() if not v < tol}
    assert not bad, bad


# -- block-diagonal weights: (rows, blocks) of each weight of a stack of square matrices ---------
STACKS = [((8, 4),) * 4, ((128, 4),) * 4, ((5, 5), (5, 1)), ((12, 3), (12, 1), (12, 4)),
          ((40, 2), (40, 8)), ((3, 3),)]


def stack_of(parts, dtype, seed):
    """Random weights (nonzero off the blocks too) and the same with zeros off the blocks."""
    rng = np.random.default_rng(seed)
    weights = [rng.standard_normal((rows, rows)).astype(dtype) for rows, _ in parts]
    return (np.concatenate(weights),
            np.concatenate([block_diagonal(w, b) for w, (_, b) in zip(weights, parts)]))


@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-13), (np.float32, 1e-5)])
@pytest.mark.parametrize("rows", [0, 1, 6, MICRO_MAX_ROWS + 5])
@pytest.mark.parametrize("parts", STACKS)
def test_block_dot_is_the_product_by_the_blocks(parts, rows, dtype, tol):
    """Forward (h @ stack.T) and transposed (g @ stack), padding columns and all."""
    stack, masked = stack_of(parts, dtype, len(parts) + rows)
    rng = np.random.default_rng(rows)
    for transposed, m, dense in ((False, stack.T, masked.T), (True, stack, masked)):
        h = rng.standard_normal((rows, m.shape[0])).astype(dtype)
        w = pack_blocks(np.ascontiguousarray(m), parts, transposed)
        out = np.full((rows, packed_width(w)), np.nan, dtype)
        block_dot(h, w, out)
        want = h.astype(np.float64) @ dense.astype(np.float64)
        scale = np.abs(h).astype(np.float64) @ np.abs(dense).astype(np.float64)
        assert np.all(np.abs(out[:, :m.shape[1]] - want) <= tol * (scale + 1e-30)), transposed


def test_block_panels_hold_the_blocks_alone():
    """slstm's stack of four 128 x 128 matrices of 4 blocks: forward, each panel reads the 32
    columns of h of its block; transposed, the 4 x 32 rows of its block in each matrix: a
    quarter of the dense product's multiply-adds."""
    stack, _ = stack_of(((128, 4),) * 4, np.float32, 0)
    width = panel_width(np.float32)
    forward = pack_blocks(stack.T, ((128, 4),) * 4, False)
    assert forward[0].shape == (4 * 128 // width, 32, width) and set(forward[2]) == {32}
    transposed = pack_blocks(stack, ((128, 4),) * 4, True)
    assert transposed[0].shape == (128 // width, 4 * 32, width)


@pytest.mark.parametrize("parts", STACKS)
def test_stacked_weight_grads_keep_the_blocks(parts):
    rng = np.random.default_rng(len(parts))
    cols = parts[0][0]
    g = rng.standard_normal((50, sum(rows for rows, _ in parts)))
    v = rng.standard_normal((50, cols))
    got = stacked_weight_grads(g, v, parts)
    whole, first = g.T @ v, 0
    for (rows, blocks), dw in zip(parts, got):
        np.testing.assert_allclose(dw, block_diagonal(whole[first:first + rows], blocks),
                                   rtol=0, atol=1e-12)
        first += rows
