"""Networks of cells (rnndsl.training.layers): gradients against finite differences, outputs and
gradients against torch.nn.LSTM / GRU / RNN, padding against sequences run alone, each
connection pattern against the same network composed by hand from single cell runs."""
import numpy as np
import pytest

import rnndsl
from rnndsl.training.layers import Network

from engines import SLOTS_SHOWN_BY_STATES_ONLY

T, B, I, H = 5, 3, 3, 4
LENGTHS = [5, 2, 0]  # full, short, and empty


@pytest.fixture(scope="module")
def cells():
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = rnndsl.compile(name)
        return cache[name]
    return get


def data(net, seed=0, lengths=LENGTHS):
    rng = np.random.default_rng(seed)
    params = {k: v + 0.1 * rng.standard_normal(v.shape)  # off the init, so no symmetry hides
              for k, v in net.init_params(seed=seed, dtype=np.float64).items()}
    x = rng.standard_normal((T, len(lengths), net.input_size))
    return params, x


def padding(lengths, T=T):
    """(T, B) True on the steps past each sequence's length."""
    return np.arange(T)[:, None] >= np.asarray(lengths)


def test_the_network_tells_the_cell_a_size_no_array_shows(cells):
    """A memory's slots that no parameter shows (and the states start at zero): the network
    passes its sizes to the cell."""
    net = Network(rnndsl.compile(SLOTS_SHOWN_BY_STATES_ONLY), I, H, 1, None, False, None,
                  {"slots": 5})
    params, x = data(net)
    y, tape = net.forward(params, x, LENGTHS)
    assert y.shape == (T, B, net.output_size) and not y[padding(LENGTHS)].any()
    assert np.isfinite(y).all()


# -- finite differences -------------------------------------------------------------------------
CONFIGS = [  # spec, layers, bidirectional, residual, dense, extra sizes
    ("lstm", 2, None, True, None, None),
    ("lstm", 2, "concat", True, None, None),
    ("lstm", 3, "separate", True, None, None),
    ("lstm", 3, "alternate", True, None, None),
    ("lstm", 3, "concat", True, "add", None),
    ("lstm", 3, "alternate", True, "concat", None),
    ("gru", 3, "separate", True, "add", None),
    ("elman", 2, "alternate", False, "concat", None),
    ("jordan", 2, "concat", True, None, {"output": 2}),
]


@pytest.mark.parametrize("spec,layers,bidirectional,residual,dense,sizes", CONFIGS)
def test_gradients_match_finite_differences(cells, spec, layers, bidirectional, residual, dense,
                                            sizes):
    net = Network(cells(spec), I, H, layers, bidirectional, residual, dense, sizes)
    params, x = data(net)
    rng = np.random.default_rng(1)
    y, tape = net.forward(params, x, LENGTHS)
    assert y.shape == (T, B, net.output_size)
    assert not y[padding(LENGTHS)].any()
    R = rng.standard_normal(y.shape)  # nonzero on the padding too: none of it may leak

    def loss():
        return float((net.forward(params, x, LENGTHS, save=False)[0] * R).sum())

    grads, dx = net.backward(params, tape, R)
    assert list(grads) == list(params)
    eps = 1e-5  # central differences: error ~eps^2 from truncation, ~1e-16/eps from rounding
    for name, arr, derived in [*((k, v, grads[k]) for k, v in params.items()), ("x", x, dx)]:
        assert derived.shape == arr.shape, name
        flat = arr.reshape(-1)
        picks = rng.choice(flat.size, size=min(3, flat.size), replace=False)
        for k in picks:
            keep = flat[k]
            flat[k] = keep + eps
            up = loss()
            flat[k] = keep - eps
            down = loss()
            flat[k] = keep
            numeric = (up - down) / (2 * eps)
            scale = max(np.abs(derived).max(), 1e-12)
            assert abs(derived.reshape(-1)[k] - numeric) / scale < 1e-6, (name, k)
    assert not dx[padding(LENGTHS)].any()


