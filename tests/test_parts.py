"""Cutting a vector into named parts, `[i, f, g, o] = W @ [h_prev, x] + b`, and vectors whose
size is a number (`shape: [3, hidden]`), indexed as `s[0]`: both lower to blocks of the
parameters and plain per-row arithmetic, so every engine runs them and `grad` derives them."""
import numpy as np
import pytest

import rnndsl
from rnndsl.engines.gradcheck import gradcheck

from test_concat import HEAD, cell

STACKED = """name: lstm_stacked
sizes: [input, hidden]
inputs: {x: input}
states: {h: hidden, c: hidden}
outputs: [h]
equations: |
  [i, f, g, o] = W @ [h_prev, x] + b
  c = sigmoid(f) * c_prev + sigmoid(i) * tanh(g)
  h = sigmoid(o) * tanh(c)
"""

SHIFT = HEAD + """params:
  W_s: {shape: [3, hidden]}
equations: |
  s = softmax(W_s @ h_prev + b_s)
  h = tanh(s[0] * h_prev + s[1] * (U @ x) + s[2] + V @ s + max(s) - mean(s) * min(s))
"""


def test_stacked_lstm_equals_the_one_written_gate_by_gate():
    stacked, gates = rnndsl.compile(STACKED), rnndsl.compile("lstm_concat")
    assert stacked.params["W"].shape == ("hidden + hidden + hidden + hidden", "hidden + input")
    assert "W[2*hidden:3*hidden, hidden:]" in stacked.step.params
    I, H, T, B = 3, 4, 5, 2
    p = stacked.init_params(input=I, hidden=H, seed=0, dtype=np.float64)
    assert p["W"].shape == (4 * H, H + I) and p["b"].shape == (4 * H,)
    rows = {g: slice(k * H, (k + 1) * H) for k, g in enumerate("ifgo")}
    q = {**{f"W_{g}": p["W"][r] for g, r in rows.items()},
         **{f"b_{g}": p["b"][r] for g, r in rows.items()}}
    rng = np.random.default_rng(1)
    x = rng.standard_normal((T, B, I))
    fa, fb = stacked.forward(p, x, lengths=[5, 2]), gates.forward(q, x, lengths=[5, 2])
    np.testing.assert_array_equal(fa.output, fb.output)
    dy = rng.standard_normal(fa.output.shape)
    ga, gb = stacked.backward(p, fa, dy), gates.backward(q, fb, dy)
    for g, r in rows.items():
        np.testing.assert_array_equal(ga.params["W"][r], gb.params[f"W_{g}"])
        np.testing.assert_array_equal(ga.params["b"][r], gb.params[f"b_{g}"])
    # the x columns of all four gates are still one GEMM before the time loop
    assert [line for line in stacked.plan.describe_groups() if "hoisted" in line][0].count(
        ", hidden:]") == 4


