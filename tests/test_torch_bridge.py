"""The PyTorch bridge against torch's own modules, gradcheck, training, torch.compile."""
from functools import lru_cache

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence  # noqa: E402

import rnndsl  # noqa: E402
import rnndsl.torch as rt  # noqa: E402
from rnndsl.torch import RNN, cell_apply  # noqa: E402
from torch_cells import PEEPHOLE_YAML, spec  # noqa: E402

T, B, I, H = 5, 3, 4, 3
LENGTHS = [5, 2, 4]  # unsorted, one full length, so both packing orders are exercised
F64 = dict(atol=1e-10, rtol=1e-10)


def torch_module(kind, *args, **kw):
    if kind == "lstm":
        return nn.LSTM(*args, **kw)
    if kind == "gru":
        return nn.GRU(*args, **kw)
    return nn.RNN(*args, nonlinearity="tanh" if kind == "elman" else "relu", **kw)


@lru_cache(maxsize=None)
def cell(kind):
    return rnndsl.compile(kind if kind == "lstm" else spec(kind))


def grads_in_torch_layout(mine: RNN, kind: str, bias: bool, grads: dict) -> dict:
    """Our parameter gradients (by our names) stacked as the torch module's parameters."""
    return {attr: torch.cat([grads[f"{mine._name(layer, d)}.{n}"] for n in names], 0)
            for attr, names, layer, d in mine._layout(kind, bias)}


def run_both(kind, layers, bidir, batch_first, mode, bias=True, seed=0):
    torch.manual_seed(seed)
    ref = torch_module(kind, I, H, layers, bias=bias, batch_first=batch_first,
                       bidirectional=bidir).double()
    mine = RNN.from_torch(ref, spec=cell(kind))
    LD = layers * (2 if bidir else 1)
    x = torch.randn((B, T, I) if batch_first else (T, B, I), dtype=torch.float64,
                    requires_grad=True)
    hx = [torch.randn(LD, B, H, dtype=torch.float64, requires_grad=True)
          for _ in range(2 if kind == "lstm" else 1)]
    hx_arg = tuple(hx) if kind == "lstm" else hx[0]
    lengths = torch.tensor(LENGTHS)

    def run(module, ours):
        if mode == "full":
            out, hn = module(x, hx_arg)
        elif mode == "lengths" and ours:
            out, hn = module(x, hx_arg, lengths=lengths)
        else:
            packed = pack_padded_sequence(x, lengths, batch_first=batch_first,
                                          enforce_sorted=False)
            out, hn = module(packed, hx_arg)
            if mode == "packed":
                assert torch.equal(out.batch_sizes, packed.batch_sizes)
                assert torch.equal(out.sorted_indices, packed.sorted_indices)
                out = out.data
            else:
                out, _ = pad_packed_sequence(out, batch_first=batch_first, total_length=T)
        hn = list(hn) if isinstance(hn, tuple) else [hn]
        return out, hn

    results = []
    gen = torch.Generator().manual_seed(seed + 1)
    for module, ours in ((ref, False), (mine, True)):
        out, hn = run(module, ours)
        gen.manual_seed(seed + 1)
        loss = (out * torch.randn(out.shape, generator=gen, dtype=torch.float64)).sum()
        for h in hn:
            loss = loss + (h * torch.randn(h.shape, generator=gen, dtype=torch.float64)).sum()
        names, params = zip(*module.named_parameters())
        g = torch.autograd.grad(loss, [x, *hx, *params])
        results.append((out, hn, g[:1 + len(hx)], dict(zip(names, g[1 + len(hx):]))))
    (out_r, hn_r, gin_r, gp_r), (out_m, hn_m, gin_m, gp_m) = results
    return ref, mine, (out_r, out_m), (hn_r, hn_m), (gin_r, gin_m), \
        (gp_r, grads_in_torch_layout(mine, rt._torch_kind(ref), bias, gp_m))


@pytest.mark.parametrize("mode", ["full", "lengths", "packed"])
@pytest.mark.parametrize("batch_first", [False, True], ids=["seq_first", "batch_first"])
@pytest.mark.parametrize("layers,bidir", [(1, False), (1, True), (2, False), (2, True)],
                         ids=["1", "1bi", "2", "2bi"])
