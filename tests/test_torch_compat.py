"""rnndsl.torch.RNN as a drop-in for nn.LSTM: argument order, state dicts both ways, proj_size,
torch's single-step cells, half precision, the meta device, threads, training checkpoints."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

import rnndsl.torch as rt  # noqa: E402
from rnndsl.backend.blas import blas_threads  # noqa: E402
from rnndsl.torch import RNN  # noqa: E402
from torch_cells import PEEPHOLE_YAML  # noqa: E402

T, B, I, H, P = 5, 3, 4, 5, 2
F64 = dict(atol=1e-10, rtol=1e-10)
TORCH = {  # spec -> torch module of the same cell
    "lstm": lambda *a, **k: nn.LSTM(*a, **k),
    "lstm_proj": lambda *a, **k: nn.LSTM(*a, proj_size=P, **k),
    "gru": lambda *a, **k: nn.GRU(*a, **k),
    "elman": lambda *a, **k: nn.RNN(*a, **k),
    "elman_relu": lambda *a, **k: nn.RNN(*a, nonlinearity="relu", **k),
}


def x64(batch_first=False):
    return torch.randn((B, T, I) if batch_first else (T, B, I), dtype=torch.float64)


def test_positional_arguments_are_nn_lstms():
    args = (I, H, 2, False, True, 0.25, True)  # layers, bias, batch_first, dropout, bidir
    ref, mine = nn.LSTM(*args), RNN("lstm", *args)
    for k in ("num_layers", "bias", "batch_first", "dropout", "bidirectional", "proj_size"):
        assert getattr(mine, k) == getattr(ref, k), k
    assert RNN("lstm", I, H, 2, True, False, 0.0, True, P).proj_size == P
    kw = dict(num_layers=2, bias=False, batch_first=True, dropout=0.25, bidirectional=True)
    assert RNN("lstm", I, H, **kw).extra_repr() == RNN("lstm", I, H, 2, False, True, 0.25,
                                                       True).extra_repr()


def test_a_flag_where_dropout_goes_is_refused():
    # the old order put bidirectional seventh; True there must not mean dropout=1.0
    with pytest.raises(ValueError, match="dropout must be a number"):
        RNN("lstm", I, H, 2, True, False, True)
    with pytest.raises(ValueError, match="dropout must be a number"):
        RNN("lstm", I, H, dropout=1.5)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("kind", list(TORCH))
def test_state_dict_loads_both_ways(kind, bias):
    torch.manual_seed(0)
    ref = TORCH[kind](I, H, 2, bias=bias, bidirectional=True).double()
    spec = "lstm" if kind == "lstm_proj" else kind
    mine = RNN(spec, I, H, 2, bias, bidirectional=True, proj_size=ref.proj_size if
               kind == "lstm_proj" else 0, dtype=torch.float64)
    assert mine.torch_kind() == kind
    mine.load_state_dict(ref.state_dict())  # torch's keys into ours
    x = x64()
    torch.testing.assert_close(mine(x)[0], ref(x)[0], **F64)
    assert list(mine.state_dict()) == list(ref.state_dict())
    back = TORCH[kind](I, H, 2, bias=bias, bidirectional=True).double()
    back.load_state_dict(mine.state_dict())  # ours into torch's
    for (n1, p1), (n2, p2) in zip(ref.named_parameters(), back.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2)
    again = RNN(spec, I, H, 2, bias, bidirectional=True, proj_size=mine.proj_size,
                dtype=torch.float64)
    again.load_state_dict(dict(mine.named_parameters()))  # and the spec's own names
    torch.testing.assert_close(again(x)[0], ref(x)[0], **F64)


def test_a_spec_without_a_torch_twin_keeps_its_names():
    mine = RNN(PEEPHOLE_YAML, I, H)
    assert set(mine.state_dict()) == {f"l0.{p}" for p in mine.cell.params}
    with pytest.raises(ValueError, match="not one of torch's cells"):
        mine.to_torch()


@pytest.mark.parametrize("cls", [nn.LSTMCell, nn.GRUCell, nn.RNNCell])
def test_from_torch_single_step_cells(cls):
    torch.manual_seed(0)
    ref = cls(I, H).double()
    mine = RNN.from_torch(ref)
    x = x64()
    h = c = torch.zeros(B, H, dtype=torch.float64)
    for t in range(T):  # the cell stepped by hand
        if cls is nn.LSTMCell:
            h, c = ref(x[t], (h, c))
        else:
            h = ref(x[t], h)
    out, finals = mine(x)
    torch.testing.assert_close(out[-1], h, **F64)
    torch.testing.assert_close(finals[0][0] if cls is nn.LSTMCell else finals[0], h, **F64)


def test_proj_size_forward_matches_nn_lstm():
    torch.manual_seed(0)
    ref = nn.LSTM(I, H, 2, bidirectional=True, proj_size=P, batch_first=True).double()
    mine = RNN.from_torch(ref)
    assert mine.cell.name == "lstm_proj" and mine.l0.W_hr.shape == (P, H)
    x, lengths = x64(batch_first=True), [5, 2, 4]
    h0 = torch.randn(4, B, P, dtype=torch.float64)
    c0 = torch.randn(4, B, H, dtype=torch.float64)
    packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True,
                                               enforce_sorted=False)
    (o1, (h1, c1)), (o2, (h2, c2)) = ref(packed, (h0, c0)), mine(packed, (h0, c0))
    torch.testing.assert_close(o2.data, o1.data, **F64)
    torch.testing.assert_close(h2, h1, **F64)
    torch.testing.assert_close(c2, c1, **F64)
    back = mine.to_torch()
    assert back.proj_size == P and torch.equal(back.weight_hr_l1_reverse, ref.weight_hr_l1_reverse)


def _proj_gradients(target):
    torch.manual_seed(0)
    ref = nn.LSTM(I, H, 2, proj_size=P).double()
    mine = RNN.from_torch(ref, target=target)
    x = x64()
    for m in (ref, mine):
        out, (h, c) = m(x)
        (out.sin().sum() + c.sum()).backward()
    for attr, names, layer, d in mine._layout("lstm_proj", True):
        grad = torch.cat([getattr(getattr(mine, mine._name(layer, d)), n).grad for n in names])
        torch.testing.assert_close(grad, getattr(ref, attr).grad, **F64, msg=attr)


def test_proj_size_gradients_match_nn_lstm_on_the_reference_engine():
    _proj_gradients("reference")


def test_proj_size_gradients_match_nn_lstm_on_the_kernels():
    _proj_gradients(None)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_computes_in_float32_and_answers_in_its_own_dtype(dtype):
    torch.manual_seed(0)
    low = RNN("gru", I, H, 2, bidirectional=True, dtype=dtype)
    full = RNN("gru", I, H, 2, bidirectional=True, dtype=torch.float32)
    full.load_state_dict({k: v.float() for k, v in low.state_dict().items()})
    x = torch.randn(T, B, I).to(dtype).requires_grad_()
    x32 = x.detach().float().requires_grad_()
    (out, h), (out32, h32) = low(x), full(x32)
    assert out.dtype == h.dtype == dtype
    assert torch.equal(out, out32.to(dtype)) and torch.equal(h, h32.to(dtype))
    weights = torch.randn(out.shape).to(dtype).float()  # a gradient both dtypes hold exactly
    (out.float() * weights).sum().backward()
    (out32 * weights).sum().backward()
    assert x.grad.dtype == low.l0.W_hr.grad.dtype == dtype
    assert torch.equal(low.l1_reverse.W_hn.grad, full.l1_reverse.W_hn.grad.to(dtype))
    with pytest.raises(TypeError, match="float32 or float64"):
        RNN("gru", I, H, dtype=torch.complex64)(torch.zeros(T, B, I, dtype=torch.complex64))


def test_meta_device_is_refused_clearly():
    with pytest.raises(RuntimeError, match="on the CPU.*'meta'"):
        RNN("lstm", I, H)(torch.zeros(T, B, I, device="meta"))
    with pytest.raises(RuntimeError, match="parameters are on 'meta'.*to_empty"):
        RNN("lstm", I, H, device="meta")(torch.zeros(T, B, I))


def test_kernels_use_one_blas_thread_and_torch_s_gemm_while_torch_has_a_pool(monkeypatch):
    """While torch has a pool, the op's GEMMs outside the time loop go to torch.mm (its pool is
    the one already running) and the kernels' own BLAS has one thread; set_kernel_threads(n)
    gives the kernels' BLAS n threads and all the GEMMs. Either way the results are the same."""
    if blas_threads() is None:
        pytest.skip("SciPy links a BLAS whose threads cannot be told")
    mine = RNN("elman", I, H)
    cell = rt._cell(mine.key)  # the instance the op runs
    seen, products = [], []
    real, real_gemm = cell.forward, rt._torch_gemm

    def spy(*args, **kwargs):
        seen.append(blas_threads())
        return real(*args, **kwargs)

    def counted(a, b):
        products.append(a.shape)
        return real_gemm(a, b)

    monkeypatch.setattr(cell, "forward", spy)
    monkeypatch.setattr(rt, "_torch_gemm", counted)
    x = torch.randn(T, B, I)
    before, torch_threads = blas_threads(), torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        through_torch = mine(x)[0]
        assert products and all(len(shape) == 2 for shape in products)
        rt.set_kernel_threads(3)
        products.clear()
        through_blas = mine(x)[0]
        assert not products
    finally:
        rt.set_kernel_threads(None)
        torch.set_num_threads(torch_threads)
    assert seen == [1, 3] and blas_threads() == before
    torch.testing.assert_close(through_torch, through_blas, rtol=1e-6, atol=1e-6)