def shift_numpy(p, x, h0):
    """The SHIFT cell written directly in NumPy (vector s of size 3)."""
    h = h0
    for xt in x:
        a = h @ p["W_s"].T + p["b_s"]
        s = np.exp(a - a.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        k = lambda j: s[:, j:j + 1]  # noqa: E731
        h = np.tanh(k(0) * h + k(1) * (xt @ p["U"].T) + k(2) + s @ p["V"].T
                    + s.max(-1, keepdims=True) - s.mean(-1, keepdims=True) *
                    s.min(-1, keepdims=True))
    return h


@pytest.mark.parametrize("target", ["cpu", "reference"])
def test_a_vector_of_three_elements_indexed(target):
    c = rnndsl.compile(SHIFT, target=target)
    assert {p: i.shape for p, i in c.params.items()} == {
        "W_s": ("3", "hidden"), "b_s": ("3",), "U": ("hidden", "input"), "V": ("hidden", "3")}
    assert "s[2]" in c.step.values and "b_s[1]" in c.step.params and "V[:, 2]" in c.step.params
    p = c.init_params(input=2, hidden=4, seed=0, dtype=np.float64)
    assert p["W_s"].shape == (3, 4) and p["V"].shape == (4, 3)
    rng = np.random.default_rng(0)
    x, h0 = rng.standard_normal((5, 3, 2)), rng.standard_normal((3, 4))
    f = c.forward(p, x, {"h": h0})
    np.testing.assert_allclose(f.states["h"], shift_numpy(p, x, h0), rtol=1e-12, atol=1e-14)
    result = gradcheck(c)
    assert result.worst[1] < 1e-6, result.errors
    assert {"param W_s", "param b_s", "param V"} <= set(result.errors)


def test_split_gradients_by_finite_differences():
    result = gradcheck(rnndsl.compile(STACKED))
    assert result.worst[1] < 1e-6, result.errors


def test_a_part_may_feed_another_cut():
    c = cell("[a, b] = tanh(W @ x) * 2 + c0\nh = a * b + h_prev",
             "constants: {c0: 0.5}\n")
    assert c.params["W"].shape == ("hidden + hidden", "input")
    p = c.init_params(input=2, hidden=3, dtype=np.float64)
    x = np.random.default_rng(0).standard_normal((1, 1, 2))
    y = np.tanh(x[0] @ p["W"].T) * 2 + 0.5
    np.testing.assert_allclose(c.forward(p, x).output[0], y[:, :3] * y[:, 3:])


@pytest.mark.parametrize("equations, extra, message, line, column", [
    ("h = h_prev[0]", "", "'h_prev[0]' needs a vector whose size is a number", 6, 14),
    ("h = tanh(s[3] * h_prev)\ns = W @ h_prev", "params:\n  W: {shape: [3, hidden]}\n",
     "index 3 is out of range for a vector of size 3 (0 to 2)", 8, 14),
    ("h = h_prev[1.5]", "", "an index is a whole number (0, 1, 2, ...), not 1.5", 6, 14),
    ("h = h_prev * W[0]", "params:\n  W: {shape: [3, hidden]}\n", "'W' is a matrix", 8, 16),
    ("h = h_prev * s[0][1]\ns = W @ h_prev", "params:\n  W: {shape: [3, hidden]}\n",
     "only a vector can be indexed; this is a scalar", 8, 21),
    ("h = W @ h_prev", "params:\n  W: {shape: [3, hidden]}\n",
     "state 'h' has size (hidden,) but the right side has shape (3,)", 8, 3),
    ("[a, b] = W @ x + h_prev\nh = a * b", "", "cannot cut 'h_prev' into 2 parts", 6, 20),
    ("[a, b] = sum(W @ x)\nh = a * b", "", "cannot cut 'sum(...)' into 2 parts", 6, 12),
    ("[a, b] = W @ x\nh = a * b + W @ x", "", "'W' is cut into parts at line 6, column 12; "
     "it cannot also be used whole", 7, 15),
    ("[a, b] = W @ x\n[c, d, e] = W @ x\nh = a * b * c * d * e", "",
     "'W' is cut into 2 parts at line 6, column 12; here into 3", 7, 15),
    ("[a, b] = W @ x\nh = a * b", "params:\n  W: {shape: [hidden + hidden + hidden, input]}\n",
     "'W' is declared with rows (hidden + hidden + hidden) but is cut into 2 parts here", 8, 12),
    ("[a, b] = W @ x\nh = a", "", "cannot infer the size of 'W' from its use (shape "
     "(hidden + ?, input) so far); declare it under 'params', e.g. W: {shape: "
     "[hidden + SIZE, input]}", 6, 12),
    ("[a, b] = W @ x\nh = a + V @ b", "params:\n  V: {shape: [hidden, 3]}\n",
     "'W' is cut into parts of sizes (hidden + 3)", 8, 12),
    ("[a, a] = W @ x\nh = a", "", "'a' is defined twice", 6, 7),
    ("[a, x] = W @ x\nh = a", "", "'x' is an input and cannot be assigned", 6, 7),
    ("h = h_prev + sum(y)\ny = V @ h_prev", "outputs: [h, y]\nparams:\n  V: {shape: [3, hidden]}\n",
     "output 'y' has the size 3, a number", 5, 14),
])
def test_misuse_is_a_located_error(equations, extra, message, line, column):
    with pytest.raises(rnndsl.SpecError) as info:
        cell(equations, extra)
    assert message in info.value.message
    assert (info.value.pos.line, info.value.pos.column) == (line, column), info.value.message
