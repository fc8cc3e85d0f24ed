"""Elman, LSTM and GRU specs against torch.nn.RNN / LSTM / GRU with copied weights, float64.

torch is the independent oracle: the weights are drawn by rnndsl, copied into the torch
module's stacked gate blocks, and outputs, final states and every gradient (parameters,
input, initial states) must agree to 1e-10. With `lengths`, each sequence is run alone in
torch for its own length, since rnndsl freezes the states and zeroes the outputs of padding.
"""
import numpy as np
import pytest

import rnndsl

torch = pytest.importorskip("torch")

T, B, I, H = 5, 3, 4, 3
TOL = 1e-10

# spec -> (torch module factory, gate blocks of weight_ih/weight_hh/bias_ih/bias_hh in order)
CASES = {
    "elman": (lambda: torch.nn.RNN(I, H, nonlinearity="tanh"), [""]),
    "elman_relu": (lambda: torch.nn.RNN(I, H, nonlinearity="relu"), [""]),
    "lstm": (lambda: torch.nn.LSTM(I, H), ["i", "f", "g", "o"]),
    "gru": (lambda: torch.nn.GRU(I, H), ["r", "z", "n"]),
}
# how the specs name a gate block of torch's stacked parameters: torch's names, gate letter
# appended (W_ii, W_hf, b_hn, ...); Elman has one block, named W_ih, W_hh, b_ih, b_hh
NAMES = {"weight_ih_l0": "W_i", "weight_hh_l0": "W_h", "bias_ih_l0": "b_i", "bias_hh_l0": "b_h"}


def _block_names(torch_name, gates):
    base = NAMES[torch_name]
    return [base + "h"] if gates == [""] else [base + g for g in gates]


def _stacked(params, torch_name, gates):
    return np.concatenate([params[n] for n in _block_names(torch_name, gates)], axis=0)


def _torch_module(spec, params):
    factory, gates = CASES[spec]
    torch.manual_seed(0)
    mod = factory().double()
    with torch.no_grad():
        for name, p in mod.named_parameters():
            p.copy_(torch.from_numpy(_stacked(params, name, gates)))
    return mod, gates


def _torch_grads_as_spec(mod, gates):
    """torch's stacked parameter gradients split back into the spec's gate blocks."""
    out = {}
    for name, p in mod.named_parameters():
        names = _block_names(name, gates)
        out.update(zip(names, np.split(p.grad.numpy(), len(names), axis=0)))
    return out


def _run_torch(mod, is_lstm, x, state0, r, s, lengths):
    """Loss sum(r * outputs) + sum(s * final states), each sequence alone for its length."""
    x_t = torch.from_numpy(x).requires_grad_()
    s0 = {k: torch.from_numpy(v).requires_grad_() for k, v in state0.items()}
    outs = torch.zeros(x.shape[:2] + (H,), dtype=torch.float64)
    finals = {k: [None] * B for k in state0}
    loss = 0.0
    for b in range(B):
        L = int(lengths[b])
        h0 = s0["h"][b:b + 1].unsqueeze(0)
        hx = (h0, s0["c"][b:b + 1].unsqueeze(0)) if is_lstm else h0
        y, st = mod(x_t[:L, b:b + 1], hx)
        st = {"h": st[0], "c": st[1]} if is_lstm else {"h": st}
        for k in finals:
            finals[k][b] = st[k][0, 0]
            loss = loss + (torch.from_numpy(s[k][b]) * st[k][0, 0]).sum()
        loss = loss + (torch.from_numpy(r[:L, b]) * y[:, 0]).sum()
        outs[:L, b] = y[:, 0].detach()
    loss.backward()
    return (outs.numpy(), {k: torch.stack(v).detach().numpy() for k, v in finals.items()},
            x_t.grad.numpy(), {k: v.grad.numpy() for k, v in s0.items()})


@pytest.mark.parametrize("with_lengths", [False, True], ids=["full", "lengths"])
@pytest.mark.parametrize("spec", list(CASES))
def test_matches_torch(spec, with_lengths):
    cell = rnndsl.compile(spec)
    rng = np.random.default_rng(1)
    params = cell.init_params(input=I, hidden=H, seed=2, dtype=np.float64)
    x = rng.standard_normal((T, B, I))
    state0 = {k: 0.5 * rng.standard_normal((B, H)) for k in cell.states}
    lengths = np.array([T, 2, 4]) if with_lengths else np.full(B, T)
    r = rng.standard_normal((T, B, H))
    s = {k: rng.standard_normal((B, H)) for k in cell.states}

    fwd = cell.forward(params, x, state0, lengths if with_lengths else None)
    grads = cell.backward(params, fwd, r, s)

    mod, gates = _torch_module(spec, params)
    out_t, finals_t, dx_t, ds0_t = _run_torch(mod, spec == "lstm", x, state0, r, s, lengths)
    dparams_t = _torch_grads_as_spec(mod, gates)

    np.testing.assert_allclose(fwd.output, out_t, rtol=0, atol=TOL)
    for k in cell.states:
        np.testing.assert_allclose(fwd.states[k], finals_t[k], rtol=0, atol=TOL)
        np.testing.assert_allclose(grads.state0[k], ds0_t[k], rtol=0, atol=TOL)
    np.testing.assert_allclose(grads.inputs["x"], dx_t, rtol=0, atol=TOL)
    assert set(grads.params) == set(dparams_t)
    for p, g in dparams_t.items():
        np.testing.assert_allclose(grads.params[p], g, rtol=0, atol=TOL, err_msg=p)
    if with_lengths:  # padding: outputs are zero and no gradient reaches the padded inputs
        assert not fwd.output[2:, 1].any() and not grads.inputs["x"][2:, 1].any()