@pytest.mark.parametrize("spec,layers,bidirectional,residual,dense,sizes", CONFIGS)
def test_without_the_input_gradient_the_rest_is_the_same(cells, spec, layers, bidirectional,
                                                        residual, dense, sizes):
    """input_grads=False (training: the input is data) gives the parameters' gradients of the
    full pass above, to the bit, and no dL/dx."""
    net = Network(cells(spec), I, H, layers, bidirectional, residual, dense, sizes)
    params, x = data(net)
    y, tape = net.forward(params, x, LENGTHS)
    R = np.random.default_rng(1).standard_normal(y.shape)
    full, dx = net.backward(params, tape, R)
    part, none = net.backward(params, tape, R, input_grads=False)
    assert dx is not None and none is None and list(part) == list(full)
    for k in full:
        np.testing.assert_array_equal(part[k], full[k], err_msg=k)


# -- against torch ------------------------------------------------------------------------------
TORCH = {"lstm": ("LSTM", "ifgo"), "gru": ("GRU", "rzn"), "elman": ("RNN", "h")}


@pytest.mark.parametrize("spec", list(TORCH))
def test_matches_torch_bidirectional_two_layers(cells, spec):
    torch = pytest.importorskip("torch")
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

    module_name, gates = TORCH[spec]
    torch.manual_seed(0)
    module = getattr(torch.nn, module_name)(I, H, num_layers=2, bidirectional=True,
                                            dtype=torch.float64)
    net = Network(cells(spec), I, H, layers=2, bidirectional="concat")
    lengths = [3, 5, 1]  # unsorted

    # torch keeps each layer's gates stacked in one matrix; the spec names them one by one
    def blocks(tensors):
        out = {}
        for layer in range(2):
            for direction, suffix in (("fwd", ""), ("bwd", "_reverse")):
                for torch_name, prefix in (("weight_ih", "W_i"), ("weight_hh", "W_h"),
                                           ("bias_ih", "b_i"), ("bias_hh", "b_h")):
                    stacked = tensors[f"{torch_name}_l{layer}{suffix}"]
                    for gate, block in zip(gates, np.split(stacked, len(gates))):
                        out[f"layer{layer}.{direction}.{prefix}{gate}"] = block
        return out

    params = blocks({k: v.detach().numpy().copy() for k, v in module.named_parameters()})
    assert set(params) == set(net.param_shapes())
    rng = np.random.default_rng(0)
    x = rng.standard_normal((T, 3, I))
    R = rng.standard_normal((T, 3, 2 * H))

    xt = torch.tensor(x, requires_grad=True)
    packed = pack_padded_sequence(xt, torch.tensor(lengths), enforce_sorted=False)
    out, _ = module(packed)
    yt, _ = pad_packed_sequence(out, total_length=T)
    (yt * torch.tensor(R)).sum().backward()
    expected = blocks({k: v.grad.numpy() for k, v in module.named_parameters()})

    y, tape = net.forward(params, x, lengths)
    grads, dx = net.backward(params, tape, R)
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-8, atol=1e-12)
    for name, g in expected.items():
        np.testing.assert_allclose(grads[name], g, rtol=1e-8, atol=1e-12, err_msg=name)


# -- padding ------------------------------------------------------------------------------------
@pytest.mark.parametrize("bidirectional,residual,dense", [
    ("concat", True, "add"), ("alternate", True, "concat"), ("separate", False, None)])
