"""Values of rank 2: matrix-valued states, their operations, shape rules and errors, the
derived backward step (finite differences, and independent PyTorch autograd for the built-in
cells), and the compiled targets' refusal."""
import re

import numpy as np
import pytest
from typer.testing import CliRunner

import rnndsl
from rnndsl.backend import emit_rows
from rnndsl.backend.scratch import nan_scratch
from rnndsl.cli import app
from rnndsl.engines.gradcheck import gradcheck
from rnndsl.language.errors import SpecError
from rnndsl.symbolic import ir, rank2

from engines import SLOTS_SHOWN_BY_STATES_ONLY, differences

HEAD = """name: m
sizes: [input, key, value]
inputs: {x: input}
states: {M: [key, value], h: value}
outputs: [h]
equations: |
  a = tanh(W_a @ x)
  b = tanh(W_b @ x + U_b @ h_prev)
"""


def cell(matrix: str, vector: str, head: str = HEAD, outputs: str = "[h]"):
    text = head.replace("outputs: [h]", f"outputs: {outputs}")
    return rnndsl.compile(f"{text}  M = {matrix}\n  h = {vector}\n", target="reference")


# -- shapes -------------------------------------------------------------------------------------
@pytest.mark.parametrize("expr, shape", [
    ("outer(a, b)", ("key", "value")),
    ("M_prev @ b", ("key",)),
    ("M_prev.T @ a", ("value",)),
    ("(M_prev + outer(a, b)).T @ a", ("value",)),
    ("M_prev * b", ("key", "value")),  # b runs along the value axis
    ("a * M_prev", ("key", "value")),  # a along the key axis
    ("sigmoid(sum(a)) * M_prev", ("key", "value")),
    ("tanh(M_prev) / 2", ("key", "value")),
    ("sum(M_prev, key)", ("value",)),
    ("sum(M_prev, value)", ("key",)),
    ("sum(M_prev, 0)", ("value",)),
    ("mean(M_prev, value)", ("key",)),
    ("norm(M_prev, key)", ("value",)),
    ("norm(b)", ()),
    ("softmax(M_prev, key)", ("key", "value")),
])
def test_intermediates_take_their_shape_from_the_rules(expr, shape):
    c = rnndsl.compile(f"{HEAD}  t = {expr}\n  M = M_prev + 0 * outer(a, b)\n  h = b\n",
                       target="reference")
    assert c.step.shape_of("t") == shape


def test_a_matrix_state_is_declared_with_two_sizes():
    c = cell("M_prev + outer(a, b)", "M.T @ a")
    assert c.states == {"M": ("key", "value"), "h": "value"}
    f = c.forward(c.init_params(input=2, key=3, value=4, dtype=np.float64),
                  np.ones((5, 2, 2)))
    assert f.states["M"].shape == (2, 3, 4) and f.states["h"].shape == (2, 4)


# -- the operations, each in a cell, by finite differences ----------------------------------------
# (matrix equation, vector equation, outputs): between them every rank-2 operator appears.
OP_CELLS = {
    "outer, M.T @ v": ("0.9 * M_prev + outer(a, b)", "tanh(M.T @ a)", "[h]"),
    "M @ v": ("M_prev + outer(a, b)", "tanh(M.T @ (M @ b))", "[h]"),
    "vector along the value axis": ("M_prev * sigmoid(b) + outer(a, b)", "tanh(M.T @ a)", "[h]"),
    "vector along the key axis": ("a * M_prev + outer(a, b)", "tanh(M.T @ a)", "[h]"),
    "per-row scalar": ("sigmoid(sum(a)) * M_prev + outer(a, b)", "tanh(M.T @ a)", "[h]"),
    "matrix arithmetic": ("tanh(M_prev + outer(a, b)) * M_prev / (2 + outer(a, b) ** 2) - M_prev",
                          "tanh(M.T @ a)", "[h]"),
    "sum over key": ("M_prev + outer(a, b)", "tanh(sum(M, key))", "[h]"),
    "sum over value": ("M_prev + outer(a, b)", "tanh(M.T @ (a * sum(M, value)))", "[h]"),
    "mean and norm over an axis": ("M_prev + outer(a, b)",
                                   "mean(M, key) + norm(M, key) * b", "[h]"),
    "softmax over key": ("softmax(M_prev, key) + outer(a, b)", "tanh(M.T @ a)", "[h]"),
    "softmax over value": ("M_prev * softmax(outer(a, b), value)", "tanh(M.T @ a) + b", "[h]"),
    "norm of a vector": ("M_prev + outer(a / norm(a), b)", "tanh(M.T @ a)", "[h]"),
    "min, max with a vector": ("max(M_prev, b) + min(outer(a, b), 0.5)", "tanh(M.T @ a)", "[h]"),
    "a matrix output": ("M_prev + outer(a, b)", "tanh(M.T @ a)", "[h, M]"),
}


