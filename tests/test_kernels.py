"""The generated CPU kernels against the NumPy reference interpreter, for every built-in spec:
forward and backward, float64 to 1e-10 and float32 to 1e-5 relative, with and without
per-sequence lengths, one sequence and several."""
import numpy as np
import pytest

import rnndsl

SPECS = sorted(rnndsl.builtin_specs())


def relative(a, b) -> float:
    scale = max(np.abs(b).max(initial=0.0), 1e-30)
    return float(np.abs(np.asarray(a, np.float64) - b).max(initial=0.0) / scale)


def problem(cell, T, B, seed):
    rng = np.random.default_rng(seed)
    sizes = {s: 3 + 2 * k for k, s in enumerate(cell.sizes)}
    params = cell.init_params(seed=seed, dtype=np.float64, **sizes)
    params = {p: v + 0.1 * rng.standard_normal(v.shape) for p, v in params.items()}
    xs = {x: rng.standard_normal((T, B, sizes[n])) for x, n in cell.inputs.items()}
    state0 = {s: 0.5 * rng.standard_normal((B, sizes[n])) for s, n in cell.states.items()}
    return params, xs, state0


@pytest.fixture(scope="module", params=SPECS)
def cells(request):
    return rnndsl.compile(request.param), rnndsl.compile(request.param, target="reference")


@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-10), (np.float32, 1e-5)])
@pytest.mark.parametrize("T, B, lengths", [(5, 1, None), (6, 4, None), (6, 4, [6, 2, 0, 5])])
def test_kernels_match_reference(cells, dtype, tol, T, B, lengths):
    cpu, ref = cells
    params, xs, state0 = problem(ref, T, B, seed=T + B)
    cast = lambda d: {k: v.astype(dtype) for k, v in d.items()}  # noqa: E731
    # the reference runs in float64 on exactly the values the kernel sees
    p32, x32, s32 = cast(params), cast(xs), cast(state0)
    up = lambda d: {k: v.astype(np.float64) for k, v in d.items()}  # noqa: E731
    f_ref = ref.forward(up(p32), up(x32), up(s32), lengths)
    f_cpu = cpu.forward(p32, x32, s32, lengths)
    for o in f_ref.outputs:
        assert f_cpu.outputs[o].dtype == dtype
        assert relative(f_cpu.outputs[o], f_ref.outputs[o]) < tol, o
    for s in f_ref.states:
        assert relative(f_cpu.states[s], f_ref.states[s]) < tol, s

    rng = np.random.default_rng(1)
    d_out = {o: rng.standard_normal(v.shape) for o, v in f_ref.outputs.items()}
    d_fin = {s: rng.standard_normal(v.shape) for s, v in f_ref.states.items()}
    g_ref = ref.backward(up(p32), f_ref, d_out, d_fin)
    g_cpu = cpu.backward(p32, f_cpu, cast(d_out), cast(d_fin))
    for group in ("params", "inputs", "state0"):
        want, got = getattr(g_ref, group), getattr(g_cpu, group)
        assert set(want) == set(got)
        for k in want:
            assert got[k].shape == want[k].shape, (group, k)
            assert relative(got[k], want[k]) < tol, (group, k)


def test_padded_sequence_equals_running_it_alone():
    cell = rnndsl.compile("lstm")
    params, xs, state0 = problem(cell, 7, 3, seed=3)
    lengths = [7, 4, 1]
    full = cell.forward(params, xs, state0, lengths)
    d_out = np.random.default_rng(2).standard_normal(full.output.shape)
    grads = cell.backward(params, full, d_out)
    for b, n in enumerate(lengths):
        alone_x = {k: v[:n, b:b + 1] for k, v in xs.items()}
        alone_s = {k: v[b:b + 1] for k, v in state0.items()}
        alone = cell.forward(params, alone_x, alone_s)
        np.testing.assert_allclose(full.output[:n, b], alone.output[:, 0], atol=1e-12)
        assert not full.output[n:, b].any()  # padding gives zero outputs
        for s in alone.states:
            np.testing.assert_allclose(full.states[s][b], alone.states[s][0], atol=1e-12)
        g = cell.backward(params, alone, d_out[:n, b:b + 1])
        np.testing.assert_allclose(grads.inputs["x"][:n, b], g.inputs["x"][:, 0], atol=1e-12)
        assert not grads.inputs["x"][n:, b].any()
        for s in g.state0:
            np.testing.assert_allclose(grads.state0[s][b], g.state0[s][0], atol=1e-12)


@pytest.mark.parametrize("spec", ["lstm", "gru_cho", "layernorm_lstm"])
def test_inference_without_tape_gives_the_same_outputs(spec):
    cell = rnndsl.compile(spec)
    params, xs, state0 = problem(cell, 5, 3, seed=4)
    kept = cell.forward(params, xs, state0, [5, 3, 1])
    bare = cell.forward(params, xs, state0, [5, 3, 1], save=False)
    for o in kept.outputs:
        np.testing.assert_array_equal(kept.outputs[o], bare.outputs[o])
    for s in kept.states:
        np.testing.assert_array_equal(kept.states[s], bare.states[s])
    with pytest.raises(ValueError, match="save=False"):
        cell.backward(params, bare, np.ones_like(bare.output))
