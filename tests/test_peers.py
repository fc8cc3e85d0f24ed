"""The benchmarks' peers compute what rnndsl computes: the hand-written loops of every built-in
cell they cover (PyTorch eager, and JAX lax.scan where JAX is installed) and the generic
EagerLoop of any other spec, outputs and gradients of the sum of the outputs w.r.t. every
parameter and the input, in float64 on small sizes, against the compiled cell."""
import numpy as np
import pytest

import rnndsl
from rnndsl.peer_cells import HAND_CELLS, hand_cell, unstack

torch = pytest.importorskip("torch")
from rnndsl import peers  # noqa: E402  (imports torch)

T, B, I, H = 6, 3, 4, 5  # I != H: a transposed or misplaced weight fails


def reference(spec: str, seed: int = 3):
    """rnndsl's cell, parameters moved off their init (gains of one and zero biases would
    hide a swapped gain or bias), an input, and the cell's outputs and gradients."""
    cell = rnndsl.compile(spec)
    rng = np.random.default_rng(seed)
    sizes = {s: (I if s == "input" else H) for s in cell.sizes}
    params = {p: v + 0.3 * rng.standard_normal(v.shape)
              for p, v in cell.init_params(dtype=np.float64, seed=seed, **sizes).items()}
    xs = {x: rng.standard_normal((T, B, sizes[n])) for x, n in cell.inputs.items()}
    fwd = cell.forward(params, xs)
    grads = cell.backward(params, fwd, {o: np.ones_like(v) for o, v in fwd.outputs.items()})
    return cell, params, xs, sizes, fwd.outputs, grads


def torch_run(model, xs, sizes):
    """Outputs and gradients (by the model's parameter names, and by input) of a torch peer."""
    txs = {k: torch.tensor(v, requires_grad=True) for k, v in xs.items()}
    outs = model(txs, sizes)
    sum(o.sum() for o in outs.values()).backward()
    return ({o: v.detach().numpy() for o, v in outs.items()},
            {k: p.grad.numpy() for k, p in model.weights.items()},
            {k: v.grad.numpy() for k, v in txs.items()})


def check(outs, d_params, d_inputs, want_outs, grads):
    for o, v in want_outs.items():
        np.testing.assert_allclose(outs[o], v, rtol=1e-10, atol=1e-12, err_msg=o)
    assert set(d_params) == set(grads.params)
    for p, g in grads.params.items():
        np.testing.assert_allclose(d_params[p], g, rtol=1e-9, atol=1e-11, err_msg=f"d_{p}")
    for x, g in grads.inputs.items():
        np.testing.assert_allclose(d_inputs[x], g, rtol=1e-9, atol=1e-11, err_msg=f"d_{x}")


@pytest.mark.parametrize("spec", sorted(HAND_CELLS))
def test_hand_written_torch_loop_matches_rnndsl(spec):
    cell, params, xs, sizes, want, grads = reference(spec)
    hand = hand_cell(cell)
    assert hand is HAND_CELLS[spec]
    model = peers.eager_peer(cell, params)
    assert isinstance(model, peers.HandLoop)
    outs, d_stacked, d_inputs = torch_run(model, xs, sizes)
    check(outs, unstack(hand, d_stacked, params), d_inputs, want, grads)


def test_compiled_loop_matches_rnndsl():
    """torch.compile of the step (Inductor's generated code) computes the same; one cell,
    as compiling is slow."""
    cell, params, xs, sizes, want, grads = reference("peephole_lstm")
    torch._dynamo.reset()
    model = peers.eager_peer(cell, params, compiled=True)
    outs, d_stacked, d_inputs = torch_run(model, xs, sizes)
    check(outs, unstack(hand_cell(cell), d_stacked, params), d_inputs, want, grads)


@pytest.mark.parametrize("spec", ["lstm", "gru_cho", "jordan", "layernorm_lstm", "lstm_concat"])
def test_generic_eager_loop_matches_rnndsl(spec):
    """EagerLoop, the peer of specs without a hand-written one (stacked per-step products)."""
    cell, params, xs, sizes, want, grads = reference(spec)
    outs, d_params, d_inputs = torch_run(peers.EagerLoop(cell, params), xs, sizes)
    check(outs, d_params, d_inputs, want, grads)


def test_only_the_builtin_equations_get_a_hand_written_peer(tmp_path):
    text = (rnndsl.compiler.builtin_specs()["indrnn"].read_text()
            .replace("relu(W @ x + u * h_prev + b)", "tanh(W @ x + u * h_prev + b)"))
    path = tmp_path / "indrnn.yaml"
    path.write_text(text)
    cell = rnndsl.compile(str(path))
    assert cell.name == "indrnn" and hand_cell(cell) is None
    assert isinstance(peers.eager_peer(cell, cell.init_params(input=I, hidden=H)),
                      peers.EagerLoop)


@pytest.fixture
def jax_x64():
    jax = pytest.importorskip("jax")  # an optional benchmark extra, not a test dependency
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield jax
    jax.config.update("jax_enable_x64", previous)


@pytest.mark.parametrize("spec", sorted(HAND_CELLS))
def test_jax_scan_matches_rnndsl(spec, jax_x64):
    from rnndsl import jax_peers
    from rnndsl.peer_cells import stack

    cell, params, xs, sizes, want, grads = reference(spec)
    hand = hand_cell(cell)
    forward, gradients = jax_peers.compiled(hand, H)
    w = stack(hand, {p: jax_x64.numpy.asarray(v) for p, v in params.items()},
              jax_x64.numpy.concatenate)
    x = jax_x64.numpy.asarray(xs["x"])
    d_w, d_x = gradients(w, x)
    check({"h": np.asarray(forward(w, x))}, unstack(hand, {k: np.asarray(v) for k, v in d_w.items()},
                                                  params),
          {"x": np.asarray(d_x)}, want, grads)
