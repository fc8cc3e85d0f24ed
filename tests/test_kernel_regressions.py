"""One test per kernel defect found by writing cells from papers (and by the differential
fuzzer): each would fail on the code before its fix. Engines are compared with scratch
buffers filled with NaN, so that a read before a write cannot pass by luck."""
import os
import subprocess
import sys

import numpy as np
import pytest

import rnndsl
from rnndsl.language.errors import SpecError
from rnndsl.engines.gradcheck import gradcheck
from rnndsl.backend.scratch import nan_scratch

from engines import differences

SPEC = """
name: {name}
sizes: [{sizes}]
inputs: {{{inputs}}}
states: {{{states}}}
outputs: [{outputs}]
params: {{{params}}}
equations: |
{equations}
"""


def spec(name="cell", sizes="input, hidden", inputs="x: input", states="h: hidden",
         outputs="h", params="", equations=""):
    body = "\n".join(f"  {line.strip()}" for line in equations.strip().splitlines())
    return SPEC.format(name=name, sizes=sizes, inputs=inputs, states=states, outputs=outputs,
                       params=params, equations=body)


def assert_engines_agree(text, T=5, B=3, lengths=(5, 2, 0), tol=1e-10):
    cpu, ref = rnndsl.compile(text), rnndsl.compile(text, target="reference")
    with nan_scratch():
        diffs = differences(cpu, ref, T, B, list(lengths))
    bad = {k: v for k, v in diffs.items() if not v < tol}
    assert not bad, bad


READOUT = spec(name="elman_readout", sizes="input, hidden, output", outputs="y",
               params="V: {shape: [output, hidden]}", equations="""
    h = tanh(W @ x + R @ h_prev + b)
    y = V @ h + c""")


@pytest.mark.parametrize("text", [
    READOUT,
    READOUT.replace("y = V @ h + c", "y = V @ h"),  # an output that is exactly a product
    # torch.nn.LSTM(proj_size=...): the state h is a product
    spec(name="lstm_proj", sizes="input, hidden, proj", states="h: proj, c: hidden",
         params="W_hr: {shape: [proj, hidden]}", equations="""
        i = sigmoid(W_i @ x + U_i @ h_prev + b_i)
        f = sigmoid(W_f @ x + U_f @ h_prev + b_f)
        g = tanh(W_g @ x + U_g @ h_prev + b_g)
        o = sigmoid(W_o @ x + U_o @ h_prev + b_o)
        c = f * c_prev + i * g
        h = W_hr @ (o * tanh(c))"""),
], ids=["readout", "bare_product", "lstm_proj"])
def test_states_and_outputs_that_are_products(text):
    assert_engines_agree(text)


def test_row_reduction_used_after_the_per_step_product():
    assert_engines_agree(spec(params="E0: {shape: [hidden]}", equations="""
        pre = W @ h_prev + C @ x
        h0 = tanh(pre)
        h = tanh(pre + sum(h_prev * h0) * E0)"""))


@pytest.mark.parametrize("text", [
    # d_h_prev is the constant 0: every column of it must still be written
    spec(inputs="x: input, u: hidden", states="h: hidden, c: input", outputs="h, c",
         equations="h = tanh(sum(x)) * u\nc = c_prev * b"),
    # a product of a parameter vector: hoisted, the same in every row
    spec(params="W: {shape: [hidden, hidden]}, b2: {shape: [hidden]}",
         equations="h = tanh(W @ b2 + V @ x + h_prev)"),
    # a W.T @ g sum that only a weight gradient's buffer needs
    spec(outputs="y", params="W4: {shape: [input, hidden]}", equations="y = W4 @ h\nh = W3 @ x"),
    # an input's gradient: a product (after the loop) plus a per-row term (in the loop)
    spec(inputs="x: input, u: hidden", equations="h = tanh(W1 @ u + mean(u) * b + U @ h_prev)"),
], ids=["constant_adjoint", "parameter_vector_product", "gemm_t_for_weights_only",
        "per_row_input_gradient"])
def test_plans_the_built_in_cells_never_make(text):
    assert_engines_agree(text)