@pytest.mark.parametrize("kind", ["lstm", "gru", "elman", "elman_relu"])
def test_matches_torch_module(kind, layers, bidir, batch_first, mode):
    _, _, outs, hns, gins, gps = run_both(kind, layers, bidir, batch_first, mode)
    torch.testing.assert_close(outs[1], outs[0], **F64)
    for a, b in zip(*hns):
        assert b.shape == a.shape
        torch.testing.assert_close(b, a, **F64)
    for a, b in zip(*gins):  # input and initial states
        torch.testing.assert_close(b, a, **F64)
    assert set(gps[1]) == set(gps[0])
    for name in gps[0]:
        torch.testing.assert_close(gps[1][name], gps[0][name], **F64, msg=name)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_without_bias(kind):
    ref, mine, outs, hns, gins, gps = run_both(kind, 2, True, False, "lengths", bias=False)
    assert not any(n.split(".")[1].startswith("b_") for n, _ in mine.named_parameters())
    torch.testing.assert_close(outs[1], outs[0], **F64)
    for name in gps[0]:
        torch.testing.assert_close(gps[1][name], gps[0][name], **F64, msg=name)


def test_parameter_names_and_export():
    torch.manual_seed(0)
    ref = nn.GRU(I, H, 2, bidirectional=True, batch_first=True, dropout=0.25).double()
    mine = RNN.from_torch(ref, spec=cell("gru"))
    names = [n for n, _ in mine.named_parameters()]
    assert "l0.W_ir" in names and "l0_reverse.W_hz" in names
    assert "l1_reverse.b_hn" in names and len(names) == 4 * 12
    assert all(isinstance(p, nn.Parameter) for p in mine.parameters())
    back = mine.to_torch()
    assert type(back) is nn.GRU and back.batch_first and back.bidirectional
    assert back.dropout == mine.dropout == 0.25
    x = torch.randn(B, T, I, dtype=torch.float64)
    ref.eval(), mine.eval()  # no dropout between the layers
    torch.testing.assert_close(mine(x)[0], ref(x)[0], **F64)
    for (n1, p1), (n2, p2) in zip(ref.named_parameters(), back.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2)
    lstm = RNN("lstm", I, H, dtype=torch.float64)
    assert type(lstm.to_torch()) is nn.LSTM and lstm.torch_kind() == "lstm"


