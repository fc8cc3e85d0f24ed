"""The built-in cells with matrix-valued states against independent PyTorch implementations
written from the papers' equations (the NTM's is rnndsl.eager_ntm, the eager module a user
writes): outputs, final states, and the gradients of every
parameter, the inputs and the initial states by autograd, float64, to 1e-9 relative."""
import math

import numpy as np
import pytest

import rnndsl

from engines import WEIGHTINGS, as_weightings, long_checks

torch = pytest.importorskip("torch")


def fast_weights(p, x, state0, lengths):
    """Ba et al. 2016, one inner step: A(t) = lam A(t-1) + eta h(t) h(t)^T, then
    h(t+1) = ReLU(LN(z + A(t) ReLU(z))) with z = W h(t) + C x(t)."""
    lam, eta = 0.95, 0.5
    h, A = state0["h"], state0["A"]
    outs = []
    for t in range(x.shape[0]):
        A_new = lam * A + eta * h[:, :, None] * h[:, None, :]
        z = h @ p["W_recurrent"].T + x[t] @ p["W_input"].T + p["bias"]
        u = z + torch.einsum("bij,bj->bi", A_new, torch.relu(z))
        mu = u.mean(-1, keepdim=True)
        sd = torch.sqrt(((u - mu) ** 2).mean(-1, keepdim=True) + 1e-5)
        h_new = torch.relu(p["ln_gain"] * (u - mu) / sd + p["ln_shift"])
        live = torch.as_tensor(t < lengths)
        h = torch.where(live[:, None], h_new, h)
        A = torch.where(live[:, None, None], A_new, A)
        outs.append(torch.where(live[:, None], h_new, torch.zeros_like(h_new)))
    return {"h": torch.stack(outs)}, {"h": h, "A": A}


def delta_net(p, x, state0, lengths):
    """Schlag et al. 2021: W_t = W_{t-1} + beta_t (v_t - W_{t-1} k_t) k_t^T, y_t = W_t q_t,
    keys and queries of unit length (F.normalize), beta_t = sigmoid(w . x_t + b)."""
    W = state0["W"]
    outs = []
    for t in range(x.shape[0]):
        k = torch.nn.functional.normalize(x[t] @ p["W_key"].T, dim=-1)
        q = torch.nn.functional.normalize(x[t] @ p["W_query"].T, dim=-1)
        v = x[t] @ p["W_value"].T
        beta = torch.sigmoid(x[t] @ p["w_beta"] + p["b_beta"])[:, None, None]
        retrieved = torch.einsum("bij,bj->bi", W, k)
        W_new = W + beta * (v - retrieved)[:, :, None] * k[:, None, :]
        y = torch.einsum("bij,bj->bi", W_new, q)
        live = torch.as_tensor(t < lengths)
        W = torch.where(live[:, None, None], W_new, W)
        outs.append(torch.where(live[:, None], y, torch.zeros_like(y)))
    return {"y": torch.stack(outs)}, {"W": W}


def ntm(p, x, state0, lengths):
    """The eager PyTorch NTM of rnndsl.eager_ntm (nn.LSTMCell, nn.Linear heads), run on
    rnndsl's parameters through torch.func.functional_call."""
    from rnndsl.eager_ntm import EagerNTM

    sizes = {"input": x.shape[-1], "hidden": p["W_output"].shape[0],
             "slots": state0["M"].shape[1], "width": state0["M"].shape[2]}
    module = EagerNTM(*sizes.values(), dtype=torch.float64)
    y, final = torch.func.functional_call(module, module.stacked(p), (x, state0, lengths))
    return {"y": y}, final


def mlstm(p, x, state0, lengths):
    """Beck et al. 2024, the stabilised recurrent mLSTM with the heads as a dimension of the
    arrays: C (B, H, value, key), n (B, H, key), m (B, H)."""
    heads = (1, 2)
    stack = lambda name: torch.stack([p[f"{name}_{j}"] for j in heads])  # noqa: E731
    C = torch.stack([state0[f"C_{j}"] for j in heads], 1)
    n = torch.stack([state0[f"n_{j}"] for j in heads], 1)
    m = torch.cat([state0[f"m_{j}"] for j in heads], 1)
    project = lambda name, xt: torch.einsum("hoi,bi->bho", stack(f"W_{name}"), xt) + \
        stack(f"b_{name}")  # noqa: E731
    outs = []
    for t in range(x.shape[0]):
        xt = x[t]
        q = project("query", xt)
        k = torch.einsum("hoi,bi->bho", stack("W_key"), xt) / math.sqrt(C.shape[-1]) + \
            stack("b_key")
        v = project("value", xt)
        i_tilde = xt @ stack("w_input").T + stack("b_input")
        log_f = torch.nn.functional.logsigmoid(xt @ stack("w_forget").T + stack("b_forget"))
        m_new = torch.maximum(log_f + m, i_tilde)
        i = torch.exp(i_tilde - m_new)[..., None]
        f = torch.exp(log_f + m - m_new)[..., None]
        C_new = f[..., None] * C + i[..., None] * v[..., :, None] * k[..., None, :]
        n_new = f * n + i * k
        o = torch.sigmoid(project("output_gate", xt))
        numerator = torch.einsum("bhvk,bhk->bhv", C_new, q)
        denominator = torch.maximum((n_new * q).sum(-1).abs(), torch.exp(-m_new))
        h = o * numerator / denominator[..., None]
        y = h.reshape(h.shape[0], -1) @ p["W_output"].T
        live = torch.as_tensor(t < lengths)
        C = torch.where(live[:, None, None, None], C_new, C)
        n = torch.where(live[:, None, None], n_new, n)
        m = torch.where(live[:, None], m_new, m)
        outs.append(torch.where(live[:, None], y, torch.zeros_like(y)))
    finals = {}
    for j in heads:
        finals |= {f"C_{j}": C[:, j - 1], f"n_{j}": n[:, j - 1], f"m_{j}": m[:, j - 1:j]}
    return {"y": torch.stack(outs)}, finals


