"""The PyTorch bridge on CUDA tensors (a GPU with torch's CUDA build and rnndsl's `cuda`
extra; skipped elsewhere, and run by benchmarks/device_check.py on a lent GPU): modules on the
device against cuDNN and against the CPU target, gradients on the device, torch's streams,
torch.compile."""
import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("no CUDA device for torch", allow_module_level=True)
try:
    from rnndsl.backend import cuda_support as cs
except Exception as exc:  # noqa: BLE001: any failure to import is a reason to skip
    pytest.skip(f"rnndsl's CUDA target cannot load: {exc}", allow_module_level=True)
if cs.SIMULATOR:
    pytest.skip("the simulator runs on host memory, not on torch's CUDA tensors",
                allow_module_level=True)

import rnndsl.torch as rt  # noqa: E402

DEVICE = torch.device("cuda")


def packed_batch(dtype, T=30, B=6, I=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, B, I, generator=g, dtype=dtype).to(DEVICE)
    lengths = torch.tensor([T, 3, 17, 1, T - 1, 9])[:B]
    return torch.nn.utils.rnn.pack_padded_sequence(x, lengths, enforce_sorted=False)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_two_layer_bidirectional_matches_cudnn_on_packed_lengths(kind):
    torch.manual_seed(1)
    twin = getattr(torch.nn, kind.upper())(5, 32, num_layers=2, bidirectional=True).to(DEVICE)
    mine = rt.RNN.from_torch(twin)
    assert next(mine.parameters()).device.type == "cuda"
    packed = packed_batch(torch.float32)
    outs = []
    for module in (twin, mine):
        y, h = module(packed)
        h = h[0] if isinstance(h, tuple) else h
        (y.data.square().sum() + h.sum()).backward()
        outs.append((y.data, h, {n: p.grad for n, p in module.named_parameters()}))
    (y1, h1, g1), (y2, h2, g2) = outs
    assert y2.device.type == "cuda" and all(g.device.type == "cuda" for g in g2.values())
    torch.testing.assert_close(y2, y1, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(h2, h1, rtol=1e-4, atol=1e-5)
    for name, grad in g1.items():
        torch.testing.assert_close(g2[name], grad, rtol=1e-3, atol=1e-4)


def test_to_cuda_equals_the_cpu_module_in_float64():
    torch.manual_seed(2)
    cpu = rt.RNN("peephole_lstm", 5, 16, num_layers=2, dtype=torch.float64)
    gpu = rt.RNN("peephole_lstm", 5, 16, num_layers=2, dtype=torch.float64)
    gpu.load_state_dict(cpu.state_dict())
    gpu.to(DEVICE)
    x = torch.randn(40, 4, 5, dtype=torch.float64)
    y_cpu, _ = cpu(x, lengths=[40, 7, 39, 1])
    y_gpu, _ = gpu(x.to(DEVICE), lengths=[40, 7, 39, 1])
    y_cpu.sum().backward()
    y_gpu.sum().backward()
    torch.testing.assert_close(y_gpu.cpu(), y_cpu, rtol=0, atol=1e-12)
    for a, b in zip(gpu.parameters(), cpu.parameters()):
        torch.testing.assert_close(a.grad.cpu(), b.grad, rtol=0, atol=1e-11)


def test_a_side_stream_sees_the_results():
    torch.manual_seed(3)
    module = rt.RNN("lstm", 5, 16).to(DEVICE)
    x = torch.randn(20, 3, 5, device=DEVICE)
    want, _ = module(x)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        got, _ = module(x * 1.0)
        got = got * 1.0  # work queued on the side stream after the op
    stream.synchronize()
    torch.testing.assert_close(got, want)


def test_cell_apply_and_torch_compile_on_the_device():
    torch.manual_seed(4)
    module = rt.RNN("gru", 5, 8).to(DEVICE)
    x = torch.randn(12, 2, 5, device=DEVICE)
    want, _ = module(x)
    outs, finals = rt.cell_apply(module.key, module.layer_params(0), x)
    torch.testing.assert_close(outs["h"], want)
    compiled = torch.compile(module, fullgraph=True)
    got, _ = compiled(x)
    torch.testing.assert_close(got, want)


# -- the per-step time loop as a CUDA graph (torch.cuda.graph) ---------------------------------
@pytest.fixture
def graphs():
    """A fresh graph cache of the default size, emptied again after the test."""
    from rnndsl.backend import cuda_graphs as cg

    cg.clear_graph_cache()
    cg.set_graph_cache_size(cg.DEFAULT_CACHE_SIZE)
    yield cg
    cg.clear_graph_cache()
    cg.set_graph_cache_size(cg.DEFAULT_CACHE_SIZE)


def _fwd_bwd(cell, params, x, lengths, seed):
    fwd = cell.forward(params, x, lengths=lengths)
    grads = cell.backward(params, fwd, seed)
    return [fwd.output, *(grads.params[p] for p in sorted(grads.params)), grads.inputs["x"]]


@pytest.mark.parametrize("spec", ["lstm", "gru", "layernorm_lstm"])
def test_a_captured_time_loop_replays_the_uncaptured_results(spec, graphs):
    import numpy as np

    import rnndsl

    assert graphs.why_not() is None
    cell = rnndsl.compile(spec, target="cuda", persistent=False)
    params = {p: torch.as_tensor(v, device=DEVICE)
              for p, v in cell.init_params(5, 32, dtype=np.float64, seed=1).items()}
    g = torch.Generator().manual_seed(5)
    x = torch.randn(20, 4, 5, generator=g, dtype=torch.float64).to(DEVICE)
    seed = torch.randn(20, 4, 32, generator=g, dtype=torch.float64).to(DEVICE)
    graphs.set_graph_cache_size(0)
    want = {}
    for lengths in ([20, 3, 11, 1], [2, 20, 20, 5]):
        want[tuple(lengths)] = [cs.host(a) for a in _fwd_bwd(cell, params, x, lengths, seed)]
    graphs.set_graph_cache_size(graphs.DEFAULT_CACHE_SIZE)
    runs = []
    for lengths in ([20, 3, 11, 1], [20, 3, 11, 1], [20, 3, 11, 1], [2, 20, 20, 5]):
        got = [cs.host(a) for a in _fwd_bwd(cell, params, x, lengths, seed)]
        runs.append(graphs.last_run())
        for a, b in zip(got, want[tuple(lengths)]):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-13)
    assert runs == ["uncaptured", "captured", "replayed", "replayed"]