def test_float32_and_unbatched():
    torch.manual_seed(0)
    ref = nn.LSTM(I, H)
    mine = RNN.from_torch(ref)
    x = torch.randn(T, B, I)
    (o1, (h1, c1)), (o2, (h2, c2)) = ref(x), mine(x)
    assert o2.dtype == torch.float32
    torch.testing.assert_close(o2, o1, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(c2, c1, atol=1e-5, rtol=1e-5)
    o2.sum().backward()
    assert mine.l0.W_hi.grad.dtype == torch.float32
    (u1, (uh1, _)), (u2, (uh2, _)) = ref(x[:, 0]), mine(x[:, 0])  # unbatched (T, I)
    assert u2.shape == u1.shape and uh2.shape == uh1.shape == (1, H)
    torch.testing.assert_close(u2, u1, atol=1e-5, rtol=1e-5)


def test_clear_errors():
    mine = RNN("lstm", I, H, dtype=torch.float64)
    x = torch.randn(T, B, I, dtype=torch.float64)
    with pytest.raises(ValueError, match="2 state"):
        mine(x, torch.zeros(1, B, H, dtype=torch.float64))
    with pytest.raises(ValueError, match="must be"):
        mine(x, (torch.zeros(2, B, H, dtype=torch.float64),) * 2)
    with pytest.raises(TypeError, match="float32"):
        mine(x.float())
    with pytest.raises(ValueError, match="not one of torch's cells"):
        RNN(PEEPHOLE_YAML, I, H).to_torch()


def test_op_passes_arrays_without_copies_and_keeps_the_tape(monkeypatch):
    c = rt._cell(rt.register(rnndsl.compile("lstm")))  # the instance the op will use
    params = {p: torch.tensor(v, requires_grad=True)
              for p, v in c.init_params(input=I, hidden=H, dtype=np.float64).items()}
    x = torch.randn(T, B, I, dtype=torch.float64, requires_grad=True)
    seen = []
    real_forward = c.forward

    def spy(p, xs, state0=None, lengths=None, **kwargs):
        seen.append((p, xs))
        return real_forward(p, xs, state0, lengths, **kwargs)

    monkeypatch.setattr(c, "forward", spy)
    tapes_before = len(rt._TAPES)
    outs, finals = cell_apply(c, params, x, lengths=[5, 3, 1])
    (outs["h"].sum() + finals["c"].sum()).backward()
    assert len(seen) == 1, "backward recomputed the forward pass instead of using its tape"
    p, xs = seen[0]
    assert xs["x"].ctypes.data == x.data_ptr()
    assert all(p[n].ctypes.data == params[n].data_ptr() for n in params)
    assert len(rt._TAPES) == tapes_before  # freed with the graph
    with torch.no_grad():
        cell_apply(c, params, x)
    assert len(rt._TAPES) == tapes_before  # and at once when no graph is recorded
    assert x.grad is not None and params["W_hi"].grad.shape == (H, H)


def test_gradcheck_op():
    c = rnndsl.compile(spec("gru"))
    rng = np.random.default_rng(0)
    n = 2
    ps = [torch.tensor(v + 0.1 * rng.standard_normal(v.shape), requires_grad=True)
          for v in c.init_params(input=n, hidden=n, dtype=np.float64).values()]
    x = torch.randn(3, 2, n, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(2, n, dtype=torch.float64, requires_grad=True)

    def f(x, h0, *ps):
        outs, finals = cell_apply(c, list(ps), x, [h0], lengths=[3, 2])
        return outs["h"], finals["h"]

    assert torch.autograd.gradcheck(f, (x, h0, *ps), eps=1e-6, atol=1e-7)


def test_gradcheck_module():
    torch.manual_seed(0)
    mine = RNN("lstm", 2, 2, num_layers=2, bidirectional=True, dtype=torch.float64)
    names = [n for n, _ in mine.named_parameters()]
    x = torch.randn(3, 2, 2, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(4, 2, 2, dtype=torch.float64, requires_grad=True)

    def f(x, h0, *ps):
        out, (h, c) = torch.func.functional_call(mine, dict(zip(names, ps)), (x, (h0, h0 * 0.5)),
                                                 {"lengths": [3, 1]})
        return out, h, c

    assert torch.autograd.gradcheck(f, (x, h0, *mine.parameters()), eps=1e-6, atol=1e-7)


def copy_task(seed=0, n=16):
    """Predict the first input channel, delayed by one step: needs memory."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(8, n, 2, generator=g, dtype=torch.float64)
    y = torch.cat([torch.zeros(1, n, 1, dtype=torch.float64), x[:-1, :, :1]], 0)
    return x, y


class Tagger(nn.Module):
    def __init__(self, spec_text, hidden=8):
        super().__init__()
        self.rnn = RNN(spec_text, 2, hidden, dtype=torch.float64)
        self.head = nn.Linear(hidden, 1, dtype=torch.float64)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out)


def test_custom_spec_trains_with_adam():
    torch.manual_seed(0)
    model = Tagger(PEEPHOLE_YAML)
    assert {"p_i", "p_f", "p_o"} <= {n.split(".")[-1] for n, _ in model.named_parameters()}
    opt = torch.optim.Adam(model.parameters(), lr=0.03)
    x, y = copy_task()
    losses = []
    for _ in range(40):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0]


def test_torch_compile_same_outputs_and_gradients():
    torch.manual_seed(0)
    model = Tagger(PEEPHOLE_YAML, hidden=3)
    x, y = copy_task(n=2)
    x = x[:4]
    grads = []
    for m in (model, torch.compile(model, fullgraph=True)):  # fullgraph: no graph breaks
        model.zero_grad()
        out = m(x)
        out.square().sum().backward()
        grads.append((out.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(grads[1][0], grads[0][0], **F64)
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(b, a, **F64)


@pytest.mark.parametrize("first_input_needs_grad", [True, False])
def test_eager_calls_skip_the_custom_op_and_agree_with_it_to_the_bit(monkeypatch,
                                                                     first_input_needs_grad):
    """Eagerly the module runs the ops' bodies through a plain autograd.Function; the custom
    op (what torch.compile sees) gives the same outputs and gradients to the bit, with
    lengths, both directions, two layers, and with and without the input's gradient."""
    torch.manual_seed(1)
    model = RNN("lstm", I, H, 2, bidirectional=True).double()
    x = torch.randn(T, B, I, dtype=torch.float64, requires_grad=first_input_needs_grad)
    h0 = torch.randn(4, B, H, dtype=torch.float64, requires_grad=True)
    eager_calls = []
    real_apply = rt._EagerCell.apply
    monkeypatch.setattr(rt._EagerCell, "apply",
                        lambda *a: eager_calls.append(a[0]) or real_apply(*a))

    def run():
        model.zero_grad()
        x.grad = h0.grad = None
        out, (h_n, c_n) = model(x, (h0, torch.zeros_like(h0)), lengths=LENGTHS)
        (out.sin().sum() + h_n.square().sum() + c_n.sum()).backward()
        return [out, h_n, c_n, h0.grad, *([x.grad] if first_input_needs_grad else []),
                *(p.grad for p in model.parameters())]

    eager = [t.detach().clone() for t in run()]
    assert len(eager_calls) == 4  # two layers, two directions
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # as under compile
    through_op = run()
    assert len(eager_calls) == 4  # none more: the custom op ran
    assert all(torch.equal(a, b) for a, b in zip(eager, through_op))


@pytest.mark.parametrize("spec", ["lstm", "gru", "peephole_lstm"])
def test_without_gradients_the_inference_kernels_run_with_the_same_results(monkeypatch, spec):
    """Under no_grad (or with nothing requiring a gradient) the module runs the inference
    kernels, which keep no tape, and answers what the training pass answers."""
    torch.manual_seed(2)
    model = RNN(spec, I, H, 2, bidirectional=True).double()
    x = torch.randn(T, B, I, dtype=torch.float64)
    saves = []
    real = rt._cell(model.key).forward
    monkeypatch.setattr(rt._cell(model.key), "forward",
                        lambda *a, save=True, **k: saves.append(save) or real(*a, save=save,
                                                                                 **k))
    training = model(x, lengths=LENGTHS)
    assert saves == [True] * 4
    with torch.no_grad():
        inference = model(x, lengths=LENGTHS)
    model.requires_grad_(False)
    frozen = model(x, lengths=LENGTHS)
    assert saves == [True] * 4 + [False] * 8
    for other in (inference, frozen):
        assert torch.equal(other[0], training[0].detach())
        assert all(torch.equal(a, b.detach()) for a, b in zip(other[1], training[1]))


@pytest.mark.parametrize("through_op", [False, True])
def test_double_backward_is_refused_on_both_paths(monkeypatch, through_op):
    if through_op:
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    model = RNN("elman", I, H).double()
    x = torch.randn(T, B, I, dtype=torch.float64, requires_grad=True)
    g, = torch.autograd.grad(model(x)[0].sum(), x, create_graph=True)  # first order: fine
    assert torch.equal(g.detach(), torch.autograd.grad(model(x)[0].sum(), x)[0])
    with pytest.raises(RuntimeError, match="no autograd formula|no second derivative"):
        (g.square().sum() + x.sum()).backward()  # not silently without the cell's part


PROJECTED_YAML = """
name: elman_projected
sizes: [input, hidden, proj]
inputs: {x: input}
states: {h: hidden, c: hidden}
outputs: [y]
params:
  V: {shape: [proj, hidden]}
equations: |
  c = 0.5 * c_prev + tanh(W @ x + U @ h_prev + b)
  h = tanh(c)
  y = V @ h
"""


def test_any_spec_sizes_states_and_outputs():
    mine = RNN(PROJECTED_YAML, I, H, num_layers=2, bidirectional=True, sizes={"proj": 2},
               dtype=torch.float64)
    assert mine.l1.W.shape == (H, 2 * 2) and mine.l0_reverse.V.shape == (2, H)
    x = torch.randn(T, B, I, dtype=torch.float64)
    out, (h, c) = mine(x, lengths=[5, 1, 3])
    assert out.shape == (T, B, 4) and h.shape == c.shape == (4, B, H)
    assert (out[1:, 1] == 0).all()  # past the length
    out.sum().backward()
    assert all(p.grad is not None for p in mine.parameters())
