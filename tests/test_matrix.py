"""Values of rank 2: matrix-valued states, their operations, shape rules and errors, the
derived backward step (finite differences, and independent PyTorch autograd for the built-in
cells), and the compiled targets' refusal."""
import numpy as np
import pytest
from typer.testing import CliRunner

import rnndsl
from rnndsl.cli import app
from rnndsl.engines.gradcheck import gradcheck
from rnndsl.language.errors import SpecError
from rnndsl.symbolic import ir, rank2

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
    ("{M: [key, value, input]}", "'M' has 3 sizes; a state is a vector (M: hidden) or a "
     "matrix of two sizes (M: [key, value])", "[key, value, input]"),
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


# -- the cuda target refuses, by name (the cpu target's kernels: test_matrix_kernels.py) ----------
def test_the_cuda_target_refuses_matrix_values():
    with pytest.raises(SpecError) as info:
        rnndsl.compile("delta_net", target="cuda")
    assert "the cuda target cannot run this cell yet: state 'W' is a matrix of shape " \
           "(value, key)" in info.value.message
    assert "use the cpu or the reference target" in info.value.message


def test_a_matrix_inside_an_equation_is_refused_too():
    text = "name: t\nsizes: [input, value]\ninputs: {x: input}\nstates: {h: value}\n" \
        "equations: |\n  h = tanh(sum(outer(x, h_prev), input))\n"
    with pytest.raises(SpecError, match="the equation of 'h' computes a matrix of shape "
                                        r"\(input, value\)"):
        rnndsl.compile(text, target="cuda")
    assert rnndsl.compile(text, target="reference").step.shape_of("h") == ("value",)


def test_retargeting_a_matrix_cell_is_refused_too():
    with pytest.raises(SpecError, match="the cuda target cannot run this cell yet"):
        rnndsl.compiler.retarget(rnndsl.compile("fast_weights", target="reference"), "cuda")


def test_cli_compile_refuses_on_cuda_and_prints_the_backward_on_the_reference():
    refused = CliRunner().invoke(app, ["compile", "delta_net", "--target", "cuda"])
    assert refused.exit_code == 2 and "Traceback" not in refused.output
    assert "state 'W' is a matrix" in refused.output
    shown = CliRunner().invoke(app, ["compile", "delta_net", "--target", "reference",
                                     "--show", "backward"])
    assert shown.exit_code == 0, shown.output
    assert "  states   W (value, key)" in shown.output
    for line in DELTA_NET_BY_HAND:
        assert line in shown.output.splitlines(), line


def test_builtin_matrix_cells_are_marked_in_the_list():
    listed = CliRunner().invoke(app, ["list"]).output.splitlines()
    marked = {line.split()[0] for line in listed if line.endswith("[cpu and reference targets]")}
    assert marked == {"fast_weights", "delta_net"} == set(rnndsl.compiler.matrix_specs())
    assert {"fast_weights", "delta_net"} <= set(rnndsl.compiler.kernel_specs())
    assert not {"fast_weights", "delta_net"} & set(rnndsl.compiler.kernel_specs("cuda"))


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
                 "sum(", "mean(", "norm(", "max(", ", key", ", value", ", hidden", ", 0", ", 1",
                 "(", ")", "*", "+", "-", "/", "**2", "tanh(", "[", "]", ", ", "1"]


@pytest.mark.parametrize("base", ["delta_net", "fast_weights"])
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
            f = c.forward(c.init_params(dtype=np.float64, **sizes), np.ones((2, 2, sizes["input"])))
            c.backward(c.init_params(dtype=np.float64, **sizes), f,
                       {o: np.ones_like(v) for o, v in f.outputs.items()})
    assert failed > 100 and compiled > 2, (failed, compiled)  # both paths were exercised