def slstm(p, x, state0, lengths):
    """Beck et al. 2024, the stabilised sLSTM with the heads as an array axis: each recurrent
    matrix is its diagonal blocks R[j] (heads, head size, head size), h_prev split by head.
    The parameters' off-diagonal entries are random (the test perturbs every entry), so a
    match also shows that rnndsl uses the diagonal blocks alone."""
    heads = 4
    h, c, n, m = (state0[k] for k in "hcnm")
    B, hidden = h.shape
    size = hidden // heads
    blocks = {g: torch.stack([p[f"R_{g}"][j * size:(j + 1) * size, j * size:(j + 1) * size]
                              for j in range(heads)]) for g in "zifo"}
    outs = []
    for t in range(x.shape[0]):
        by_head = h.reshape(B, heads, size)
        pre = {g: x[t] @ p[f"W_{g}"].T + p[f"b_{g}"] +
               torch.einsum("jab,Bjb->Bja", blocks[g], by_head).reshape(B, hidden)
               for g in "zifo"}
        log_f = torch.nn.functional.logsigmoid(pre["f"])
        m_new = torch.maximum(log_f + m, pre["i"])
        i = torch.exp(pre["i"] - m_new)
        f = torch.exp(log_f + m - m_new)
        c_new = f * c + i * torch.tanh(pre["z"])
        n_new = f * n + i
        h_new = torch.sigmoid(pre["o"]) * c_new / n_new
        live = torch.as_tensor(t < lengths)[:, None]
        h, c, n, m = (torch.where(live, new, old) for new, old in
                      ((h_new, h), (c_new, c), (n_new, n), (m_new, m)))
        outs.append(torch.where(live, h_new, torch.zeros_like(h_new)))
    return {"h": torch.stack(outs)}, {"h": h, "c": c, "n": n, "m": m}


CELLS = {"fast_weights": (fast_weights, {"input": 3, "hidden": 5}),
         "delta_net": (delta_net, {"input": 3, "key": 4, "value": 5}),
         "ntm": (ntm, {"input": 3, "hidden": 5, "slots": 6, "width": 4}),
         "mlstm": (mlstm, {"input": 3, "hidden": 5, "key": 4, "value": 6}),
         "slstm": (slstm, {"input": 3, "hidden": 8})}


def relative(a, b) -> float:
    return float(np.abs(np.asarray(a) - b).max() / max(np.abs(b).max(), 1e-300))


LENGTHS = pytest.mark.parametrize("lengths", [None, [6, 3, 1, 0]], ids=["full", "lengths"])


@LENGTHS
@pytest.mark.parametrize("name", sorted(CELLS))
def test_cell_matches_pytorch_autograd(name, lengths):
    assert_matches_pytorch(name, lengths)


@LENGTHS
def test_slstm_on_the_cpu_target_matches_pytorch_autograd(lengths):
    """The kernels that multiply by the diagonal blocks alone (the model's parameters are
    random off the blocks)."""
    assert_matches_pytorch("slstm", lengths, target="cpu")


@LENGTHS
def test_ntm_from_zero_weightings_matches_pytorch_autograd(lengths):
    """Zero initial weightings, as in the default state0: the learned start weightings are all
    that the heads interpolate with at the first step. The memory stays random: at a zero
    memory the gradient of the cosine similarity is that of its 0 / 0 guard, which rnndsl and
    torch.nn.functional.cosine_similarity place differently (the forward pass from all-zero
    states is test_eager_ntm_loads_the_specs_parameters)."""
    assert_matches_pytorch("ntm", lengths, zero_weightings=True)


