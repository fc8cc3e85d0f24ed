"""The ONNX target against what it did not produce: ONNX Runtime runs the exported graphs and
their outputs are compared with the NumPy reference engine (every built-in spec, generated
specs, networks with heads) and, operator by operator, with each primitive's NumPy rule."""
import numpy as np
import pytest

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

import rnndsl  # noqa: E402
from rnndsl.backend import onnx_export  # noqa: E402
from rnndsl.backend.onnx_export import LOWERINGS, Graph, export_onnx  # noqa: E402
from rnndsl.language.errors import UserError  # noqa: E402
from rnndsl.symbolic import ir, rank2  # noqa: E402
from rnndsl.symbolic.ops import OPS  # noqa: E402
from rnndsl.training.heads import Head  # noqa: E402

from specgen import random_spec  # noqa: E402

TOL = {np.float32: 1e-5, np.float64: 1e-12}
T, B = 5, 4
LENGTHS = np.array([5, 2, 0, 3])  # one empty sequence, one full, unsorted
ort.set_default_logger_severity(3)


def session(model):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def close(got, want, dtype, what):
    tol = TOL[dtype]
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol, err_msg=what)


def check_cell(cell, dtype, sizes, seed=0, steps=T, perturb=0.0):
    """Export the cell with random parameters (its initial ones, plus `perturb` times noise
    everywhere); run it on ONNX Runtime and on the reference from random states, with LENGTHS;
    compare every output and final state."""
    params = cell.init_params(seed=seed, dtype=dtype, **sizes)
    if perturb:
        noise = np.random.default_rng(seed + 2)
        params = {p: (v + perturb * noise.standard_normal(v.shape)).astype(dtype)
                  for p, v in params.items()}
    model = export_onnx(cell, params, sizes=sizes)
    rng = np.random.default_rng(seed + 1)
    xs = {x: rng.standard_normal((steps, B, sizes[s])).astype(dtype)
          for x, s in cell.inputs.items()}
    state0 = {s: rng.standard_normal((B, sizes[n])).astype(dtype) for s, n in cell.states.items()}
    lengths = np.minimum(LENGTHS, steps)
    want = cell.forward(params, xs, state0, lengths)
    feed = {f"input.{x}": v for x, v in xs.items()}
    feed.update({f"state0.{s}": v for s, v in state0.items()})
    feed["lengths"] = lengths.astype(np.int64)
    run = session(model)
    got = dict(zip([o.name for o in run.get_outputs()], run.run(None, feed)))
    for o in cell.outputs:
        close(got[f"output.{o}"], want.outputs[o], dtype, f"{cell.name}: output {o}")
    for s in cell.states:
        close(got[f"state.{s}"], want.states[s], dtype, f"{cell.name}: final state {s}")
    return model


def own_sizes(cell) -> dict[str, int]:
    return {s: 3 + k for k, s in enumerate(cell.sizes)}  # distinct, so a mixed-up size fails


# -- every operator -------------------------------------------------------------------------------
def test_every_primitive_has_a_lowering():
    """A new operator in ops.py cannot be forgotten here."""
    assert sorted(set(OPS) - set(LOWERINGS)) == sorted(rank2.OPS)  # matrices: not yet
    assert sorted(set(LOWERINGS) - set(OPS)) == []  # nor a lowering left after its operator


def op_arguments(name: str, rng, dtype):
    """Arguments inside the operator's domain, (B, n) vectors, and the node applying it."""
    n = 6
    vec = lambda low=-2.0, high=2.0: rng.uniform(low, high, (B, n)).astype(dtype)  # noqa: E731
    leaf = lambda k, shape=("n",): ir.leaf("input", f"a{k}", shape)  # noqa: E731
    if name in ("matvec", "matvec_t"):
        w = rng.uniform(-1, 1, (5, n) if name == "matvec" else (n, 5)).astype(dtype)
        return [w, vec()], ir.node(name, (ir.leaf("param", "w", w.shape), leaf(1)), None, ("m",))
    if name == "bcast":
        return [vec()[:, :1]], ir.node("bcast", (leaf(0, ()),), None, ("n",))
    if name in ("log", "sqrt"):
        args = [vec(0.1, 3.0)]
    elif name == "pow":
        args = [vec(0.1, 3.0), vec()]
    elif name == "eq":
        a = vec()
        b = np.where(rng.random((B, n)) < 0.5, a, vec())
        args = [a, b]
    else:
        args = [vec() for _ in range(OPS[name].arity)]
    args[0][0, :2] = 0.0  # the kinks of relu, step, sign, abs
    args[0][1, :3] = np.nan, np.inf, -np.inf  # special values as NumPy's
    return args, ir.node(name, tuple(leaf(k) for k in range(len(args))), None, ("n",))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", sorted(set(OPS) - set(rank2.OPS)))