def test_the_bridge_replays_graphs_on_a_side_stream(graphs):
    torch.manual_seed(6)
    module = rt.RNN("lstm", 5, 16, num_layers=2).to(DEVICE)
    x = torch.randn(20, 3, 5, device=DEVICE)
    graphs.set_graph_cache_size(0)
    want, _ = module(x)
    want.sum().backward()
    want_grads = [p.grad.clone() for p in module.parameters()]
    graphs.set_graph_cache_size(graphs.DEFAULT_CACHE_SIZE)
    stream = torch.cuda.Stream()
    for _ in range(3):  # uncaptured, captured, replayed
        module.zero_grad()
        with torch.cuda.stream(stream):
            got, _ = module(x * 1.0)
            got.sum().backward()
            got = got * 1.0  # work queued on the side stream after the op
        stream.synchronize()
        torch.testing.assert_close(got, want)
        for p, w in zip(module.parameters(), want_grads):
            torch.testing.assert_close(p.grad, w)
    assert graphs.last_run() == "replayed" and len(graphs._CACHE.graphs) >= 2


def test_info_says_the_time_loops_are_captured(graphs):
    from rnndsl.environment import report

    found = report()["cuda"]["graphs"]
    assert found == {"captured": True, "why_not": None, "cache_size": graphs.DEFAULT_CACHE_SIZE}


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="DDP over NCCL needs two GPUs")
def test_ddp_over_nccl_on_two_gpus_matches_one_process(tmp_path):
    from test_torch_ddp import two_ranks_match_one_process

    two_ranks_match_one_process(tmp_path, "nccl")