def test_gemm_through_is_per_thread_and_undone():
    import threading

    from rnndsl.backend.blas import gemm, gemm_through

    a, b = np.arange(6.0).reshape(2, 3), np.arange(12.0).reshape(3, 4)
    elsewhere = []
    with gemm_through(lambda x, y: np.zeros((x.shape[0], y.shape[1]))):
        assert not gemm(a, b).any()
        worker = threading.Thread(target=lambda: elsewhere.append(gemm(a, b)))
        worker.start()
        worker.join()
    np.testing.assert_array_equal(elsewhere[0], a @ b)
    np.testing.assert_array_equal(gemm(a, b), a @ b)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from rnndsl.training.train import TrainConfig, train

    path = tmp_path_factory.mktemp("ckpt") / "run.npz"
    config = TrainConfig(spec="gru", task="adding", length=6, hidden=4, layers=2,
                         bidirectional="concat", steps=2, batch=4, eval_batch=4,
                         dtype="float64")
    result = train(config, save=path)
    return path, config, result.params


def test_from_checkpoint_runs_the_trained_network(checkpoint):
    from rnndsl.training.train import Model

    path, config, params = checkpoint
    mine = RNN.from_checkpoint(path)
    assert (mine.num_layers, mine.bidirectional, mine.hidden_size) == (2, True, 4)
    model = Model(config)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 3, model.task.input_size))
    net = {k: params[k] for k in model.network.param_shapes()}
    y, _ = model.network.forward(net, x)
    torch.testing.assert_close(mine(torch.from_numpy(x))[0], torch.from_numpy(y), **F64)