@pytest.mark.parametrize("name", sorted(OP_CELLS))
@pytest.mark.parametrize("lengths", [None, [3, 1, 0]], ids=["full", "lengths"])
def test_derived_gradients_match_finite_differences(name, lengths):
    c = cell(*OP_CELLS[name][:2], outputs=OP_CELLS[name][2])
    result = gradcheck(c, T=3, B=3, size=2, seed=1, lengths=lengths)
    assert result.worst[1] < 1e-7, result.errors
    assert len(result.errors) == len(c.params) + len(c.inputs) + len(c.states)


def test_a_square_matrix_sums_over_an_axis_by_number():
    head = HEAD.replace("{M: [key, value], h: value}", "{M: [value, value], h: value}") \
        .replace("  a = tanh(W_a @ x)\n", "").replace("[input, key, value]", "[input, value]")
    c = cell("M_prev + outer(b, b)", "tanh(sum(M, 0) + M.T @ b)", head)
    assert "sum(M, 0)" in c.step.equations()
    assert gradcheck(c, T=3, B=2, size=2).worst[1] < 1e-7


def test_every_rank2_operator_is_reached():
    used = set()
    for matrix, vector, outputs in OP_CELLS.values():
        c = cell(matrix, vector, outputs=outputs)
        used |= {n.op for n in ir.topo_order(c.step.roots() + c.backward_ir.roots())}
    c = addressing("w = shift(gated, s)")  # the NTM's shift, below
    used |= {n.op for n in ir.topo_order(c.step.roots() + c.backward_ir.roots())}
    assert set(rank2.OPS) <= used


def test_padding_freezes_a_matrix_state():
    """A sequence of length 1 in a batch ends with the state that running it alone gives."""
    c = cell("0.9 * M_prev + outer(a, b)", "tanh(M.T @ a)")
    params = c.init_params(input=2, key=3, value=4, seed=1, dtype=np.float64)
    x = np.random.default_rng(0).standard_normal((4, 2, 2))
    both = c.forward(params, x, lengths=[4, 1])
    alone = c.forward(params, x[:1, 1:])
    np.testing.assert_allclose(both.states["M"][1], alone.states["M"][0], rtol=0, atol=1e-15)
    assert not both.outputs["h"][1:, 1].any()


# -- located errors -------------------------------------------------------------------------------
# (equations for M and h, words of the message, the text the caret points at)
ERRORS = [
    ("M = outer(a, b)\n  h = a @ b", "the left side of '@' must be a weight matrix (a parameter "
     "name) or a matrix value; it is shape (key,)", "a @ b"),
    ("M = outer(a, b)\n  h = M_prev.T @ b", "shape mismatch at '@': the matrix has shape "
     "(key, value) but the vector has shape (value,) (M.T @ v needs v of M's row size)", "@ b"),
    ("M = outer(a, b)\n  h = M_prev @ a", "M @ v needs v of M's column size", "@ a"),
    ("M = outer(a, b)\n  h = sum(M_prev, input)", "'input' is not an axis of this shape "
     "(key, value) matrix; its axes are 'key' or 'value' (or 0, 1)", "input)"),
    ("M = M_prev * softmax(outer(a, b), input)\n  h = b", "'input' is not an axis of this "
     "shape (key, value) matrix", "input)"),
    ("h = sum(outer(a, b), value)\n  M = outer(a, b)", "shape mismatch at 'sum': over this "
     "axis of a shape (key, value) matrix it gives a vector of size (key,), used as one of size "
     "(value,)", "sum(outer"),  # decided once outer(a, b)'s sizes are known, after h
    ("M = outer(a, b)\n  h = sum(M_prev, 2)", "its axes are 'key' or 'value' (or 0, 1)", "2)"),
    ("M = outer(a, b)\n  h = b * sum(M_prev)", "'sum' of a matrix needs the axis it works "
     "over, as in sum(M, axis)", "sum(M_prev)"),
    ("M = outer(a, b)\n  h = b * max(M_prev)", "'max' of a matrix is not supported; sum, mean, "
     "norm and softmax work over one axis of a matrix", "max(M_prev)"),
    ("M = outer(a, b)\n  h = sum(b, value)", "'sum(x, axis)' reduces a matrix over one axis; "
     "this is shape (value,) (write sum(x) for all of a vector's features)", "b, value"),
    ("M = outer(M_prev, b)\n  h = b", "'outer' takes two vectors; this argument is shape "
     "(key, value)", "M_prev, b"),
    ("M = M_prev + x\n  h = b", "shape mismatch at '+': shape (key, value) and shape "
     "(input,); a vector combines with a matrix along the axis of its size", "+ x"),
    ("M = outer(h_prev, h_prev)\n  h = b", "shape mismatch: state 'M' has shape (key, value) "
     "but the right side has shape (value, value)", "M = outer"),
    ("M = h_prev\n  h = b", "state 'M' has shape (key, value) but the right side has shape "
     "(value,)", "M = h_prev"),
    ("M = outer(a, b)\n  h = tanh(M_prev.T)", "'.T' is written only left of '@'", ".T)"),
    ("M = outer(a, b)\n  h = W_b.T @ a", "'W_b.T': a weight matrix is not transposed; declare "
     "'W_b' with its rows and columns swapped", ".T @ a"),
    ("M = outer(a, b)\n  h = M_prev[0]", "only a vector can be indexed; this is shape "
     "(key, value)", "0]"),
]