def test_padded_batch_equals_sequences_run_alone(cells, bidirectional, residual, dense):
    net = Network(cells("lstm"), I, H, 2, bidirectional, residual, dense)
    lengths = [5, 2, 4]
    params, x = data(net, lengths=lengths)
    R = np.random.default_rng(2).standard_normal((T, 3, net.output_size))
    y, tape = net.forward(params, x, lengths)
    grads, dx = net.backward(params, tape, R)
    assert not y[padding(lengths)].any() and not dx[padding(lengths)].any()
    summed = {k: np.zeros_like(v) for k, v in params.items()}
    for b, n in enumerate(lengths):
        y_b, tape_b = net.forward(params, x[:n, b:b + 1])
        g_b, dx_b = net.backward(params, tape_b, R[:n, b:b + 1])
        np.testing.assert_allclose(y[:n, b:b + 1], y_b, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(dx[:n, b:b + 1], dx_b, rtol=1e-12, atol=1e-14)
        for k in summed:
            summed[k] += g_b[k]
    for k, g in grads.items():
        np.testing.assert_allclose(g, summed[k], rtol=1e-10, atol=1e-13, err_msg=k)


# -- each connection pattern, composed by hand --------------------------------------------------
def reversed_within(a, lengths):
    """Each sequence's own steps reversed, one sequence at a time."""
    out = a.copy()
    for b, n in enumerate(lengths):
        out[:n, b] = a[:n, b][::-1]
    return out


class ByHand:
    """Single cell runs, named as the network names its parameters."""

    def __init__(self, cell, params, lengths):
        self.cell, self.params, self.lengths = cell, params, lengths

    def run(self, layer, direction, u):
        own = {p: self.params[f"layer{layer}.{direction}.{p}"] for p in self.cell.params}
        if direction == "fwd":
            return self.cell.forward(own, u, lengths=self.lengths).output
        flip = reversed_within(u, self.lengths)
        return reversed_within(self.cell.forward(own, flip, lengths=self.lengths).output,
                               self.lengths)

    def both(self, layer, u):
        return np.concatenate([self.run(layer, "fwd", u), self.run(layer, "bwd", u)], axis=2)

    def lin(self, name, a):
        return a @ self.params[name].T


def compare(net, expected_fn, lengths=(5, 3, 4)):
    params, x = data(net, lengths=lengths)
    x[padding(lengths)] = 0.0  # the network ignores padding: so does the hand-made version
    hand = ByHand(net.cell, params, list(lengths))
    y, _ = net.forward(params, x, list(lengths))
    np.testing.assert_allclose(y, expected_fn(hand, x), rtol=1e-12, atol=1e-14)


def test_concat_mode_with_residual(cells):
    net = Network(cells("lstm"), I, H, 2, "concat", residual=True)
    assert net.output_size == 2 * H
    assert net.param_shapes()["layer0.proj"] == (2 * H, I)  # widths differ at layer 0 only
    assert "layer1.proj" not in net.param_shapes()

    def expected(h, x):
        y0 = h.both(0, x) + h.lin("layer0.proj", x)
        return h.both(1, y0) + y0
    compare(net, expected)


def test_separate_mode_never_mixes_the_directions(cells):
    net = Network(cells("gru"), I, H, 3, "separate")

    def expected(h, x):
        f = b = x
        for layer in range(3):
            f, b = h.run(layer, "fwd", f), h.run(layer, "bwd", b)
        return np.concatenate([f, b], axis=2)
    compare(net, expected)


def test_alternate_mode_swaps_the_directions(cells):
    net = Network(cells("gru"), I, H, 3, "alternate", residual=True)
    shapes = net.param_shapes()
    assert shapes["layer0.proj.fwd"] == shapes["layer0.proj.bwd"] == (H, I)

    def expected(h, x):
        f = h.run(0, "fwd", x) + h.lin("layer0.proj.fwd", x)
        b = h.run(0, "bwd", x) + h.lin("layer0.proj.bwd", x)
        for layer in (1, 2):
            f, b = h.run(layer, "fwd", b) + b, h.run(layer, "bwd", f) + f
        return np.concatenate([f, b], axis=2)
    compare(net, expected)


def test_dense_concat_reads_the_input_and_every_lower_layer(cells):
    net = Network(cells("elman"), I, H, 3, None, dense="concat")
    assert net.param_shapes()["layer2.fwd.W_ih"] == (H, I + 2 * H)

    def expected(h, x):
        y0 = h.run(0, "fwd", x)
        y1 = h.run(1, "fwd", np.concatenate([x, y0], axis=2))
        return h.run(2, "fwd", np.concatenate([x, y0, y1], axis=2))
    compare(net, expected)


def test_dense_add_follows_the_alternating_path(cells):
    net = Network(cells("elman"), I, H, 3, "alternate", dense="add")

    def expected(h, x):
        f0, b0 = h.run(0, "fwd", x), h.run(0, "bwd", x)
        f1 = h.run(1, "fwd", h.lin("layer1.xproj.fwd", x) + b0)
        b1 = h.run(1, "bwd", h.lin("layer1.xproj.bwd", x) + f0)
        f2 = h.run(2, "fwd", h.lin("layer2.xproj.fwd", x) + f0 + b1)
        b2 = h.run(2, "bwd", h.lin("layer2.xproj.bwd", x) + b0 + f1)
        return np.concatenate([f2, b2], axis=2)
    compare(net, expected)


def test_dense_add_with_residual_in_concat_mode(cells):
    net = Network(cells("lstm"), 2 * H, H, 3, "concat", residual=True, dense="add")
    assert not any("proj" in k for k in net.param_shapes())  # every width is 2H already

    def expected(h, x):
        y0 = h.both(0, x) + x
        u1 = x + y0
        y1 = h.both(1, u1) + u1
        u2 = x + y0 + y1
        return h.both(2, u2) + u2
    compare(net, expected)


def test_inference_without_tape(cells):
    net = Network(cells("lstm"), I, H, 2, "concat")
    params, x = data(net)
    y, tape = net.forward(params, x, LENGTHS)
    y2, none = net.forward(params, x, LENGTHS, save=False)
    assert none is None
    np.testing.assert_array_equal(y, y2)
    with pytest.raises(ValueError, match="save=False"):
        net.backward(params, none, y)


# -- parameters ---------------------------------------------------------------------------------
def test_init_params(cells):
    net = Network(cells("lstm"), I, H, 2, "concat", residual=True)
    params = net.init_params(seed=3)
    assert {k: v.shape for k, v in params.items()} == net.param_shapes()
    assert all(v.dtype == np.float32 for v in params.values())
    again = net.init_params(seed=3)
    assert all(np.array_equal(params[k], again[k]) for k in params)
    assert not np.array_equal(params["layer0.fwd.W_hi"], params["layer0.bwd.W_hi"])
    assert not np.array_equal(params["layer0.fwd.W_hi"], net.init_params(seed=4)["layer0.fwd.W_hi"])
    proj = params["layer0.proj"]
    assert np.abs(proj).max() <= 1 / np.sqrt(I) and proj.std() > 0

    ortho = net.init_params(seed=3, dtype=np.float64, orthogonal=True)
    for k, v in ortho.items():
        if k.split(".")[-1].startswith("W_h"):  # the (hidden, hidden) matrices times h_prev
            np.testing.assert_allclose(v @ v.T, np.eye(H), atol=1e-12, err_msg=k)
        else:
            np.testing.assert_allclose(v, params[k], rtol=1e-6, err_msg=k)  # as without


# -- bad configurations -------------------------------------------------------------------------
TWO_INPUTS = """
name: two_inputs
sizes: [input, hidden]
inputs: {x: input, z: input}
states: {h: hidden}
outputs: [h]
equations: |
  h = tanh(W @ x + V @ z + U @ h_prev)
"""


@pytest.mark.parametrize("spec,kwargs,message", [
    (TWO_INPUTS, {}, "one input sequence"),
    ("lstm", {"bidirectional": True}, "bidirectional must be one of"),
    ("lstm", {"bidirectional": "both"}, "bidirectional must be one of"),
    ("lstm", {"dense": "sum"}, "dense must be one of"),
    ("lstm", {"layers": 0}, "at least 1"),
    ("jordan", {}, r"needs the size\(s\) output"),
    ("lstm", {"sizes": {"hidden": 5}}, "set by input_size and hidden"),
])
def test_bad_configuration(cells, spec, kwargs, message):
    with pytest.raises(ValueError, match=message):
        Network(cells(spec), I, H, **kwargs)


def test_bad_arrays(cells):
    net = Network(cells("lstm"), I, H, 2, "separate", residual=True)
    params, x = data(net)
    with pytest.raises(ValueError, match="missing .*layer1.bwd.W_hi"):
        net.forward({k: v for k, v in params.items() if k != "layer1.bwd.W_hi"}, x)
    with pytest.raises(ValueError, match="'layer0.proj.fwd' must have shape"):
        net.forward({**params, "layer0.proj.fwd": np.zeros((2, 2))}, x)
    with pytest.raises(ValueError, match=r"x must be \(T, B, 3\)"):
        net.forward(params, x[..., :2])
    y, tape = net.forward(params, x)
    with pytest.raises(ValueError, match="dy must be"):
        net.backward(params, tape, y[..., :H])


# -- initial and final states (Network.run, Network.backward_states) ---------------------------
@pytest.mark.parametrize("spec,bidirectional,residual", [("lstm", None, True),
                                                         ("gru", "concat", False)])
def test_state_gradients_match_finite_differences(cells, spec, bidirectional, residual):
    """A loss on the outputs and on every final state, differentiated w.r.t. the initial
    states of every cell: what an encoder-decoder backpropagates through."""
    net = Network(cells(spec), I, H, 2, bidirectional, residual)
    params, x = data(net)
    rng = np.random.default_rng(2)
    keys = net.cell_keys()
    state0 = {k: {s: rng.standard_normal((B, H)) for s in net.cell.states} for k in keys}
    R = rng.standard_normal((T, B, net.output_size))
    S = {k: {s: rng.standard_normal((B, H)) for s in net.cell.states} for k in keys}

    def loss():
        run = net.run(params, x, LENGTHS, state0, save=False)
        return float((run.y * R).sum() + sum((run.states[k][s] * S[k][s]).sum()
                                             for k in keys for s in S[k]))

    run = net.run(params, x, LENGTHS, state0)
    assert set(run.states) == set(keys)
    _, _, d_state0 = net.backward_states(params, run.tape, R, S)
    eps = 1e-6
    for k in keys:
        for s, arr in state0[k].items():
            for b, j in [(0, 1), (1, 3), (2, 0)]:  # b=2 has length 0: its state passes through
                keep = arr[b, j]
                arr[b, j] = keep + eps
                up = loss()
                arr[b, j] = keep - eps
                down = loss()
                arr[b, j] = keep
                numeric = (up - down) / (2 * eps)
                assert abs(d_state0[k][s][b, j] - numeric) <= 1e-6 * max(1, abs(numeric)), \
                    (k, s, b, j)


def test_one_step_at_a_time_equals_the_whole_sequence(cells):
    """Carrying the final states from one call to the next is the same as one long run: the
    way a generator steps a network."""
    net = Network(cells("lstm"), I, H, 3, None, True, "add")
    params, x = data(net, lengths=[T] * B)
    whole = net.run(params, x, save=False)
    states, ys = None, []
    for t in range(T):
        run = net.run(params, x[t:t + 1], state0=states, save=False)
        states = run.states
        ys.append(run.y)
    np.testing.assert_allclose(np.concatenate(ys), whole.y, rtol=1e-12, atol=1e-12)
    for k in net.cell_keys():
        for s in net.cell.states:
            np.testing.assert_allclose(states[k][s], whole.states[k][s], rtol=1e-12, atol=1e-12)


def test_unknown_state_keys_are_refused(cells):
    net = Network(cells("gru"), I, H)
    params, x = data(net)
    with pytest.raises(ValueError, match="state0: unknown cell"):
        net.run(params, x, state0={(1, "fwd"): {}})
    with pytest.raises(ValueError, match="state0: unknown name"):
        net.run(params, x, state0={(0, "fwd"): {"c": np.zeros((B, H))}})
