"""Concatenation `W @ [h_prev, x]`: the same kernels as the split form, the user's matrix in its
natural (rows, hidden + input) layout, the built-in twins equal to their split specs."""
import re

import numpy as np
import pytest

import rnndsl

HEAD = "name: t\nsizes: [input, hidden]\ninputs: {x: input}\nstates: {h: hidden}\n"
LSTM_SPLIT = """name: lstm_split
sizes: [input, hidden]
inputs: {x: input}
states: {h: hidden, c: hidden}
outputs: [h]
equations: |
  i = sigmoid(U_i @ h_prev + V_i @ x + b_i)
  f = sigmoid(U_f @ h_prev + V_f @ x + b_f)
  g = tanh(U_g @ h_prev + V_g @ x + b_g)
  o = sigmoid(U_o @ h_prev + V_o @ x + b_o)
  c = f * c_prev + i * g
  h = o * tanh(c)
"""


def cell(equations: str, extra: str = "", **kw):
    return rnndsl.compile(HEAD + extra + "equations: |\n  " + equations.replace("\n", "\n  ")
                          + "\n", **kw)


def without_header(source: str) -> str:
    """Generated code less its comment lines (the legend names the spec's parameters)."""
    return "\n".join(line for line in source.splitlines() if not line.startswith("#"))


@pytest.mark.parametrize("target", ["cpu", "cuda"])
def test_generated_kernels_are_those_of_the_split_spec(target):
    concat = rnndsl.compile("lstm_concat", target=target)
    split = rnndsl.compile(LSTM_SPLIT.replace("name: lstm_split", "name: lstm_concat"),
                           target=target)
    for dtype in ("float32", "float64"):
        a, b = concat.engine.source_code(dtype), split.engine.source_code(dtype)
        assert a != b  # the legends differ ...
        assert without_header(a) == without_header(b)  # ... and nothing else does
    rename = {f"{k}_{g}": f"W_{g}[:, {cols}]" for k, cols in (("U", ":hidden"), ("V", "hidden:"))
              for g in "ifgo"}
    described = [re.sub(r"\b[UV]_[ifgo]\b", lambda m: rename[m.group(0)], line)
                 for line in split.plan.describe_groups()]
    assert concat.plan.describe_groups() == described
    assert any("hoisted" in line and "x @ [" in line for line in described)


def split_params(concat_params: dict, hidden: int) -> dict:
    """The split spec's parameters from the concatenated one's (columns: h_prev, then x)."""
    out = {}
    for g in "ifgo":
        out[f"U_{g}"], out[f"V_{g}"] = np.hsplit(concat_params[f"W_{g}"], [hidden])
        out[f"b_{g}"] = concat_params[f"b_{g}"]
    return out


@pytest.mark.parametrize("target", ["cpu", "reference"])
def test_forward_and_gradients_equal_the_split_spec(target):
    concat = rnndsl.compile("lstm_concat", target=target)
    split = rnndsl.compile(LSTM_SPLIT, target=target)
    rng = np.random.default_rng(0)
    I, H, T, B = 3, 4, 5, 2
    p = concat.init_params(input=I, hidden=H, seed=1, dtype=np.float64)
    assert p["W_f"].shape == (H, H + I)
    x = rng.standard_normal((T, B, I))
    fa, fb = concat.forward(p, x, lengths=[5, 3]), split.forward(split_params(p, H), x,
                                                                  lengths=[5, 3])
    np.testing.assert_array_equal(fa.output, fb.output)
    dy = rng.standard_normal(fa.output.shape)
    ga, gb = concat.backward(p, fa, dy), split.backward(split_params(p, H), fb, dy)
    assert list(ga.params) == list(p) and ga.params["W_i"].shape == (H, H + I)
    for name, g in split_params(ga.params, H).items():
        np.testing.assert_array_equal(g, gb.params[name], err_msg=name)
    np.testing.assert_array_equal(ga.inputs["x"], gb.inputs["x"])


# twin -> (split spec, how the twin's parameters map onto it)
TWINS = {
    "lstm_concat": ("lstm", {"W_i": ("W_hi", "W_ii"), "W_f": ("W_hf", "W_if"),
                             "W_g": ("W_hg", "W_ig"), "W_o": ("W_ho", "W_io"),
                             "b_i": ("b_hi", "b_ii"), "b_f": ("b_hf", "b_if"),
                             "b_g": ("b_hg", "b_ig"), "b_o": ("b_ho", "b_io")}),
    "gru_concat": ("gru", {"W_r": ("W_hr", "W_ir"), "W_z": ("W_hz", "W_iz"),
                           "b_r": ("b_hr", "b_ir"), "b_z": ("b_hz", "b_iz")}),
    "elman_concat": ("elman", {"W": ("W_hh", "W_ih"), "b": ("b_hh", "b_ih")}),
}