def located(text: str, marker: str, first_line: int) -> tuple[int, int]:
    """1-based line and column of the first occurrence of `marker` below line `first_line`."""
    lines = text.splitlines()
    for k, line in enumerate(lines):
        if k >= first_line and marker in line:
            return k + 1, line.index(marker) + 1
    raise AssertionError(marker)


def assert_refused(text: str, message: str, marker: str, first_line: int = 6):
    """Compiling `text` fails with `message` at the first `marker` below `first_line`."""
    with pytest.raises(SpecError) as info:
        rnndsl.compile(text, target="reference")
    assert message in info.value.message
    assert (info.value.pos.line, info.value.pos.column) == located(text, marker, first_line)


@pytest.mark.parametrize("equations, message, marker", ERRORS, ids=[e[2] for e in ERRORS])
def test_misuse_is_a_located_error(equations, message, marker):
    assert_refused(f"{HEAD}  {equations}\n", message, marker)


@pytest.mark.parametrize("states, equations, message, marker", [
    ("{M: [value, value], h: value}", "M = M_prev * b\n  h = b",
     "a vector of size (value,) could run along either axis of this shape (value, value) "
     "matrix", "* b"),
    ("{M: [value, value], h: value}", "M = outer(b, b)\n  h = sum(M, value)",
     "both axes of this shape (value, value) matrix are 'value'; name the axis by number: 0 "
     "sums down the rows, 1 along each row", "value)"),
])
def test_a_square_matrix_needs_its_axis_named_by_number(states, equations, message, marker):
    text = f"{HEAD.replace('{M: [key, value], h: value}', states)}  {equations}\n"
    assert_refused(text, message, marker)


def test_outer_of_a_vector_of_a_number_size_is_refused():
    text = HEAD.replace("equations: |", "params: {W_s: {shape: [3, input]}}\nequations: |") + \
        "  s = W_s @ x\n  t = sum(outer(s, b), 0)\n  M = M_prev + outer(a, b)\n  h = b\n"
    assert_refused(text, "a vector whose size is a number (3,) is that many separate values, "
                   "not a side of a matrix", "s, b", first_line=10)


@pytest.mark.parametrize("states, message, marker", [
    ("{M: [key, value, input]}", "'M' has 3 sizes; a state is a vector (M: hidden), a "
     "matrix of two sizes (M: [key, value]) or one number per sequence (M: [])",
     "[key, value, input]"),
    ("{M: [key]}", "'M' has 1 size; a state is a vector", "[key]"),
    ("{M: [key, valeu]}", "unknown size 'valeu' for 'M' (did you mean 'value'?)", "valeu"),
])
def test_a_bad_matrix_declaration_is_located(states, message, marker):
    text = HEAD.replace("{M: [key, value], h: value}", states) + "  M = outer(a, b)\n"
    assert_refused(text, message, marker, first_line=3)


