"""`torch.onnx.export` of PyTorch models that run rnndsl cells (`rnndsl.torch.RNN`), with
rnndsl's translation of its op: the exported graph, run by ONNX Runtime, against the module
itself (rnndsl's CPU kernels) and against torch's own nn.LSTM / nn.GRU."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import rnndsl  # noqa: E402
import rnndsl.torch as rt  # noqa: E402

BUILTINS = sorted(set(rnndsl.compiler.kernel_specs()) - set(rnndsl.compiler.matrix_specs()))


class Tagger(torch.nn.Module):
    """What a user deploys: a recurrent encoder and a linear read-out at every step."""

    def __init__(self, rnn, out: int = 3):
        super().__init__()
        self.rnn = rnn
        width = rnn(torch.zeros(1, 1, rnn.input_size, dtype=next(rnn.parameters()).dtype))[0]
        self.read = torch.nn.Linear(width.shape[-1], out, dtype=width.dtype)

    def forward(self, x, lengths):
        y, _ = self.rnn(x, lengths=lengths)
        return self.read(y)


def export(model, *args, **kwargs):
    """The model as ONNX bytes, exported the documented way."""
    program = torch.onnx.export(model, args, dynamo=True, verbose=False,
                                custom_translation_table=rt.onnx_translation_table(), **kwargs)
    proto = program.model_proto
    onnx.checker.check_model(proto, full_check=True)
    return proto


def run(proto, *arrays):
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return session.run(None, dict(zip(names, arrays)))


def batch(dtype, T=9, B=4, I=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, B, I, generator=g, dtype=dtype)
    return x, torch.tensor([T, 2, T - 3, 1])[:B]


def count_nodes(graph) -> int:
    """Nodes of a graph and of every subgraph in it (Scan bodies)."""
    total = 0
    for node in graph.node:
        total += 1
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                total += count_nodes(attr.g)
    return total


# the hidden size below is 6: slstm's heads must divide it
CONSTANTS = {"slstm": {"heads": 3}}


@pytest.mark.parametrize("name", BUILTINS)
def test_every_builtin_cell_exports_and_matches_its_module(name):
    """The parameters get noise everywhere: off the diagonal blocks of a block-diagonal matrix
    (slstm's), where the module's kernels never read, the exported graph must not either."""
    torch.manual_seed(1)
    cell = rnndsl.compile(name, constants=CONSTANTS.get(name))
    extra = {s: 4 for s in cell.step.sizes if s not in ("input", "hidden")}
    model = Tagger(rt.RNN(cell, 3, 6, sizes=extra, dtype=torch.float64)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x, lengths = batch(torch.float64)
    proto = export(model, x, lengths)
    assert not any(n.domain == rt.ONNX_DOMAIN for n in proto.graph.node)  # nothing of rnndsl
    (got,) = run(proto, x.numpy(), lengths.numpy())
    with torch.no_grad():
        want = model(x, lengths).numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)


def test_an_inf_off_the_blocks_of_a_block_diagonal_weight_reaches_no_output():
    """Off its diagonal blocks a block-diagonal matrix is not part of the parameter: the
    exported graph selects the blocks (multiplying by a 0/1 mask made an inf there NaN)."""
    torch.manual_seed(5)
    cell = rnndsl.compile("slstm", constants=CONSTANTS["slstm"])
    model = Tagger(rt.RNN(cell, 3, 6, dtype=torch.float64)).eval()
    blocked = [p for p, info in cell.params.items() if info.blocks > 1]
    assert blocked
    x, lengths = batch(torch.float64)
    with torch.no_grad():
        clean = model(x, lengths).numpy()
        for p in blocked:
            w = getattr(model.rnn.l0, p)
            size = w.shape[0] // cell.params[p].blocks
            on = torch.block_diag(*[torch.ones(size, size, dtype=torch.bool)] *
                                  cell.params[p].blocks)
            w.copy_(torch.where(on, w, torch.tensor(float("inf"), dtype=w.dtype)))
        want = model(x, lengths).numpy()
    np.testing.assert_array_equal(want, clean)  # the kernels read the blocks alone
    (got,) = run(export(model, x, lengths), x.numpy(), lengths.numpy())
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_two_layer_bidirectional_model_matches_torch_in_float32(kind):
    torch.manual_seed(2)
    twin = (torch.nn.LSTM if kind == "lstm" else torch.nn.GRU)(3, 8, num_layers=2,
                                                                bidirectional=True)
    model = Tagger(rt.RNN.from_torch(twin)).eval()
    reference = Tagger(twin).eval()
    reference.read.load_state_dict(model.read.state_dict())
    x, lengths = batch(torch.float32, T=12)
    (got,) = run(export(model, x, lengths), x.numpy(), lengths.numpy())
    with torch.no_grad():
        packed = torch.nn.utils.rnn.pack_padded_sequence(x, lengths, enforce_sorted=False)
        y, _ = twin(packed)
        y, _ = torch.nn.utils.rnn.pad_packed_sequence(y, total_length=x.shape[0])
        want = reference.read(y).numpy()
    live = (torch.arange(x.shape[0])[:, None] < lengths[None, :]).numpy()
    # past a sequence's end torch's pad gives zeros before the read-out, as rnndsl does
    np.testing.assert_allclose(got[live], want[live], rtol=0, atol=1e-5)
    np.testing.assert_allclose(got[~live], want[~live], rtol=0, atol=1e-6)


def test_a_concatenated_matrix_is_cut_inside_the_graph():
    torch.manual_seed(3)
    model = Tagger(rt.RNN("lstm_concat", 3, 5)).eval()
    x, lengths = batch(torch.float32)
    (got,) = run(export(model, x, lengths), x.numpy(), lengths.numpy())
    with torch.no_grad():
        want = model(x, lengths).numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_the_graph_does_not_grow_with_T_and_serves_other_lengths():
    torch.manual_seed(4)
    model = Tagger(rt.RNN("peephole_lstm", 3, 5)).eval()
    short, long_ = batch(torch.float32, T=4), batch(torch.float32, T=40)
    assert count_nodes(export(model, *short).graph) == count_nodes(export(model, *long_).graph)
    T = torch.export.Dim("T", min=2, max=1000)
    proto = export(model, *short, dynamic_shapes=({0: T}, None))
    x, lengths = batch(torch.float32, T=33, seed=5)
    (got,) = run(proto, x.numpy(), lengths.numpy())
    with torch.no_grad():
        want = model(x, lengths).numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
