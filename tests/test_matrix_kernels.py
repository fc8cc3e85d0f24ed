"""The cpu target's kernels for cells with matrix values (rnndsl/backend/emit_rows.py): every
rank-2 operator against the reference engine (float64, forward and backward, with lengths and
an empty sequence), and the tape budget: storing every step's matrix states and recomputing
them from kept copies give identical results. (The built-in cells run in test_kernels.py and
test_gradcheck.py with the others; random matrix cells in test_differential.py.)"""
import re

import numpy as np
import pytest

import rnndsl
from rnndsl.backend import emit_rows
from rnndsl.backend.scratch import nan_scratch
from rnndsl.language.errors import SpecError, UserError
from rnndsl.symbolic.ops import OPS

from engines import differences, problem
from test_matrix import HEAD, OP_CELLS


def text(name: str) -> str:
    matrix, vector, outputs = OP_CELLS[name]
    return f"{HEAD.replace('outputs: [h]', f'outputs: {outputs}')}  M = {matrix}\n  h = {vector}\n"


@pytest.mark.parametrize("name", sorted(OP_CELLS))
def test_every_rank2_operator_matches_the_reference(name):
    cpu, ref = rnndsl.compile(text(name)), rnndsl.compile(text(name), target="reference")
    with nan_scratch():
        diffs = differences(cpu, ref, 5, 3, [5, 2, 0], np.float64, seed=4)
    bad = {k: v for k, v in diffs.items() if not v < 1e-10}
    assert not bad, bad


@pytest.mark.parametrize("first_size, step", [(3, 2), (9, -2)], ids=["tall", "wide"])
def test_parameter_products_either_way_match_the_reference(first_size, step):
    """A product with a parameter (W @ v forward, W.T @ g in backward) runs its lanes along
    the output or along the sums, whichever is longer, one of the two on W's transpose
    (emit_rows._product): sizes input, key, value ascending make every parameter tall,
    descending wide, so that each product takes the other form in each pass."""
    name = "M @ v"
    cpu, ref = rnndsl.compile(text(name)), rnndsl.compile(text(name), target="reference")
    with nan_scratch():
        diffs = differences(cpu, ref, 4, 3, [4, 1, 0], np.float64, seed=5,
                            problem_args=(first_size, step))
    bad = {k: v for k, v in diffs.items() if not v < 1e-10}
    assert not bad, bad


STACKED = """name: stacked
sizes: [input, key, value]
inputs: {x: input}
states: {M: [key, value], h: value}
outputs: [h, y]
params:
  W_a: {shape: [key, input]}
  U_a: {shape: [key, value]}
  W_b: {shape: [value, input]}
  U_b: {shape: [value, value]}
  W_c: {shape: [value, input]}
  V_y: {shape: [value, value]}
  V_z: {shape: [value, value]}
equations: |
  a = tanh(W_a @ x + U_a @ h_prev)
  b = sigmoid(W_b @ x + U_b @ h_prev)
  c = W_c @ x
  M = M_prev * b + outer(a, c)
  h = tanh(M.T @ a)
  y = V_y @ h + V_z @ h
"""


@pytest.mark.parametrize("first_size, step", [(3, 2), (9, -2)], ids=["tall", "wide"])
def test_stacked_parameter_products_match_the_reference(first_size, step):
    """Products of one vector with several parameters run as one product with the
    parameters stacked (emit_rows._stacked_products): W_a, W_b and W_c @ x, U_a and U_b @
    h_prev, V_y and V_z @ h forward, and in backward the transposes that share an adjoint.
    With sizes ascending the stacked outputs are longer than their sums (one micro-kernel
    product), descending some are shorter (each product's lanes along its sums)."""
    cpu = rnndsl.compile(STACKED)
    source = cpu.engine.source_code("float64")
    assert len(re.findall(r"kv\d+_stack = pack\(np\.concatenate\(", source)) >= 3 * 2
    assert re.search(r"qv\d+_stack = pack\(np\.concatenate\(", source)  # backward's
    ref = rnndsl.compile(STACKED, target="reference")
    with nan_scratch():
        diffs = differences(cpu, ref, 4, 3, [4, 1, 0], np.float64, seed=6,
                            problem_args=(first_size, step))
    bad = {k: v for k, v in diffs.items() if not v < 1e-10}
    assert not bad, bad


def test_backward_reads_the_vectors_the_forward_pass_kept():
    """The forward pass keeps every step's vectors that backward reads (a, b, c and h of
    STACKED), and backward computes none of them again: no tanh or sigmoid in its kernel,
    where the forward kernel has both (the values themselves: the tests above)."""
    source = rnndsl.compile(STACKED).engine.source_code("float64")
    forward = source[source.index("def forward_rows"):source.index("def infer_rows")]
    backward = source[source.index("def backward_rows"):source.index("def forward(")]
    assert "tanh(" in forward and "sigmoid(" in forward
    assert "tanh(" not in backward and "sigmoid(" not in backward
    # written after the step, or the step's row taken as the value's scratch
    kept = set(re.findall(r"(rv\d+)\[b, t, j\] = ", forward) +
               re.findall(r"= (rv\d+)\[b, t\]\n", forward))
    assert len(kept) >= 3 and all(f"{r}[b, t, " in backward for r in kept)