@pytest.mark.parametrize("twin", list(TWINS))
def test_builtin_twins_equal_their_split_specs_in_float64(twin):
    base, mapping = TWINS[twin]
    a, b = rnndsl.compile(twin), rnndsl.compile(base)
    I, H, T, B = 3, 5, 6, 4
    split = b.init_params(input=I, hidden=H, seed=2, dtype=np.float64)
    joined = {}
    for name in a.params:
        if name in mapping:
            left, right = (split[n] for n in mapping[name])
            joined[name] = np.hstack([left, right]) if left.ndim == 2 else left + right
        else:
            joined[name] = split[name]
    rng = np.random.default_rng(3)
    x = rng.standard_normal((T, B, I))
    h0 = {s: rng.standard_normal((B, H)) for s in a.states}
    fa, fb = a.forward(joined, x, h0), b.forward(split, x, h0)
    np.testing.assert_allclose(fa.output, fb.output, rtol=1e-13, atol=1e-14)
    dy = rng.standard_normal(fa.output.shape)
    ga, gb = a.backward(joined, fa, dy), b.backward(split, fb, dy)
    np.testing.assert_allclose(ga.inputs["x"], gb.inputs["x"], rtol=1e-12, atol=1e-13)
    for name, (left, right) in mapping.items():
        if ga.params[name].ndim == 2:
            np.testing.assert_allclose(ga.params[name], np.hstack([gb.params[left],
                                                                   gb.params[right]]),
                                       rtol=1e-12, atol=1e-13)
        else:  # one bias stands for two: each gets the same gradient
            np.testing.assert_allclose(ga.params[name], gb.params[left], rtol=1e-12, atol=1e-13)


def test_init_treats_the_matrix_as_a_whole():
    c = cell("h = tanh(W @ [h_prev, x] + b)", "params:\n  W: {init: orthogonal}\n")
    w = c.init_params(input=3, hidden=4, dtype=np.float64)["W"]
    assert w.shape == (4, 7)
    np.testing.assert_allclose(w @ w.T, np.eye(4), atol=1e-12)  # orthogonal as one matrix
    u = cell("h = tanh(W @ [h_prev, x] + b)").init_params(input=30, hidden=4, seed=0)["W"]
    assert np.abs(u).max() <= 0.5 and np.abs(u).max() > 0.45  # U(-1/sqrt(hidden), ..)
    assert c.param_shapes(input=3, hidden=4) == {"W": (4, 7), "b": (4,)}


def test_declared_shape_with_a_sum_and_three_parts():
    c = cell("h = tanh(W @ [h_prev, x, h_prev * h_prev])",
             "params:\n  W: {shape: [hidden, hidden + input + hidden]}\n")
    assert c.params["W"].shape == ("hidden", "hidden + input + hidden")
    assert list(c.step.params) == ["W[:, :hidden]", "W[:, hidden:hidden+input]",
                                   "W[:, hidden+input:]"]
    p = c.init_params(input=2, hidden=3, dtype=np.float64)
    h0 = np.array([[0.1, -0.2, 0.3]])
    x = np.array([[[0.5, -1.0]]])
    out = c.forward(p, x, {"h": h0}).output[0]
    np.testing.assert_allclose(out, np.tanh(np.hstack([h0, x[0], h0 * h0]) @ p["W"].T))
    with pytest.raises(ValueError, match=r"'W' has shape \(3, 6\); \(hidden, hidden \+ input \+ hidden\) is \(3, 8\)"):
        c.forward({"W": p["W"][:, :6]}, x)


def test_a_scalar_part_is_one_column():
    c = cell("h = tanh(W @ [h_prev, x, 1])")  # the bias as a column, as some papers write it
    assert c.params["W"].shape == ("hidden", "hidden + input + 1")
    assert list(c.step.params) == ["W[:, :hidden]", "W[:, hidden:hidden+input]",
                                   "W[:, hidden+input]"]
    p = c.init_params(input=2, hidden=3, dtype=np.float64)
    h0, x = np.array([[0.1, -0.2, 0.3]]), np.array([[[0.5, -1.0]]])
    out = c.forward(p, x, {"h": h0}).output[0]
    np.testing.assert_allclose(out, np.tanh(np.hstack([h0, x[0], [[1.0]]]) @ p["W"].T))


