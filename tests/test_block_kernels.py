"""The cpu target's kernels for block-diagonal parameters (`blocks:` in a spec; packed.py's
pack_blocks and block_dot, packed.stacked_weight_grads) against the reference engine, which
multiplies by the whole matrix with everything off the diagonal blocks set to zero: slstm at
several numbers of heads, and hand-written cells that put the blocks everywhere the schedule
can put a product (a per-step product of h_prev and of a value computed in the step, a product
of an input over all rows and its deferred input gradient, a stack that mixes dense and
block-diagonal weights and blocks of two sizes, blocks one wide). The problems' parameters are
random off the blocks too, so a match also shows that the kernels read the blocks alone.
(The fuzzer's block-diagonal cells: test_differential.py; the same cells on the cuda target:
test_cuda.py.)"""
import numpy as np
import pytest

import rnndsl
from rnndsl.backend.packed import MICRO_MAX_ROWS
from rnndsl.backend.scratch import nan_scratch
from rnndsl.language.errors import SpecError

from engines import differences, problem

# A GRU whose recurrent matrices are block-diagonal: U_n multiplies r * h_prev, a value the
# step computes (a second per-step product, whose vector the weight gradients keep).
BLOCK_GRU = """name: block_gru
sizes: [input, hidden]
inputs: {x: input}
states: {h: hidden}
constants: {heads: 2}
params:
  U_r: {shape: [hidden, hidden], blocks: heads}
  U_z: {shape: [hidden, hidden], blocks: heads}
  U_n: {shape: [hidden, hidden], blocks: heads}
equations: |
  r = sigmoid(W_r @ x + U_r @ h_prev + b_r)
  z = sigmoid(W_z @ x + U_z @ h_prev + b_z)
  n = tanh(W_n @ x + U_n @ (r * h_prev) + b_n)
  h = (1 - z) * n + z * h_prev
"""

# An Elman cell with a block-diagonal matrix on its input (a product over all T*B rows before
# the loop, and the input's gradient after it) and, on h_prev, a stack of a dense matrix and
# a block-diagonal one with another number of blocks.
BLOCK_MIXED = """name: block_mixed
sizes: [hidden]
inputs: {x: hidden}
states: {h: hidden}
constants: {heads: 2}
params:
  V: {shape: [hidden, hidden], blocks: heads}
  R: {shape: [hidden, hidden], blocks: 4}
equations: |
  h = tanh(V @ x + R @ h_prev + U @ h_prev + b)
"""

# (spec, constants, the problem's first size and step: tests/engines.py's problem)
CELLS = {
    "slstm 4 heads of 2": ("slstm", {"heads": 4}, (3, 5)),  # input 3, hidden 8
    "slstm 3 heads of 4": ("slstm", {"heads": 3}, (3, 9)),  # hidden 12
    "slstm 5 heads of 1": ("slstm", {"heads": 5}, (3, 2)),  # hidden 5
    "gru 2 heads of 3": (BLOCK_GRU, {}, (4, 2)),  # input 4, hidden 6
    "gru 4 heads of 1": (BLOCK_GRU, {"heads": 4}, (3, 1)),  # hidden 4
    "mixed 2 and 4 heads": (BLOCK_MIXED, {}, (8, 0)),  # hidden 8: blocks 4 and 2 wide
    "mixed 4 heads of 1": (BLOCK_MIXED, {"heads": 4}, (4, 0)),  # blocks 1 wide
}


def compiled(name: str):
    text, constants, _ = CELLS[name]
    return (rnndsl.compile(text, constants=constants),
            rnndsl.compile(text, target="reference", constants=constants))


@pytest.mark.parametrize("name", sorted(CELLS))
# float32: slstm's gradients reach 1.4e-5 relative at T=5, B=1 (seed 6), and the dense kernels
# of the same cell without `blocks:`, on the same problem with zeros off the blocks, differ
# from the reference by the same 1.4e-5: the rounding of its exponential gating, not the blocks
@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-10), (np.float32, 3e-5)])
@pytest.mark.parametrize("T, B, lengths", [(6, 4, [6, 2, 0, 5]), (5, 1, None),
                                           (3, MICRO_MAX_ROWS + 3, None)])
def test_block_diagonal_kernels_match_the_reference(name, dtype, tol, T, B, lengths):
    """Outputs, final states and every gradient; scratch buffers start as NaN."""
    cpu, ref = compiled(name)
    with nan_scratch():
        diffs = differences(cpu, ref, T, B, lengths, dtype, seed=T + B,
                            problem_args=CELLS[name][2])
    bad = {k: v for k, v in diffs.items() if not v < tol}
    assert not bad, bad


@pytest.mark.parametrize("name", ["slstm 4 heads of 2", "mixed 2 and 4 heads"])
def test_gradients_lie_on_the_diagonal_blocks(name):
    """Off the blocks, the gradient is exactly zero (the reference's layout), whatever the
    parameters hold there."""
    cpu, _ = compiled(name)
    params, xs, state0 = problem(cpu, 4, 3, seed=1, first_size=CELLS[name][2][0],
                                 step=CELLS[name][2][1])
    f = cpu.forward(params, xs, state0, [4, 1, 0])
    g = cpu.backward(params, f, np.ones_like(f.output))
    for p, info in cpu.params.items():
        if info.blocks > 1:
            size = params[p].shape[0] // info.blocks
            on = np.kron(np.eye(info.blocks), np.ones((size, size))).astype(bool)
            assert not g.params[p][~on].any() and g.params[p][on].any(), p


def test_the_generated_kernels_multiply_by_blocks():
    """slstm's recurrent products, forward and backward, go through block_dot; its input
    products, which are dense, stay one product over all rows."""
    code = rnndsl.compile("slstm").engine.source_code("float64")
    assert code.count("block_dot(") == 3 and "packed_dot(" not in code.split("def forward(")[0]
    assert "pack_blocks(" in code and "stacked_weight_grads(" in code
    assert "xp0 = weight_product(x0.reshape(T * B, -1)" in code


def test_slstm_is_among_the_cpu_and_the_cuda_kernel_specs():
    """(The cuda target's block kernels: tests/test_cuda.py.)"""
    assert "slstm" in rnndsl.compiler.kernel_specs("cpu")
    assert "slstm" in rnndsl.compiler.kernel_specs("cuda")
    assert rnndsl.compiler.refusal(rnndsl.compiler.analyse("slstm")[0], "cuda") is None


ROWS_AND_BLOCKS = """name: rows_and_blocks
sizes: [input, hidden]
inputs: {x: input}
states: {M: [hidden, hidden], h: hidden}
constants: {heads: 2}
params:
  R: {shape: [hidden, hidden], blocks: heads}
equations: |
  h = tanh(W @ x + R @ h_prev + M_prev @ h_prev)
  M = 0.9 * M_prev + outer(h, h)
"""


@pytest.mark.parametrize("target", ["cpu", "cuda"])
def test_blocks_in_a_cell_run_one_row_at_a_time_are_refused_by_name(target):
    with pytest.raises(SpecError, match=f"the {target} target cannot run this cell yet: "
                                        r"parameter 'R' is block-diagonal \(2 blocks\) and "
                                        "state 'M' is a matrix") as info:
        rnndsl.compile(ROWS_AND_BLOCKS, target=target)
    assert "use the reference target" in info.value.message
    assert rnndsl.compile(ROWS_AND_BLOCKS, target="reference").engine.name == "reference"