def assert_matches_pytorch(name, lengths, zero_weightings=False, target="reference"):
    """Outputs, final states and every gradient of rnndsl (its reference, or `target`) and the
    PyTorch model agree to 1e-9, from random initial states (engines.as_weightings's, or zero
    weightings)."""
    model, sizes = CELLS[name]
    cell = rnndsl.compile(name, target=target)
    rng = np.random.default_rng(7)
    T, B = 6, 4
    params = {k: v + 0.3 * rng.standard_normal(v.shape) for k, v in
              cell.init_params(seed=3, dtype=np.float64, **sizes).items()}
    x = rng.standard_normal((T, B, sizes["input"]))
    state0 = {s: 0.5 * rng.standard_normal((B, *(tuple(sizes[d] for d in shape) or (1,))))
              for s, shape in ((s, (n,) if isinstance(n, str) else n)
                               for s, n in cell.states.items())}  # a scalar state: (B, 1)
    state0 = as_weightings(cell, state0)
    for s in WEIGHTINGS.get(name, ()) if zero_weightings else ():
        state0[s] = np.zeros_like(state0[s])
    steps = np.full(B, T) if lengths is None else np.array(lengths)

    fwd = cell.forward(params, x, state0, lengths)
    d_out = {o: rng.standard_normal(v.shape) for o, v in fwd.outputs.items()}
    d_fin = {s: rng.standard_normal(v.shape) for s, v in fwd.states.items()}
    grads = cell.backward(params, fwd, d_out, d_fin)

    leaf = lambda a: torch.tensor(a, dtype=torch.float64, requires_grad=True)  # noqa: E731
    tp, tx, ts = ({k: leaf(v) for k, v in params.items()}, leaf(x),
                  {k: leaf(v) for k, v in state0.items()})
    outs, finals = model(tp, tx, ts, steps)
    loss = sum((outs[o] * torch.from_numpy(g)).sum() for o, g in d_out.items()) + \
        sum((finals[s] * torch.from_numpy(g)).sum() for s, g in d_fin.items())
    loss.backward()

    errors = {f"output {o}": relative(fwd.outputs[o], outs[o].detach().numpy()) for o in outs}
    errors |= {f"state {s}": relative(fwd.states[s], finals[s].detach().numpy())
               for s in finals}
    errors |= {f"d {k}": relative(grads.params[k], v.grad.numpy()) for k, v in tp.items()}
    errors["d x"] = relative(grads.inputs["x"], tx.grad.numpy())
    errors |= {f"d {s}0": relative(grads.state0[s], v.grad.numpy()) for s, v in ts.items()}
    assert max(errors.values()) < 1e-9, {k: e for k, e in errors.items() if not e < 1e-9}
    assert len(errors) == len(outs) + len(finals) + len(params) + 1 + len(state0)


def test_eager_ntm_loads_the_specs_parameters():
    """The eager module with the spec's parameters copied in (as a benchmark would) computes
    what the built-in ntm computes, from zero states."""
    from rnndsl.eager_ntm import EagerNTM

    cell = rnndsl.compile("ntm", target="reference")
    sizes = {"input": 3, "hidden": 5, "slots": 6, "width": 4}
    params = cell.init_params(seed=1, dtype=np.float64, **sizes)
    x = np.random.default_rng(0).standard_normal((5, 2, 3))
    want = cell.forward(params, x, sizes=sizes)
    module = EagerNTM(*sizes.values(), dtype=torch.float64)
    module.load_rnndsl(params)
    with torch.no_grad():
        y, final = module(torch.from_numpy(x))
    assert relative(want.outputs["y"], y.numpy()) < 1e-12
    assert relative(want.states["M"], final["M"].numpy()) < 1e-12


@pytest.mark.skipif(not long_checks(), reason="compiles the NTM's float32 kernels (minutes): "
                                              "run with --long")
def test_the_ntm_benchmark_runs_at_a_tiny_size(capsys):
    """benchmarks/ntm_bench.py: its agreement check passes and it prints the machine and the
    ratio (the figures themselves are in the README)."""
    import runpy
    from pathlib import Path

    bench = runpy.run_path(str(Path(__file__).resolve().parent.parent / "benchmarks" /
                               "ntm_bench.py"))
    mine, theirs = bench["main"](["-B", "3", "-T", "4", "--slots", "5", "--width", "3",
                                  "--hidden", "4", "--input", "2", "--repeats", "1"])
    assert mine > 0 and theirs > 0
    shown = capsys.readouterr().out
    assert "load average" in shown and "loss and every gradient agree to" in shown
    assert "ratio" in shown


def test_the_ntm_benchmark_fails_when_the_two_disagree(monkeypatch):
    import runpy
    from pathlib import Path

    bench = runpy.run_path(str(Path(__file__).resolve().parent.parent / "benchmarks" /
                               "ntm_bench.py"))
    problem = bench["Problem"]({"input": 2, "hidden": 4, "slots": 5, "width": 3}, 3, 2)
    spec = rnndsl.compiler.builtin_specs()["ntm"].read_text()
    assert "h = sigmoid(o) * tanh(c)" in spec
    problem.cell = rnndsl.compile(spec.replace("h = sigmoid(o) * tanh(c)",
                                               "h = sigmoid(o) * tanh(0.9 * c)"),
                                  target="reference")
    with pytest.raises(SystemExit, match="rnndsl and the eager NTM disagree"):
        bench["check"](problem, 1e-3)