def test_a_concatenation_in_the_summary_and_the_network():
    from rnndsl.summary import describe

    c = rnndsl.compile("elman_concat")
    text = describe(c)
    assert "W            (hidden, hidden + input)" in text
    net = rnndsl.Network(c, input_size=3, hidden=4, layers=2)
    shapes = net.param_shapes()
    assert shapes["layer0.fwd.W"] == (4, 7) and shapes["layer1.fwd.W"] == (4, 8)


def test_torch_bridge_trains_a_concatenated_cell():
    torch = pytest.importorskip("torch")
    from rnndsl.torch import RNN

    torch.manual_seed(0)
    m = RNN("lstm_concat", input_size=3, hidden_size=4, dtype=torch.float64)
    assert m.layer_params(0)[0].shape == (4, 7)
    x = torch.randn(5, 2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, *p: m(x)[0], (x, *m.layer_params(0)))


@pytest.mark.parametrize("equations, extra, message, column", [
    ("h = tanh([h_prev, x])", "", "can only be the vector of a product", 12),
    ("z = [h_prev, x]\nh = W @ z", "", "can only be the vector of a product", 7),
    ("h = W @ [h_prev, U] + U @ x", "", "used as a matrix here", 25),
    ("h = U @ x + W @ [U, x]", "", "cannot concatenate a matrix", 20),
    ("h = W @ [h_prev, x] + W @ h_prev", "", "multiplies a concatenation at line 6, column 9", 27),
    ("h = W @ h_prev + W @ [h_prev, x]", "", "multiplies a plain vector at line 6, column 9", 22),
    ("h = W @ [h_prev, x] + W @ [x, h_prev]", "", "has columns (hidden + input) but "
     "multiplies (input + hidden) and at line 6, column 9", 27),
    ("h = W @ [x, h_prev]", "params:\n  W: {shape: [hidden, hidden + input]}\n",
     "has columns (hidden + input) but multiplies (input + hidden)", 9),
    ("h = W @ [h_prev, x, x]", "params:\n  W: {shape: [hidden, hidden + input]}\n",
     "declared with columns (hidden + input) but multiplies 3 joined vectors", 9),
    ("h = W @ h_prev", "params:\n  W: {shape: [hidden, hidden + input]}\n",
     "declared with columns (hidden + input): it multiplies a concatenation", 9),
    ("h = W @ [h_prev, v]", "", "cannot infer the size of 'W'", 7),
    ("h = tanh(W @ x)", "params:\n  W: {shape: [hidden + input, input]}\n",
     "'W' is declared with rows (hidden + input): cut it into parts, as in [a, b] = W @ x", 12),
])
def test_misuse_is_a_located_error(equations, extra, message, column):
    with pytest.raises(rnndsl.SpecError) as info:
        cell(equations, extra)
    assert message in info.value.message
    assert info.value.pos.column == column, info.value.message


@pytest.mark.parametrize("shape, message, column", [
    ("[hidden, hidden + inptu]", "unknown size 'inptu' (did you mean 'input'?)", 23),
    ("[hidden, hidden +]", "'' in the shape of 'W' is not a size name or a number", 23),
    ("[hidden, hidden + 0]", "a size that is a number is 1 to 64", 23),
    ("[hidden, 65]", "a size that is a number is 1 to 64", 23),
])
def test_bad_sum_of_sizes_is_a_located_error(shape, message, column):
    with pytest.raises(rnndsl.SpecError) as info:
        cell("h = tanh(W @ [h_prev, x])", f"params:\n  W: {{shape: {shape}}}\n")
    assert message in info.value.message
    assert (info.value.pos.line, info.value.pos.column) == (6, column)


def test_training_checkpoints_keep_the_whole_matrix(tmp_path):
    from rnndsl.training.train import TrainConfig, train

    opts = dict(spec="lstm_concat", task="adding", length=6, hidden=4, batch=4, log_every=2,
                eval_batch=8, dtype="float64")
    whole = train(TrainConfig(steps=4, **opts))
    assert whole.params["layer0.fwd.W_f"].shape == (4, 4 + 2)  # the adding task's input is 2
    ckpt = tmp_path / "half.npz"
    train(TrainConfig(steps=2, **opts), save=ckpt)
    resumed = train(TrainConfig(steps=4, **opts), resume=ckpt)
    for k, v in whole.params.items():
        np.testing.assert_array_equal(resumed.params[k], v, err_msg=k)