def test_every_structural_operator_has_row_kernel_code():
    """An operator added to ops.py needs its entry here (or elementwise kernel code)."""
    missing = [op for op, rec in OPS.items() if rec.structural and op not in emit_rows.ROW_CODE
               and op not in emit_rows.INDEX_MAPS]
    assert not missing, missing


def test_an_operator_without_row_code_is_refused_by_name(monkeypatch):
    monkeypatch.delitem(emit_rows.ROW_CODE, "mtv")
    with pytest.raises(SpecError, match="no kernel code for the operator 'mtv'"):
        rnndsl.compile("delta_net")
    assert rnndsl.compile("delta_net", target="reference")


# -- the tape budget ---------------------------------------------------------------------------
@pytest.mark.parametrize("T, B, budget, every", [
    (7, 3, 22 * 800, 1),  # all 7 x 3 matrices of 100 float64 fit (and one of scratch)
    (7, 3, 22 * 800 - 1, 4),  # they do not: 2 x 3 kept + 4 of scratch is the least
    (7, 3, 0, 4),
    (100, 1, 0, 10),  # about sqrt(T B)
    (100, 16, 0, 34),  # 3 x 16 + 34 = 82 matrices (33: 4 x 16 + 33)
    (1, 1, 0, 1),
])
def test_checkpoint_interval(T, B, budget, every):
    assert emit_rows.checkpoint_every(T, B, 100, 8, budget) == every


@pytest.mark.parametrize("name", ["fast_weights", "delta_net", "ntm"])
@pytest.mark.parametrize("B, lengths, every", [(4, None, 5), (4, [9, 4, 0, 1], 5), (1, None, 3)],
                         ids=["full", "lengths", "one row"])
def test_recomputing_the_matrix_states_gives_identical_gradients(name, B, lengths, every):
    """A budget that keeps every step, and one that keeps none: the interval is the least
    memory's (T = 9: the last segment is short with 5)."""
    cell = rnndsl.compile(name)
    params, xs, state0 = problem(cell, 9, B, seed=2)
    outputs = cell.forward(params, xs, state0).outputs
    d_out = np.random.default_rng(3).standard_normal(next(iter(outputs.values())).shape)
    runs = []
    for budget, every in [(None, 1), (0, every)]:
        cell.engine.tape_budget = budget
        with nan_scratch():
            fwd = cell.forward(params, xs, state0, lengths)
            grads = cell.backward(params, fwd, d_out, {s: np.ones_like(v) for s, v in
                                                       fwd.states.items()})
        kept = fwd.tape.saved[-2]  # the matrix state's kept copies, then `every`
        assert fwd.tape.saved[-1] == every and kept.shape[0] == -(-9 // every)
        runs.append((fwd, grads))
    (f0, g0), rest = runs[0], runs[1:]
    for f, g in rest:
        for o in f0.outputs:
            np.testing.assert_array_equal(f.outputs[o], f0.outputs[o])
        for s in f0.states:
            np.testing.assert_array_equal(f.states[s], f0.states[s])
        for group in ("params", "inputs", "state0"):
            for k, v in getattr(g0, group).items():
                np.testing.assert_array_equal(getattr(g, group)[k], v, err_msg=f"{group} {k}")


def test_the_budget_comes_from_compile_then_the_environment(monkeypatch):
    monkeypatch.setenv(emit_rows.TAPE_BUDGET_ENV, "0")
    cell = rnndsl.compile("delta_net")
    params, xs, state0 = problem(cell, 4, 2, seed=1)
    assert cell.forward(params, xs, state0).tape.saved[-1] == 2  # 2 x 2 kept + 2 of scratch
    cell = rnndsl.compile("delta_net", tape_budget=10 ** 6)
    assert cell.forward(params, xs, state0).tape.saved[-1] == 1
    monkeypatch.delenv(emit_rows.TAPE_BUDGET_ENV)
    assert emit_rows.tape_budget(None) == emit_rows.DEFAULT_TAPE_BUDGET


@pytest.mark.parametrize("budget", [-1, 1.5, "lots", True])
def test_a_bad_budget_is_refused_by_name(budget):
    with pytest.raises(UserError, match="tape budget must be a whole number of bytes"):
        rnndsl.compile("delta_net", tape_budget=budget)


def test_a_bad_budget_in_the_environment_is_refused_by_name(monkeypatch):
    monkeypatch.setenv(emit_rows.TAPE_BUDGET_ENV, "1GB")
    with pytest.raises(UserError, match=r"\$RNNDSL_TAPE_BUDGET must be a whole number"):
        rnndsl.compile("delta_net")


def test_inference_keeps_no_tape_and_gives_the_same_outputs():
    cell = rnndsl.compile("fast_weights")
    params, xs, state0 = problem(cell, 5, 3, seed=4)
    kept = cell.forward(params, xs, state0, [5, 3, 0])
    bare = cell.forward(params, xs, state0, [5, 3, 0], save=False)
    np.testing.assert_array_equal(kept.output, bare.output)
    for s in kept.states:
        np.testing.assert_array_equal(kept.states[s], bare.states[s])
    assert bare.tape is None


def test_cli_compiles_a_matrix_cell_for_the_cpu():
    from typer.testing import CliRunner

    from rnndsl.cli import app

    shown = CliRunner().invoke(app, ["compile", "delta_net"])
    assert shown.exit_code == 0, shown.output
    assert "per batch row: the whole time loop of one row in compiled code" in shown.output
    assert "forward  W @ q  loop nest per row" in shown.output