def test_each_lowering_computes_its_numpy_rule(name, dtype):
    rng = np.random.default_rng(sorted(OPS).index(name))
    with ir.scope():
        args, node = op_arguments(name, rng, dtype)
    g = Graph(dtype)
    g.sizes = {"n": 6, "m": 5}
    names = [g.weight("w", a) if k == 0 and a.ndim == 2 and name.startswith("matvec")
             else f"a{k}" for k, a in enumerate(args)]
    out = g.rename(LOWERINGS[name](g, node, *names), "y")
    inputs = [g.value_info(nm, list(a.shape)) for nm, a in zip(names, args) if nm.startswith("a")]
    model = g.model(inputs, [g.value_info(out, [None, None])], name)
    got = session(model).run(None, {nm: a for nm, a in zip(names, args) if nm.startswith("a")})[0]
    with np.errstate(all="ignore"):  # log(0) is -inf, log(-inf) NaN, in ONNX Runtime too
        want = OPS[name].numpy(*args)
    if name == "erf" and dtype == np.float64:  # ONNX Runtime has Erf in float32 only
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
        return
    close(got, np.broadcast_to(want, got.shape), dtype, name)


def test_an_operator_without_a_lowering_is_named(monkeypatch):
    monkeypatch.delitem(LOWERINGS, "tanh")
    cell = rnndsl.compile("lstm", target="reference")
    with pytest.raises(UserError, match="no ONNX lowering for the operator.*tanh"):
        export_onnx(cell, cell.init_params(input=3, hidden=4))


def test_a_cell_with_matrix_values_is_refused_by_its_operators():
    cell = rnndsl.compile("delta_net", target="reference")
    with pytest.raises(UserError, match="no ONNX lowering for the operator.*mv, outer"):
        export_onnx(cell, cell.init_params(input=3, key=4, value=5))


# -- whole cells ----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", sorted(set(rnndsl.compiler.builtin_specs()) -
                                        set(rnndsl.compiler.matrix_specs())))
def test_builtin_specs_match_the_reference(name, dtype):
    cell = rnndsl.compile(name, target="reference")
    check_cell(cell, dtype, own_sizes(cell))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_block_diagonal_matrices_are_exported_by_their_blocks(dtype):
    """slstm's recurrent matrices hold noise off their blocks, which no engine reads."""
    cell = rnndsl.compile("slstm", target="reference", constants={"heads": 2})
    check_cell(cell, dtype, {"input": 3, "hidden": 6}, perturb=0.5)


@pytest.mark.parametrize("seed", range(10))
def test_generated_specs_match_the_reference(seed):
    """float64 only: generated specs hold constants such as 1e300, which float32 cannot."""
    cell = rnndsl.compile(random_spec(seed), target="reference")
    with np.errstate(all="ignore"):
        check_cell(cell, np.float64, own_sizes(cell), seed=seed)


def test_one_scan_whatever_T_and_the_input_products_hoisted():
    """The graph never sees T: one model runs any length, with one Scan whose body has one
    MatMul (the LSTM's four recurrent products stacked), after one MatMul over all T*B rows
    for the four input products."""
    cell = rnndsl.compile("lstm", target="reference")
    model = check_cell(cell, np.float64, own_sizes(cell), steps=2)
    same = check_cell(cell, np.float64, own_sizes(cell), steps=9)
    assert model.SerializeToString() == same.SerializeToString()
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("Scan") == 1 and ops.count("MatMul") == 1
    assert ops.index("MatMul") < ops.index("Scan")
    body = next(a.g for n in model.graph.node if n.op_type == "Scan" for a in n.attribute
                if a.name == "body")
    assert [n.op_type for n in body.node].count("MatMul") == 1
    time_dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert time_dim.dim_param == "T" and not time_dim.dim_value