def test_cli_reports_a_matrix_error_with_a_caret_and_exit_2(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(f"{HEAD}  M = outer(a, b)\n  h = a @ b\n")
    result = CliRunner().invoke(app, ["check", str(path)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert f"{path}:10:7: the left side of '@'" in result.output
    assert result.output.splitlines()[-2:] == ["      h = a @ b", "          ^"]


# -- the cuda target runs them one thread per batch row (in the simulator: test_cuda.py) -----------
def test_the_cuda_target_runs_matrix_values_one_row_at_a_time():
    cell = rnndsl.compile("delta_net", target="cuda")
    assert isinstance(cell.plan, emit_rows.RowPlan) and cell.engine.rows
    code = cell.engine.source_code("float64")
    assert "@cuda.jit(cache=True)\ndef forward_rows(T, B, " in code and "b = cuda.grid(1)" in code


def test_a_matrix_inside_an_equation_runs_one_row_at_a_time_too():
    text = "name: t\nsizes: [input, value]\ninputs: {x: input}\nstates: {h: value}\n" \
        "equations: |\n  h = tanh(sum(outer(x, h_prev), input))\n"
    assert "the equation of 'h' computes a matrix of shape (input, value)" in \
        rank2.row_value(rnndsl.compile(text, target="reference").step)
    for target in ("cpu", "cuda"):
        assert isinstance(rnndsl.compile(text, target=target).plan, emit_rows.RowPlan)


def test_retargeting_a_matrix_cell_to_cuda_makes_its_row_plan():
    twin = rnndsl.compiler.retarget(rnndsl.compile("fast_weights", target="reference"), "cuda")
    assert isinstance(twin.plan, emit_rows.RowPlan) and twin.engine.name == "cuda"


@pytest.mark.parametrize("persistent", [True, "single-block", "multi-block"])
def test_a_persistent_kernel_asked_of_a_matrix_cell_is_refused(persistent):
    with pytest.raises(ValueError, match="one thread per batch row; there is no persistent "
                                         "kernel to choose"):
        rnndsl.compile("delta_net", target="cuda", persistent=persistent)


def test_cli_compile_on_cuda_says_one_thread_per_row_and_prints_the_backward_on_the_reference():
    compiled = CliRunner().invoke(app, ["compile", "ntm", "--target", "cuda"])
    assert compiled.exit_code == 0, compiled.output
    assert "  CUDA     one thread per batch row, running that row's whole time loop" in \
        compiled.output
    shown = CliRunner().invoke(app, ["compile", "delta_net", "--target", "reference",
                                     "--show", "backward"])
    assert shown.exit_code == 0, shown.output
    assert "  states   W (value, key)" in shown.output
    for line in DELTA_NET_BY_HAND:
        assert line in shown.output.splitlines(), line


def test_the_list_marks_no_built_in_cell():
    """Every built-in cell runs on every target (the matrix cells and slstm's blocks too), so
    none is marked."""
    listed = CliRunner().invoke(app, ["list"]).output.splitlines()
    cpu = {line.split()[0] for line in listed if line.endswith("[cpu and reference targets]")}
    reference = {line.split()[0] for line in listed if line.endswith("[reference target only]")}
    assert not cpu and not reference
    assert set(rnndsl.compiler.kernel_specs("cuda")) == set(rnndsl.builtin_specs())


# Hand derivation. W = W_prev + beta * e k^T with e = v - W_prev @ k, y = W @ q. With G the
# adjoint of W: dq = W^T dy, G = dW_next + dy q^T; the write's adjoint is beta G
# (d_W_2), whose product with k (d_W_3) is dv, and -d_W_3 that of W_prev @ k (d_W_4); so
# dk = (beta G)^T e - W_prev^T (beta G k), dW_prev = G - (beta G k) k^T, dbeta = <G, e k^T>.
DELTA_NET_BY_HAND = [
    "d_y = d_y_next",
    "d_q = W.T @ d_y",
    "d_W = d_W_next + outer(d_y, q)",
    "d_W_2 = d_W * beta",
    "d_W_3 = d_W_2 @ k",
    "d_W_4 = -d_W_3",
    "d_k = d_W_2.T @ (v - W_prev @ k) + W_prev.T @ d_W_4",
    "d_v = d_W_3",
    "d_beta = sum(sum(d_W * outer(v - W_prev @ k, k), key))",
    "d_beta_pre = d_beta * beta * (1 - beta)",
    "d_W_prev = d_W + outer(d_W_4, k)",
    "d_W_value += outer(d_W_3, x)",
]


# -- fuzzing the new syntax -----------------------------------------------------------------------
MATRIX_TOKENS = [".T", " @ ", "outer(", "W_prev", "A_prev", "h_prev", "k", "q", "v", "x", "beta",
                 "m_1_prev", "C_1_prev", "n_2", "key", "exp(",
                 "shift(", "M_prev", "w_read", ", read_shift", "** 2", ", width", ", slots",
                 "sum(", "mean(", "norm(", "max(", ", key", ", value", ", hidden", ", 0", ", 1",
                 "(", ")", "*", "+", "-", "/", "**2", "tanh(", "[", "]", ", ", "1"]


@pytest.mark.parametrize("base", ["delta_net", "fast_weights", "ntm", "mlstm"])
def test_mutated_matrix_specs_fail_only_with_spec_errors(base):
    """Mutated cells either compile and run forward and backward, or fail with a SpecError."""
    from test_fuzz import mutate

    text = rnndsl.builtin_specs()[base].read_text()
    head, equations = text.split("equations: |\n")
    rng = __import__("random").Random(base)
    compiled = failed = 0
    for _ in range(300):
        mutated = equations
        for _ in range(rng.randint(1, 2)):
            p = rng.randrange(len(mutated) + 1)
            mutated = mutated[:p] + rng.choice(MATRIX_TOKENS) + mutated[p:]
        if rng.random() < 0.3:
            mutated = mutate(mutated, rng, 1)
        try:
            c = rnndsl.compile(f"{head}equations: |\n{mutated}", target="reference")
        except SpecError as err:
            failed += 1
            assert err.message and err.render()
            continue
        compiled += 1
        sizes = {s: 2 + k for k, s in enumerate(c.sizes)}
        with np.errstate(all="ignore"):
            f = c.forward(c.init_params(dtype=np.float64, **sizes),
                          np.ones((2, 2, sizes["input"])), sizes=sizes)
            c.backward(c.init_params(dtype=np.float64, **sizes), f,
                       {o: np.ones_like(v) for o, v in f.outputs.items()})
    assert failed > 100 and compiled > 2, (failed, compiled)  # both paths were exercised


def test_a_size_that_only_a_state_has_is_given_by_name():
    """A memory's slots that no parameter shows."""
    c = rnndsl.compile(SLOTS_SHOWN_BY_STATES_ONLY, target="reference")
    sizes = {"input": 3, "hidden": 2, "slots": 5}
    params = c.init_params(seed=0, dtype=np.float64, **sizes)
    x = np.ones((2, 1, 3))
    with pytest.raises(ValueError, match=r"cannot tell size\(s\) \['slots'\] from the arrays "
                                         r"given; pass state0, or sizes=\{'slots': N\}"):
        c.forward(params, x)
    f = c.forward(params, x, sizes={"slots": 5})
    assert f.states["M"].shape == (1, 5, 2) and f.states["w"].shape == (1, 5)
    # the sizes worked out for these shapes are kept (Cell._sizes); a failed call keeps none
    with pytest.raises(ValueError, match=r"cannot tell size\(s\) \['slots'\]"):
        c.forward(params, x)
    assert c.forward(params, x, sizes={"slots": 5}).states["w"].shape == (1, 5)
    for bad in ("five", [5], 0, True):
        with pytest.raises(ValueError, match=f"size 'slots' must be a whole number of at least "
                                             f"1, got {re.escape(repr(bad))}"):
            c.forward(params, x, sizes={"slots": bad})
    with pytest.raises(ValueError, match="size 'hidden' is 3 from sizes but 2 from parameter"):
        c.forward(params, x, sizes={"slots": 5, "hidden": 3})
    with pytest.raises(ValueError, match="sizes: unknown name"):
        c.forward(params, x, sizes={"slot": 5})


# -- the NTM's location addressing: circular shift and sharpening ---------------------------------
ADDRESSING = """name: a
sizes: [input, slots]
inputs: {x: input}
states: {w: slots}
params: {W_s: {shape: [SHIFTS, input]}, w_gamma: {shape: [input]}, b_gamma: {shape: []}}
equations: |
  s = softmax(W_s @ x)
  gamma = 1 + softplus(sum(w_gamma * x) + b_gamma)
  content = softmax(W_c @ x)
  gated = 0.5 * content + 0.5 * w_prev
  EQUATIONS
"""


def addressing(equations: str, shifts: int = 3):
    text = ADDRESSING.replace("SHIFTS", str(shifts)).replace("EQUATIONS", equations)
    return rnndsl.compile(text, target="reference")


def distributions(rng, shape):
    e = np.exp(rng.standard_normal(shape))
    return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("equations, shifts", [
    ("w = shift(gated, s)", 3),
    ("w = shift(gated, s)", 5),
    ("w = shift(gated, s)", 1),
    ("w = shift(gated, s) * shift(w_prev, s)", 3),  # one distribution, two weightings
    ("p = gated ** gamma\n  w = p / sum(p)", 3),
    ("p = shift(gated, s) ** gamma\n  w = p / max(sum(p), 1e-30)", 3),
], ids=["3 shifts", "5 shifts", "1 shift", "two weightings", "sharpening", "shift, sharpen"])
@pytest.mark.parametrize("lengths", [None, [3, 1, 0]], ids=["full", "lengths"])
def test_addressing_gradients_match_finite_differences(equations, shifts, lengths):
    c = addressing(equations, shifts)
    rng = np.random.default_rng(2)
    # previous weightings are distributions: a power of a negative weight is NaN
    state0 = {"w": distributions(rng, (3, 3))}  # gradcheck's sizes: input 2, slots 3
    result = gradcheck(c, T=3, B=3, size=2, seed=1, lengths=lengths, state0=state0)
    assert result.worst[1] < 1e-7, result.errors
    assert len(result.errors) == len(c.params) + len(c.inputs) + len(c.states)


def circular_convolution(w, s):
    """Graves et al. 2014, eq. 8: w~(i) = sum_j w(j) s(i - j), indices modulo the number of
    slots, s given over the shifts -(n-1)/2 .. (n-1)/2."""
    slots, n = w.shape[-1], len(s)
    out = np.zeros_like(w)
    for i in range(slots):
        for j in range(slots):
            for k in range(n):
                if (i - j - (k - n // 2)) % slots == 0:
                    out[..., i] += w[..., j] * s[k][..., 0]
    return out


@pytest.mark.parametrize("shifts, slots", [(3, 6), (5, 7), (3, 2)])
def test_shift_is_the_papers_circular_convolution(shifts, slots):
    """Rolled by -1, 0, +1: a weight on slot 0 moves to slot 1 with s(+1), to the last slot with
    s(-1); with fewer slots than shifts the shifts wrap onto each other."""
    c = addressing("w = shift(w_prev, s)", shifts)
    rng = np.random.default_rng(0)
    params = c.init_params(input=3, slots=slots, seed=0, dtype=np.float64)
    x = rng.standard_normal((1, 4, 3))
    w0 = distributions(rng, (4, slots))
    got = c.forward(params, x, {"w": w0}).states["w"]
    logits = x[0] @ params["W_s"].T
    s = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    want = circular_convolution(w0, [s[:, k:k + 1] for k in range(shifts)])
    np.testing.assert_allclose(got, want, rtol=1e-14, atol=1e-15)
    one_hot = np.eye(slots)[[0]]
    moved = c.forward({**params, "W_s": np.eye(shifts, 3)[::-1] * 50}, np.eye(1, 3)[None] * 1,
                      {"w": one_hot}).states["w"]  # all weight on the last shift, +(n-1)/2
    assert moved.argmax() == (shifts // 2) % slots and moved.max() > 0.99


def test_sharpening_gradient_is_finite_where_a_weight_is_zero():
    """d(w ** gamma)/d gamma = log(w) w ** gamma is 0, not 0 * -inf, where w is 0."""
    c = addressing("p = relu(gated - 0.2) ** gamma\n  w = p / max(sum(p), 1e-30)")
    rng = np.random.default_rng(1)
    params = c.init_params(input=3, slots=6, seed=0, dtype=np.float64)
    state0 = {"w": distributions(rng, (2, 6))}
    x = rng.standard_normal((2, 2, 3))
    f = c.forward(params, x, state0)
    grads = c.backward(params, f, {}, {"w": np.ones((2, 6))})
    assert np.isfinite(grads.params["b_gamma"]) and np.isfinite(grads.params["w_gamma"]).all()
    result = gradcheck(c, params=params, xs={"x": x}, state0=state0)
    assert result.worst[1] < 1e-7, result.errors


def test_the_derivation_of_the_shift_prints_its_rules():
    c = addressing("w = shift(gated, s)")
    assert "w = shift(gated, s[0], s[1], s[2])" in c.step.equations().splitlines()
    lines = c.backward_ir.equations().splitlines()
    for line in ["d_s[2] = sum(d_w * roll(gated, 1))", "d_s[1] = sum(d_w * gated)",
                 "d_s[0] = sum(d_w * roll(gated, -1))", "d_gated = shift(d_w, s[2], s[1], s[0])"]:
        assert line in lines, line


ADDRESSING_ERRORS = [
    ("w = shift(gated, content)", "the shift distribution of shift(w, s) has one weight per "
     "shift, so its size is a number (3: shifts -1, 0, +1), as in s = softmax(W_shift @ h) with "
     "W_shift: {shape: [3, hidden]}; this one has size (slots,)", "content)"),
    ("w = shift(gated, gamma)", "shift(w, s) takes a shift distribution here, a vector; this "
     "is a scalar", "gamma)"),
    ("w = shift(gamma, s)", "shift(w, s) takes a weighting over slots here, a vector; this is a "
     "scalar", "gamma, s"),
    ("w = shift(outer(gated, x), s)", "shift(w, s) takes a weighting over slots here, a "
     "vector; this is shape (slots, input)", "outer(gated"),
    ("w = gated + sum(shift(s, s))", "shift(w, s) rotates w over the memory's slots, a named "
     "size; this w has size (3,)", "s, s))"),
    ("w = shift(gated)", "'shift' takes 2 arguments, got 1", "shift(gated)"),
    ("w = shfit(gated, s)", "unknown function 'shfit' (did you mean 'shift'?)", "shfit"),
    ("w = gated ** x", "shape mismatch at '**': shape (slots,) and shape (input,); an exponent "
     "per sequence is a scalar, as in w ** gamma with gamma = 1 + softplus(sum(w_gamma * h) + "
     "b_gamma)", "** x"),
]


@pytest.mark.parametrize("equations, message, marker", ADDRESSING_ERRORS,
                         ids=[e[2] for e in ADDRESSING_ERRORS])
def test_addressing_misuse_is_a_located_error(equations, message, marker):
    text = ADDRESSING.replace("SHIFTS", "3").replace("EQUATIONS", equations)
    assert_refused(text, message, marker, first_line=10)


def test_an_even_number_of_shifts_is_refused_at_the_distribution():
    text = ADDRESSING.replace("SHIFTS", "4").replace("EQUATIONS", "w = shift(gated, s)")
    assert_refused(text, "the shift distribution of shift(w, s) has 4 weights; it needs an odd "
                   "number, centred on no shift (3: shifts -1, 0, +1; 5: -2 to +2)", "s)",
                   first_line=10)


def test_the_shift_runs_on_the_cpu_target_one_row_at_a_time():
    """A cell whose only rank-2 operator is the shift: the row kernels run it (the batched
    vector kernels have no code for it), on the cuda target too."""
    text = ADDRESSING.replace("SHIFTS", "3").replace("EQUATIONS", "w = shift(gated, s) * gamma")
    cpu, ref = rnndsl.compile(text), rnndsl.compile(text, target="reference")
    assert isinstance(cpu.plan, emit_rows.RowPlan)
    with nan_scratch():
        diffs = differences(cpu, ref, 4, 3, [4, 2, 0], np.float64, seed=1)
    assert max(diffs.values()) < 1e-10, diffs
    assert isinstance(rnndsl.compile(text, target="cuda").plan, emit_rows.RowPlan)


# -- per-sequence scalar states and sizes as numbers (xLSTM's stabiliser, 1 / sqrt(key)) ----------
SCALAR_STATE = """name: s
sizes: [input, key]
inputs: {x: input}
states: {n: key, m: []}
outputs: [n]
equations: |
  k = W_k @ x / sqrt(key)
  i_pre = sum(w_i * x)
  m = max(m_prev - 0.5, i_pre)
  n = exp(-0.5 + m_prev - m) * n_prev + exp(i_pre - m) * k
"""


def test_a_scalar_state_is_one_number_per_sequence():
    c = rnndsl.compile(SCALAR_STATE, target="reference")
    assert c.states == {"n": "key", "m": ()}
    params = c.init_params(input=3, key=4, seed=0, dtype=np.float64)
    x = np.random.default_rng(0).standard_normal((2, 5, 3))
    f = c.forward(params, x, lengths=[2, 1, 0, 2, 2])
    assert f.states["m"].shape == (5, 1) and f.states["n"].shape == (5, 4)
    i_pre = x @ params["w_i"]  # (T, B): m = max(m_prev - 0.5, i~) from m = 0
    m1 = np.maximum(-0.5, i_pre[0])
    want = np.where([True, False, False, True, True], np.maximum(m1 - 0.5, i_pre[1]),
                    np.where([True, True, False, False, False], m1, 0))
    np.testing.assert_allclose(f.states["m"][:, 0], want, rtol=1e-15)
    for lengths in (None, [3, 1, 0]):
        assert gradcheck(c, T=3, B=3, size=2, seed=1, lengths=lengths).worst[1] < 1e-7


def test_a_size_in_an_equation_is_its_number():
    c = rnndsl.compile(SCALAR_STATE, target="reference")
    assert "k = W_k @ x / sqrt(key)" in c.step.equations().splitlines()
    params = c.init_params(input=3, key=4, seed=0, dtype=np.float64)
    x = np.ones((1, 1, 3))
    n = c.forward(params, x).states["n"]
    i_pre = x[0, 0] @ params["w_i"]
    m = max(-0.5, i_pre)
    np.testing.assert_allclose(n[0], np.exp(i_pre - m) * params["W_k"] @ x[0, 0] / 2.0,
                               rtol=1e-14)


@pytest.mark.parametrize("equation, message, marker", [
    ("m = n_prev", "shape mismatch: state 'm' has one number per sequence ([]) but the right "
     "side has shape (key,)", "m = n_prev"),
    ("m = key * x", "shape mismatch: state 'm' has one number per sequence ([]) but the right "
     "side has shape (input,)", "m = key"),
])
def test_a_vector_assigned_to_a_scalar_state_is_located(equation, message, marker):
    text = SCALAR_STATE.replace("  m = max(m_prev - 0.5, i_pre)", f"  {equation}")
    assert_refused(text, message, marker)


def test_a_scalar_state_runs_on_the_cpu_target_one_row_at_a_time():
    """The row kernels run a cell with a scalar state (the batched vector kernels have no code
    for one), on the cuda target too."""
    cpu, ref = rnndsl.compile(SCALAR_STATE), rnndsl.compile(SCALAR_STATE, target="reference")
    assert isinstance(cpu.plan, emit_rows.RowPlan)
    with nan_scratch():
        diffs = differences(cpu, ref, 4, 3, [4, 2, 0], np.float64, seed=1)
    assert max(diffs.values()) < 1e-10, diffs
    assert isinstance(rnndsl.compile(SCALAR_STATE, target="cuda").plan, emit_rows.RowPlan)


# -- block-diagonal parameters (xLSTM's head-wise recurrent weights) ------------------------------
BLOCKS = """name: b
sizes: [input, hidden]
inputs: {x: input}
states: {h: hidden}
constants: {heads: 2}
params:
  R: {shape: [hidden, hidden], blocks: heads}
equations: |
  h = tanh(W @ x + R @ h_prev + b)
"""


def test_a_block_diagonal_parameter_uses_its_diagonal_blocks_alone():
    c = rnndsl.compile(BLOCKS, target="reference")
    params = c.init_params(input=3, hidden=4, seed=0, dtype=np.float64)
    off = np.kron(1 - np.eye(2), np.ones((2, 2))).astype(bool)
    assert not params["R"][off].any() and params["R"][~off].all()  # initialised block-diagonal
    rng = np.random.default_rng(0)
    params["R"] = rng.standard_normal((4, 4))  # what lies off the blocks is never read
    x, h0 = rng.standard_normal((1, 2, 3)), rng.standard_normal((2, 4))
    f = c.forward(params, x, {"h": h0})
    want = np.tanh(x[0] @ params["W"].T + params["b"] +
                   np.concatenate([h0[:, :2] @ params["R"][:2, :2].T,
                                   h0[:, 2:] @ params["R"][2:, 2:].T], 1))
    np.testing.assert_allclose(f.states["h"], want, rtol=1e-14)
    g = c.backward(params, f, {}, {"h": np.ones((2, 4))})
    assert not g.params["R"][off].any() and g.params["R"][~off].all()
    for lengths in (None, [3, 1, 0]):
        result = gradcheck(c, T=3, B=3, size=3, seed=1, lengths=lengths)  # hidden 4
        assert result.worst[1] < 1e-7, result.errors


@pytest.mark.parametrize("junk", [np.inf, np.nan])
def test_an_inf_or_nan_off_the_blocks_reaches_nothing(junk):
    """Entries off a block-diagonal parameter's blocks are not part of it: an inf or NaN there
    changes no output and no gradient, in the reference (which once masked by multiplying,
    0 * inf = NaN, and gave a NaN gradient off the blocks) and in the kernels (which read the
    blocks alone); the gradient off the blocks stays 0."""
    off = np.kron(1 - np.eye(2), np.ones((2, 2))).astype(bool)
    rng = np.random.default_rng(3)
    for target in ("reference", "cpu"):
        c = rnndsl.compile(BLOCKS, target=target)
        params = c.init_params(input=3, hidden=4, seed=0, dtype=np.float64)
        x, h0 = rng.standard_normal((3, 2, 3)), rng.standard_normal((2, 4))
        clean = c.forward(params, x, {"h": h0})
        g_clean = c.backward(params, clean, {"h": np.ones((3, 2, 4))})
        params["R"] = np.where(off, junk, params["R"])
        f = c.forward(params, x, {"h": h0})
        g = c.backward(params, f, {"h": np.ones((3, 2, 4))})
        np.testing.assert_array_equal(f.outputs["h"], clean.outputs["h"])
        for k in g_clean.params:
            np.testing.assert_array_equal(g.params[k], g_clean.params[k], err_msg=(target, k))
        assert not g.params["R"][off].any() and np.isfinite(g.params["R"]).all()


def test_the_derivation_names_the_blocks_and_the_cuda_target_runs_them_per_step():
    c = rnndsl.compile(BLOCKS, target="reference")
    assert "d_R += outer(d_h_pre, h_prev) (its 2 diagonal blocks)" in \
        c.backward_ir.equations().splitlines()
    code = rnndsl.compile(BLOCKS, target="cuda").engine.source_code("float64")
    assert "cs.block_product(" in code and "def forward_grid(" not in code


def test_blocks_must_divide_the_size():
    c = rnndsl.compile(BLOCKS, target="reference", constants={"heads": 3})
    with pytest.raises(ValueError, match=r"parameter 'R' has 3 diagonal blocks, so its size "
                                         r"\(hidden = 4\) must be a multiple of 3"):
        c.init_params(input=3, hidden=4)
    params = rnndsl.compile(BLOCKS, target="reference").init_params(input=3, hidden=4)
    with pytest.raises(ValueError, match="must be a multiple of 3"):
        c.forward(params, np.ones((1, 1, 3)))


CUT = "[u, v] = R @ h_prev\n  h = tanh(W @ x + u + v)\n"


@pytest.mark.parametrize("decl, equations, message, marker", [
    ("{shape: [hidden, input], blocks: heads}", "h = tanh(R @ x)\n", "'R' has 2 blocks on its "
     "diagonal, so it is a square matrix of one size used whole, as in R @ h_prev with R: "
     "{shape: [hidden, hidden], blocks: heads}; it is of shape (hidden, input)", "heads}"),
    ("{shape: [hidden + hidden, hidden], blocks: heads}", CUT, "'R' has 2 blocks on its "
     "diagonal, so it is a square matrix of one size used whole", "heads}"),
    ("{shape: [hidden, hidden], blocks: head}", None, "'blocks' of 'R' names 'head', which is "
     "not a constant (did you mean 'heads'?)", "head}"),
    ("{shape: [hidden, hidden], blocks: 0}", None, "'blocks' of 'R' is the number of blocks on "
     "its diagonal, a whole number or a constant's name", "0}"),
])
def test_a_bad_blocks_declaration_is_located(decl, equations, message, marker):
    text = BLOCKS.replace("{shape: [hidden, hidden], blocks: heads}", decl)
    if equations:
        text = text.split("equations: |\n")[0] + "equations: |\n  " + equations
    assert_refused(text, message, marker, first_line=6)


def test_a_fractional_number_of_blocks_is_refused():
    text = BLOCKS.replace("blocks: heads", "blocks: half").replace(
        "constants: {heads: 2}", "constants: {half: 0.5}")
    assert_refused(text, "'blocks' of 'R' is the constant 'half' = 0.5; a number of blocks is "
                   "a whole number of at least 1", "half}", first_line=6)


def test_gradcheck_command_fails_on_nan_and_says_why(tmp_path):
    """Random initial states may be negative: h_prev ** gamma is then NaN, which fails."""
    spec = tmp_path / "power.yaml"
    spec.write_text("name: power\nsizes: [input, hidden]\ninputs: {x: input}\n"
                    "states: {h: hidden}\noutputs: [h]\nequations: |\n"
                    "  h = h_prev ** 1.5 + W @ x\n")
    result = CliRunner().invoke(app, ["gradcheck", str(spec), "--steps", "2", "--batch", "3",
                                      "--size", "3"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "worst relative error nan" in result.output
    assert "the random initial states may lie outside the cell's domain" in result.output


@pytest.mark.parametrize("name, lines", [
    ("ntm", ["d_read_gated = shift(d_read_shifted, read_shift[2], read_shift[1], read_shift[0])",
             "d_add = d_M.T @ w_write", "d_write_from = d_write_gated * (1 - write_gate)",
             "d_w_write_prev = d_write_from - sum(d_write_from * softmax(w_write_start)) * "
             "step(1 - sum(w_write_prev))"]),
    ("mlstm", ["d_C_1 = d_C_1_next + outer(d_h_1_8, q_1)", "d_k_1_2 = d_k_1 / sqrt(key)"]),
    ("slstm", ["d_R_z += outer(d_z_pre, h_prev) (its 4 diagonal blocks)", "d_c_prev = d_c * f"]),
])
def test_cli_prints_the_backward_of_the_new_cells(name, lines):
    shown = CliRunner().invoke(app, ["compile", name, "--target", "reference", "--show",
                                     "backward"])
    assert shown.exit_code == 0, shown.output
    for line in lines:
        assert line in shown.output.splitlines(), line