def test_to_checkpoint_writes_weights_that_training_resumes_from(checkpoint, tmp_path):
    from rnndsl.training.train import train

    path, config, params = checkpoint
    mine = RNN.from_checkpoint(path)
    with torch.no_grad():
        mine.l1_reverse.W_hz.mul_(2.0)
    out = tmp_path / "tuned.npz"
    mine.to_checkpoint(out, template=path)
    again = RNN.from_checkpoint(out)
    assert torch.equal(again.l1_reverse.W_hz, mine.l1_reverse.W_hz)
    with np.load(out) as new, np.load(path) as old:
        assert set(new.files) == set(old.files)
        assert np.array_equal(new["param/head.W"], old["param/head.W"])
    from dataclasses import replace
    resumed = train(replace(config, steps=3), resume=out)
    assert resumed.steps_run == 1
    with pytest.raises(ValueError, match="param/layer0.fwd.W_ir"):
        RNN("gru", 3, 4).to_checkpoint(tmp_path / "bad.npz", template=path)


def test_torch_compile_of_packed_sequences_neither_breaks_nor_recompiles_per_batch():
    torch.manual_seed(0)
    mine = RNN("lstm", I, H, 2, bidirectional=True, dtype=torch.float64)
    graphs = []

    def count(gm, inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(mine, backend=count, fullgraph=True)  # fullgraph: no breaks
    for lengths in ([5, 2, 4], [3, 3, 1], [5, 5, 5], [1, 4, 2], [2, 1, 1]):
        x = x64().requires_grad_()
        packed = nn.utils.rnn.pack_padded_sequence(x, torch.tensor(lengths),
                                                   enforce_sorted=False)
        results = []
        for m in (compiled, mine):
            out, (h, c) = m(packed)
            loss = (out.data.sin().sum() + h.sum() + c.square().sum())
            results.append((out.data, h, c, torch.autograd.grad(loss, x, retain_graph=True)))
        for a, b in zip(*results):
            torch.testing.assert_close(a, b, **F64)
    assert len(graphs) <= 2  # one graph for the first shapes, one with dynamic sizes