# -- numerics: the kernels compute what NumPy (the reference) computes -----------------------
SPECIAL = [np.nan, np.inf, -np.inf, 0.0, -2.0, 3.0, 705.0, 88.5, 89.0, -100.0, -750.0, 1e30]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("expr", ["relu(x)", "exp(x)", "max(x, 0.5)", "min(x, -0.5)",
                                  "hard_sigmoid(x)", "softplus(x)", "sigmoid(x)", "tanh(x)",
                                  "abs(x)", "x * max(x)", "softmax(x)"])
@pytest.mark.parametrize("kernels", ["vector", "row"])
def test_special_values_as_numpy(expr, dtype, kernels):
    """Both CPU emitters: a matrix state makes the cell run on the row kernels (emit_rows.py),
    whose fastmath flags differ from the vector kernels' (they allow reassociation)."""
    if kernels == "vector":
        text = spec(inputs="x: n", states="h: n", sizes="n",
                    equations=f"h = {expr} + 0 * h_prev")
    else:
        text = spec(inputs="x: n", states="h: n, M: [n, n]", sizes="n",
                    equations=f"h = {expr} + 0 * h_prev\nM = M_prev")
    x = np.array(SPECIAL, dtype).reshape(1, 1, -1)
    with np.errstate(all="ignore"):
        got = rnndsl.compile(text).forward({}, x).states["h"]
        want = rnndsl.compile(text, target="reference").forward({}, x).states["h"]
    np.testing.assert_allclose(got, want, rtol=1e-6 if dtype == np.float32 else 1e-13,
                               atol=np.finfo(dtype).tiny)  # a subnormal may flush to 0


@pytest.mark.parametrize("factor", ["(1e200 * 1e200)", "(-1e200 * 1e200)"])
def test_constants_folded_to_infinity_compile(factor):
    text = spec(equations=f"h = tanh(W @ x + h_prev) * {factor}")
    cell = rnndsl.compile(text)
    out = cell.forward(cell.init_params(2, 3, dtype=np.float64), np.ones((1, 1, 2))).states["h"]
    assert np.isinf(out).all()


def test_a_constant_float32_cannot_hold_is_an_error():
    cell = rnndsl.compile(spec(equations="h = tanh(W @ x + h_prev) * 1e39"))
    assert np.isfinite(cell.forward(cell.init_params(2, 3, dtype=np.float64),
                                    np.ones((1, 1, 2))).states["h"]).all()
    with pytest.raises(SpecError, match="1e[+]39 does not fit in float32"):
        cell.forward(cell.init_params(2, 3), np.ones((1, 1, 2), np.float32))


# -- padding ------------------------------------------------------------------------------------
@pytest.mark.parametrize("target", ["cpu", "reference"])
def test_nan_in_padding_reaches_no_gradient(target):
    cell = rnndsl.compile("lstm", target=target)
    rng = np.random.default_rng(0)
    params = cell.init_params(3, 4, dtype=np.float64)
    x = rng.standard_normal((6, 2, 3))
    lengths = [6, 3]
    clean = cell.backward(params, cell.forward(params, x, lengths=lengths), np.ones((6, 2, 4)))
    x[3:, 1] = np.nan
    x[4, 1, 0] = np.inf
    d_out = np.ones((6, 2, 4))
    d_out[3:, 1] = np.nan  # the loss's gradient in the padding is ignored as well
    fwd = cell.forward(params, x, lengths=lengths)
    grads = cell.backward(params, fwd, d_out)
    for p in params:
        np.testing.assert_allclose(grads.params[p], clean.params[p], rtol=1e-12, err_msg=p)
    assert not grads.inputs["x"][3:, 1].any()


# -- gradcheck ----------------------------------------------------------------------------------
def test_gradcheck_checks_scalar_parameters():
    text = spec(params="a: {shape: [], init: {constant: 0.5}}",
                equations="h = tanh(W @ x + a * h_prev + b)")
    result = gradcheck(rnndsl.compile(text, target="reference"))
    assert result.errors["param a"] < 1e-7, result.errors


