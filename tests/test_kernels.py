"""The generated CPU kernels against the NumPy reference interpreter, for every built-in spec:
forward and backward, float64 to 1e-10 and float32 to 1e-5 relative, with and without
per-sequence lengths, one sequence and several."""
import numpy as np
import pytest

import rnndsl
from rnndsl.backend.scratch import nan_scratch

from engines import differences, long_checks, problem

SPECS = sorted(rnndsl.compiler.kernel_specs())  # matrix values too: test_matrix_kernels.py


# the problems' hidden size is 5: slstm's heads must divide it (its blocks are then 1 wide;
# wider ones: test_block_kernels.py)
CONSTANTS = {"slstm": {"heads": 5}}
# Their float32 kernels take minutes each to compile (their float64 ones run here and in
# test_matrix_kernels.py, test_row_threads.py and test_gradcheck.py): pytest --long.
LONG_FLOAT32 = {"ntm", "mlstm"}


@pytest.fixture(scope="module", params=SPECS)
def cells(request):
    constants = CONSTANTS.get(request.param)
    return (rnndsl.compile(request.param, constants=constants),
            rnndsl.compile(request.param, target="reference", constants=constants))


@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-10), (np.float32, 1e-5)])
@pytest.mark.parametrize("T, B, lengths", [(5, 1, None), (6, 4, None), (6, 4, [6, 2, 0, 5])])
def test_kernels_match_reference(cells, dtype, tol, T, B, lengths):
    """The reference runs in float64 on exactly the values the kernel sees; the kernels'
    scratch buffers start as NaN."""
    cpu, ref = cells
    if dtype == np.float32 and cpu.name in LONG_FLOAT32 and not long_checks():
        pytest.skip("float32 kernels of a matrix-memory cell: minutes to compile; run with --long")
    with nan_scratch():
        diffs = differences(cpu, ref, T, B, lengths, dtype, seed=T + B)
    bad = {k: v for k, v in diffs.items() if not v < tol}
    assert not bad, bad


def test_without_input_gradients_the_rest_is_the_same(cells):
    """input_grads=False (a network's first layer) skips the inputs' GEMM: the parameters' and
    initial states' gradients are those of a full backward pass, to the bit."""
    for cell in cells:
        params, xs, state0 = problem(cell, 6, 4, seed=8)
        fwd = cell.forward(params, xs, state0, [6, 2, 0, 5])
        d_out = {o: np.random.default_rng(3).standard_normal(v.shape)
                 for o, v in fwd.outputs.items()}
        full = cell.backward(params, fwd, d_out)
        part = cell.backward(params, fwd, d_out, input_grads=False)
        assert part.inputs == {} and set(full.inputs) == set(cell.inputs)
        for got, want in ((part.params, full.params), (part.state0, full.state0)):
            assert list(got) == list(want)
            for k in want:
                np.testing.assert_array_equal(got[k], want[k], err_msg=f"{cell.name} {k}")


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
