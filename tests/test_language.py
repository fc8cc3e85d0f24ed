"""The spec language: precedence, `_prev`, parameter inference, inits, sizes, text forms."""
import numpy as np
import pytest

import rnndsl

HEAD = "name: t\nsizes: [input, hidden]\ninputs: {x: input}\nstates: {h: hidden}\n"


def cell(equations: str, extra: str = ""):
    return rnndsl.compile(HEAD + extra + "equations: |\n  " + equations.replace("\n", "\n  ")
                          + "\n")


@pytest.mark.parametrize("written, printed", [
    ("h = r * U @ h_prev\nr = sigmoid(b)", "h = r * U @ h_prev"),  # '@' binds tighter than '*'
    ("h = -W @ x", "h = -(W @ x)"),  # the sign of a matrix moves off it
    ("h = -h_prev ** 2", "h = -h_prev ** 2"),  # -(h_prev ** 2): '**' binds tighter than '-' 
    ("h = 2 ** 3 ** h_prev", "h = 2 ** 3 ** h_prev"),  # '**' is right-associative
    ("h = (2 ** 3) ** h_prev", "h = 8 ** h_prev"),  # constants fold
    ("h = h_prev - (h_prev - 1)", "h = h_prev - (h_prev - 1)"),
    ("h = h_prev * 1 + 0", "h = h_prev"),  # no '* 1', no '+ 0'
    ("h = tanh(h_prev)  # a comment", "h = tanh(h_prev)"),
    ("h = tanh(h_prev \\\n    + 1)", "h = tanh(h_prev + 1)"),  # backslash continues a line
])
def test_precedence_and_printing(written, printed):
    assert printed in cell(written).step.equations().splitlines()


def test_parameter_inference_and_declarations():
    c = cell("h = tanh(W @ x + u * h_prev + b + s * k)",
             "params:\n  s: {shape: []}\n  b: {init: ones}\n  k: {shape: hidden, init: 0.5}\n")
    shapes = {p: info.shape for p, info in c.params.items()}
    assert shapes == {"W": ("hidden", "input"), "u": ("hidden",), "b": ("hidden",), "s": (),
                      "k": ("hidden",)}
    assert not c.params["W"].declared and c.params["b"].declared
    p = c.init_params(input=3, hidden=4, seed=0, dtype=np.float64)
    assert (p["b"] == 1).all() and (p["k"] == 0.5).all() and p["s"].shape == ()
    assert np.abs(p["W"]).max() <= 0.5  # PyTorch's default: U(-1/sqrt(hidden), 1/sqrt(hidden))
    again = c.init_params(3, 4, seed=0, dtype=np.float64)  # sizes in the spec's order
    assert all((p[k] == again[k]).all() for k in p)


def test_orthogonal_and_zeros_inits():
    c = cell("h = tanh(U @ h_prev + b)", "params:\n  U: {init: orthogonal}\n  b: {init: zeros}\n")
    p = c.init_params(input=2, hidden=5, dtype=np.float64)
    np.testing.assert_allclose(p["U"] @ p["U"].T, np.eye(5), atol=1e-12)
    assert not p["b"].any()


def test_equations_as_a_list_and_sizes_beyond_input_hidden():
    text = ("name: t\nsizes: [input, hidden, output]\ninputs: {x: input}\n"
            "states: {h: hidden}\noutputs: [h, y]\nparams: {V: {shape: [output, hidden]}}\n"
            "equations:\n"
            "  - h = tanh(W @ x + U @ h_prev)\n  - y = softmax(V @ h)\n")
    c = rnndsl.compile(text)
    assert c.params["V"].shape == ("output", "hidden")
    p = c.init_params(input=2, hidden=3, output=4, dtype=np.float64)
    f = c.forward(p, np.ones((2, 1, 2)))
    np.testing.assert_allclose(f.outputs["y"].sum(axis=-1), 1.0)


def test_size_that_cannot_be_inferred():
    with pytest.raises(rnndsl.SpecError) as info:
        rnndsl.compile(HEAD.replace("[input, hidden]", "[input, hidden, output]")
                       + "outputs: [h, y]\nequations: |\n  h = tanh(U @ h_prev)\n"
                         "  y = softmax(V @ h)\n")
    msg = info.value.message
    assert "cannot infer the size of 'V'" in msg and "(?, hidden)" in msg
    assert "V: {shape: [SIZE, hidden]}" in msg


def test_reductions_and_min_max():
    c = cell("m = mean(h_prev)\nh = max(h_prev - m, 0) + min(h_prev) + sum(h_prev) * 0.5")
    h0 = np.array([[1.0, -2.0, 4.0]])
    f = c.forward({}, np.zeros((1, 1, 2)), {"h": h0})
    expect = np.maximum(h0 - h0.mean(), 0) + h0.min() + h0.sum() * 0.5
    np.testing.assert_allclose(f.states["h"], expect)


def test_matches_hand_written_numpy():
    """The LSTM spec run by the reference equals a direct NumPy transcription."""
    c = rnndsl.compile("lstm")
    p = c.init_params(input=3, hidden=2, seed=1, dtype=np.float64)
    x = np.random.default_rng(0).standard_normal((4, 2, 3))
    sig = lambda a: 1 / (1 + np.exp(-a))
    gate = lambda g, f, t: f(t @ p[f"W_i{g}"].T if False else x_t @ p[f"W_i{g}"].T + p[f"b_i{g}"]
                             + h @ p[f"W_h{g}"].T + p[f"b_h{g}"])
    h = c_ = np.zeros((2, 2))
    for x_t in x:
        i, f, g, o = (gate(k, fn, None) for k, fn in
                      (("i", sig), ("f", sig), ("g", np.tanh), ("o", sig)))
        c_ = f * c_ + i * g
        h = o * np.tanh(c_)
    fwd = c.forward(p, x)
    np.testing.assert_allclose(fwd.states["h"], h, atol=1e-14)
    np.testing.assert_allclose(fwd.states["c"], c_, atol=1e-14)


def test_square_matrix_declared():
    c = cell("h = tanh(W @ x + U @ h_prev)",
             "params:\n  U: {shape: [hidden, hidden], init: orthogonal}\n")
    assert c.params["U"].shape == ("hidden", "hidden") and c.params["U"].declared


def test_missing_file_is_a_spec_error():
    with pytest.raises(rnndsl.SpecError, match="cannot read spec 'no/such/spec.yaml'"):
        rnndsl.compile("no/such/spec.yaml")


def test_a_per_row_scalar_output():
    cell = rnndsl.compile("name: s\nsizes: [input, hidden]\ninputs: {x: input}\n"
                          "states: {h: hidden}\noutputs: [h, m]\nequations: |\n"
                          "  h = tanh(W @ x + U @ h_prev)\n  m = max(h)\n", target="reference")
    params = cell.init_params(input=2, hidden=3)
    assert cell.forward(params, np.ones((4, 2, 2), np.float32)).outputs["m"].shape == (4, 2, 1)