def test_gradcheck_takes_chosen_parameters_and_states():
    """A sharpening exponent (NTM) must stay >= 1; random values would make NaN."""
    text = spec(params="gam: {shape: []}", equations="h = (softplus(W @ x + b) + 0.1) ** gam")
    cell = rnndsl.compile(text, target="reference")
    params = cell.init_params(2, 3, dtype=np.float64)
    params["gam"] = np.array(1.5)
    xs = {"x": np.random.default_rng(1).standard_normal((3, 2, 2))}
    result = gradcheck(cell, params=params, xs=xs, state0={"h": np.ones((2, 3))})
    assert result.worst[1] < 1e-6, result.errors
    assert params["gam"] == 1.5  # the caller's arrays are not perturbed


# -- the generated code depends on the spec alone -------------------------------------------------
def test_generated_code_does_not_depend_on_what_was_compiled_before():
    code = ("import rnndsl, sys, hashlib\n"
            "for n in sys.argv[1:]: c = rnndsl.compile(n)\n"
            "print(hashlib.sha256(c.engine.source_code('float64').encode()).hexdigest())")
    digests = {subprocess.run([sys.executable, "-c", code, *names], capture_output=True,
                              text=True, check=True, env=os.environ).stdout
               for names in (["gru"], ["lstm", "gru"], ["layernorm_lstm", "jordan", "gru"])}
    assert len(digests) == 1, digests
    first = rnndsl.compile("gru").engine.source_code("float64")
    rnndsl.compile("peephole_lstm")
    assert rnndsl.compile("gru").engine.source_code("float64") == first


# -- valid specs the checker rejected ---------------------------------------------------------------
def test_parameters_named_after_the_value_they_feed():
    cell = rnndsl.compile(spec(equations="""
        gate = sigmoid(W_gate @ x + U_gate @ h_prev + b_gate)
        h = gate * tanh(W @ x + U @ h_prev + b)"""))
    assert {"W_gate", "U_gate", "b_gate"} <= set(cell.params)
    with pytest.raises(SpecError, match="unknown name 'h_prv' .did you mean 'h_prev'"):
        rnndsl.compile(spec(equations="h = tanh(W @ x + U @ h_prv)"))


def test_a_cell_without_inputs_is_a_located_error():
    text = spec(equations="h = tanh(U @ h_prev + b)").replace("inputs: {x: input}\n", "")
    with pytest.raises(SpecError, match="needs at least one input") as err:
        rnndsl.compile(text)
    assert err.value.pos is not None and err.value.pos.line == 4


@pytest.mark.parametrize("target", ["reference", "cpu"])
def test_the_gradient_of_a_row_max_is_shared_by_its_ties_as_torch_shares_it(target):
    """max over a row whose maximum several elements reach: each of the k tied elements gets
    g/k of the gradient, as torch.amax gives it (it gave each all of g, k times too much, and
    the engines disagreed where rounding tied k elements in one and none in the other: the
    differential fuzzer, seed 30283)."""
    torch = pytest.importorskip("torch")
    text = spec(params="W: {shape: [hidden, input]}",
                equations="h = max(W @ x) * tanh(h_prev + 1)")
    c = rnndsl.compile(text, target=target)
    rng = np.random.default_rng(0)
    T, B, I, H = 3, 2, 4, 5
    W = rng.standard_normal((H, I))
    W[3] = W[1] = W[0]  # rows 0, 1 and 3 give the same value: a three-way tie on top
    W[[2, 4]] = W[0] - 1.0 - np.abs(rng.standard_normal((2, I)))  # below, for x >= 0
    x = np.abs(rng.standard_normal((T, B, I)))
    h0, dh = rng.standard_normal((B, H)), rng.standard_normal((T, B, H))
    f = c.forward({"W": W}, x, {"h": h0})
    g = c.backward({"W": W}, f, {"h": dh})

    Wt = torch.tensor(W, requires_grad=True)
    h, outs = torch.tensor(h0), []
    for t in range(T):
        h = torch.amax(torch.tensor(x[t]) @ Wt.T, dim=1, keepdim=True) * torch.tanh(h + 1)
        outs.append(h)
    (torch.stack(outs) * torch.tensor(dh)).sum().backward()
    np.testing.assert_allclose(f.outputs["h"], torch.stack(outs).detach().numpy(), rtol=1e-12)
    np.testing.assert_allclose(g.params["W"], Wt.grad.numpy(), rtol=1e-10, atol=1e-12)
    assert np.abs(g.params["W"][0]).sum() > 0  # the tied rows did receive their shares