# -- networks and heads ---------------------------------------------------------------------------
NETWORKS = [  # (spec, bidirectional, residual, dense, head, dtype)
    ("lstm", "concat", True, None, "softmax_last", np.float64),
    ("gru", "alternate", False, "concat", "bits_step", np.float64),
    ("jordan", "separate", True, "add", "mse_last", np.float64),
    ("layernorm_lstm", None, True, "concat", "softmax_step", np.float32),
]


@pytest.mark.parametrize("spec,mode,residual,dense,kind,dtype", NETWORKS)
def test_networks_with_heads_match_the_reference(spec, mode, residual, dense, kind, dtype):
    cell = rnndsl.compile(spec, target="reference")
    net = rnndsl.Network(cell, 3, 4, layers=3, bidirectional=mode, residual=residual,
                         dense=dense, sizes={"output": 5} if spec == "jordan" else None)
    params = net.init_params(seed=1, dtype=dtype)
    head = Head(kind, net.output_size, 2)
    params.update(head.init_params(np.random.default_rng(2), dtype))
    x = np.random.default_rng(3).standard_normal((T, B, 3)).astype(dtype)
    lengths = np.array([5, 2, 1, 3])  # a last-step head needs every sequence non-empty
    y, _ = net.forward({k: v for k, v in params.items() if not k.startswith("head.")}, x, lengths)
    got_y, got_p = session(export_onnx(net, params, head=head)).run(
        None, {"x": x, "lengths": lengths})
    close(got_y, y, dtype, "y")
    close(got_p, head.predict(params, y, lengths), dtype, "prediction")


# -- the file and the command ----------------------------------------------------------------------
def test_written_file_passes_the_checker_and_bad_params_are_named(tmp_path):
    cell = rnndsl.compile("gru", target="reference")
    params = cell.init_params(input=3, hidden=4)
    path = tmp_path / "gru.onnx"
    export_onnx("gru", params, path)
    onnx.checker.check_model(onnx.load(path), full_check=True)
    with pytest.raises(UserError, match="missing.*W_hn"):
        export_onnx(cell, {k: v for k, v in params.items() if k != "W_hn"})
    with pytest.raises(UserError, match="size 'hidden' is"):
        export_onnx(cell, {**params, "b_hn": np.zeros(5, np.float32)})


def test_export_command(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from rnndsl.cli import app
    from rnndsl.training.train import Model, TrainConfig, read_checkpoint, train

    monkeypatch.chdir(tmp_path)
    config = TrainConfig(spec="gru", task="copy", hidden=6, layers=2, bidirectional="concat",
                         steps=2, batch=4, eval_batch=4, dtype="float64")
    train(config, save="run.npz")
    (tmp_path / "two.yaml").write_text(
        "name: two\nsizes: [input, hidden]\ninputs: {x: input, u: input}\n"
        "states: {h: hidden}\nequations: |\n  h = tanh(W @ x + V @ u + U @ h_prev)\n")
    result = CliRunner().invoke(app, ["export", "gru", "--weights", "run.npz", "-o", "gru.onnx"])
    assert result.exit_code == 0, result.output
    model = Model(config)
    entries = read_checkpoint("run.npz")["entries"]
    params = {k.removeprefix("param/"): v for k, v in entries.items() if k.startswith("param/")}
    x = np.random.default_rng(0).standard_normal((7, 3, model.network.input_size))
    lengths = np.array([7, 4, 1])
    y, _ = model.network.forward({k: params[k] for k in model.network.param_shapes()}, x, lengths)
    got_y, got_p = session(onnx.load("gru.onnx")).run(None, {"x": x, "lengths": lengths})
    close(got_y, y, np.float64, "y")
    close(got_p, model.head.predict(params, y, lengths), np.float64, "prediction")
    for args, message in [(["lstm", "--weights", "run.npz"], "parameter 'layer0.fwd.W_ii' is "
                                                               "missing"),
                          (["gru", "--weights", "none.npz"], "does not exist"),
                          (["two.yaml", "--weights", "run.npz"], "one input sequence"),
                          (["gru", "--weights", "run.npz", "-o", "no/such/dir.onnx"],
                           "cannot write")]:
        if "-o" not in args:
            args = [*args, "-o", "out.onnx"]
        result = CliRunner().invoke(app, ["export", *args])
        assert result.exit_code == 2 and message in result.output, result.output
        assert "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gru.onnx", "run.npz", "two.yaml"]
