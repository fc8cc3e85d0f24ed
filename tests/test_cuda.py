"""The CUDA target against the NumPy reference, in Numba's CUDA simulator (no GPU needed).

NUMBA_ENABLE_CUDASIM must be set before Numba's CUDA support is first imported, so in an
ordinary test run this module only runs itself again in a subprocess with the variable set
(`test_cuda_kernels_in_simulator`); there (or when the variable is already set, or with
RNNDSL_TEST_GPU=1 on a machine with a GPU) the real tests below run: every built-in spec,
plus cells that exercise what the built-in ones may not (phase splits, row reductions,
softmax, scalar parameters, two inputs, a hoisted computed vector), forward and backward,
per-step launches and the persistent kernel (one block in the simulator), float64 to 1e-10,
with per-sequence lengths. Sizes are tiny: the simulator runs one Python thread per GPU thread.
"""
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tokenize
from pathlib import Path

import numpy as np
import pytest

import rnndsl
from rnndsl.backend import emit_cuda
from rnndsl.backend.kernel_lib import kernel_functions
from rnndsl.backend.scratch import nan_scratch
from rnndsl.symbolic.rank2 import block_diagonal

from engines import differences, long_checks, problem
from test_block_kernels import CELLS as BLOCK_CELLS
from test_differential import check_spec, random_block_spec
from test_ops import CALLS as OP_CALLS
from test_ops import cell_text as op_cell_text

ON_DEVICE = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1" or os.environ.get("RNNDSL_TEST_GPU") == "1"

EXTRA = {  # cells beyond the built-in specs, for the shapes of plan they make
    "x_gru_split": """
name: x_gru_split
summary: GRU with the reset gate inside the product (two GEMM stages, a vector kept for dW)
sizes: [input, hidden]
inputs: {x: input}
states: {h: hidden}
outputs: [h]
equations: |
  r = sigmoid(W_r @ x + U_r @ h_prev + b_r)
  z = sigmoid(W_z @ x + U_z @ h_prev + b_z)
  n = tanh(W_n @ x + U_n @ (r * h_prev) + b_n)
  h = (1 - z) * n + z * h_prev
""",
    "x_ln_lstm": """
name: x_ln_lstm
summary: LSTM with layer norm on the cell (row reductions, one block per batch row)
sizes: [input, hidden]
inputs: {x: input}
states: {h: hidden, c: hidden}
outputs: [h]
params:
  gamma: {init: ones}
equations: |
  i = sigmoid(W_i @ x + U_i @ h_prev + b_i)
  f = sigmoid(W_f @ x + U_f @ h_prev + b_f)
  g = tanh(W_g @ x + U_g @ h_prev + b_g)
  o = sigmoid(W_o @ x + U_o @ h_prev + b_o)
  c = f * c_prev + i * g
  d = c - mean(c)
  h = o * tanh(gamma * d / sqrt(mean(d * d) + 0.00001) + beta)
""",
    "x_jordan": """
name: x_jordan
summary: Jordan network with a softmax output and a row max (three sizes, two outputs)
sizes: [input, hidden, output]
inputs: {x: input}
states: {y: output}
outputs: [y, h]
params:
  W_h: {shape: [hidden, input]}
  U_h: {shape: [hidden, output]}
  W_y: {shape: [output, hidden]}
equations: |
  h = tanh(W_h @ x + U_h @ y_prev + b_h)
  y = softmax(W_y @ h + b_y) + 0.1 * max(h)
""",
    "x_indrnn": """
name: x_indrnn
summary: IndRNN-like cell with a scalar gain, two inputs and a hoisted tanh(x) (pre kernel)
sizes: [input, hidden]
inputs: {x: input, m: hidden}
states: {h: hidden}
outputs: [h]
params:
  a: {shape: [], init: {constant: 0.5}}
equations: |
  h = relu(W @ tanh(x) + u * h_prev + b) * a + softplus(m) * hard_sigmoid(h_prev) + abs(m) ** 2 + min(h_prev, m) - exp(-h_prev * h_prev)
""",
    "x_parts": """
name: x_parts
summary: LSTM with its gates cut from one product, and a vector of three elements indexed
sizes: [input, hidden]
inputs: {x: input}
states: {h: hidden, c: hidden}
outputs: [h]
params:
  W_s: {shape: [3, hidden]}
constants: {lam: 0.9}
equations: |
  [i, f, g, o] = W @ [h_prev, x, 1] + b
  s = softmax(W_s @ h_prev)
  c = sigmoid(f) * c_prev + sigmoid(i) * tanh(g) * s[0] + lam * s[2]
  h = sigmoid(o) * tanh(c) + V @ s
""",
}
# Cells with matrix values run one thread per batch row (their own tests, below)
MATRIX_SPECS = sorted(rnndsl.compiler.matrix_specs())
SPECS = {**{k: k for k in sorted(set(rnndsl.compiler.kernel_specs("cuda")) - set(MATRIX_SPECS))},
         **EXTRA}
# Cells with block-diagonal parameters run per step only: their plans have no persistent kernels
BLOCK_SPECS = {name for name, text in SPECS.items()
               if block_diagonal(rnndsl.compiler.analyse(text)[0])}


def identifiers(code: str) -> set[str]:
    """The NAME tokens of Python source (not comments, not strings)."""
    toks = tokenize.generate_tokens(io.StringIO(code).readline)
    return {t.string for t in toks if t.type == tokenize.NAME}


# -- always, in this process: the generated text (needs no Numba CUDA) -----------------------
@pytest.mark.parametrize("name", sorted(SPECS))
def test_generated_code_names_only_compiler_made_identifiers(name):
    cell = rnndsl.compile(SPECS[name], target="cuda")
    code = cell.engine.source_code("float64")
    user = set(cell.params) | set(cell.inputs) | set(cell.states) | set(cell.outputs) | \
        set(cell.sizes)
    library = emit_cuda.DEVICE_FUNCTIONS + kernel_functions("float64", "cuda")
    fixed = identifiers(library) | {"x", "y"}  # library names, blockIdx.y
    assert not (identifiers(code) & user) - fixed, (identifiers(code) & user) - fixed
    body = "\n".join(line for line in code.splitlines() if not line.startswith("#"))
    assert "numba" not in body.replace("rnndsl.backend.cuda_support", "")
    # one kernel per elementwise phase of each program, and two persistent kernels per pass
    # (none for block-diagonal parameters)
    phases = sum(1 for prog in (cell.plan.pre, cell.plan.forward, cell.plan.back)
                 if prog is not None for ph in prog.phases if ph.steps)
    assert len(re.findall(r"^def \w+_phase\d+\(", code, re.M)) == phases
    for kind in ("forward", "backward"):
        persistent = f"def {kind}_grid(" in code and f"def {kind}_block(" in code
        assert persistent == (name not in BLOCK_SPECS), name


@pytest.mark.parametrize("name", sorted(SPECS) + ["fuzz0", "fuzz1"])
def test_persistent_kernels_assign_none_of_their_arguments(name):
    """A kernel's own variables (loop indices, offsets into shared memory) must not take the
    name of an array it is given (x0 is both an input and a name a kernel might pick)."""
    import ast

    from test_differential import random_spec

    text = random_spec(int(name[4:])) if name.startswith("fuzz") else SPECS[name]
    code = rnndsl.compile(text, target="cuda").engine.source_code("float64")
    kernels = [f for f in ast.parse(code).body if isinstance(f, ast.FunctionDef) and
               f.name.endswith(("_grid", "_block"))]
    assert len(kernels) == (0 if name in BLOCK_SPECS else 4)
    for f in kernels:
        given = {a.arg for a in f.args.args}
        assigned = {n.id for n in ast.walk(f) if isinstance(n, ast.Name) and
                    isinstance(n.ctx, ast.Store)}
        assert not given & assigned, (f.name, given & assigned)


@pytest.mark.parametrize("name", MATRIX_SPECS)
def test_row_kernels_name_only_compiler_made_identifiers_and_assign_no_slices(name):
    """The row kernels of a cell with matrix values on cuda: compiler-made names only, and
    element stores only (loops where the cpu's row kernels assign slices)."""
    import ast

    cell = rnndsl.compile(name, target="cuda")
    code = cell.engine.source_code("float64")
    user = set(cell.params) | set(cell.inputs) | set(cell.states) | set(cell.outputs) | \
        set(cell.sizes)
    fixed = identifiers(kernel_functions("float64", "cuda"))
    assert not (identifiers(code) & user) - fixed, (identifiers(code) & user) - fixed
    kernels = [f for f in ast.parse(code).body if isinstance(f, ast.FunctionDef) and
               f.name.endswith("_rows")]
    assert [f.name for f in kernels] == ["forward_rows", "infer_rows", "backward_rows"]
    assert all(ast.unparse(f.decorator_list[0]) == "cuda.jit(cache=True)" for f in kernels)
    slices = [ast.unparse(n) for f in kernels for n in ast.walk(f) if isinstance(n, ast.Slice)]
    assert not slices, slices


def test_only_cuda_support_imports_numba_cuda():
    pkg = Path(rnndsl.__file__).parent
    importers = [p.name for p in pkg.rglob("*.py")
                 if re.search(r"^\s*(from numba import cuda|import numba\.cuda|from numba\.cuda|"
                              r"import numba_cuda)", p.read_text(), re.M)]
    assert importers == ["cuda_support.py"]


def test_block_diagonal_parameters_compile_for_cuda_by_their_blocks():
    """slstm's recurrent products, forward and backward, and its recurrent weights' gradients
    go through the block kernels; its dense input products stay GEMMs; the summary says that
    the time loop runs per step, and so does `rnndsl info`'s rule (persistent_grids)."""
    from typer.testing import CliRunner

    from rnndsl.cli import app

    assert "slstm" in rnndsl.compiler.kernel_specs("cuda") and "slstm" in BLOCK_SPECS
    result = CliRunner().invoke(app, ["compile", "slstm", "--target", "cuda", "--show", "code"])
    assert result.exit_code == 0, result.output
    assert "persistent kernel auto: never (block-diagonal parameters run per step" in \
        result.output
    code = result.output.split("def forward_steps(")[1]
    assert code.count("cs.block_product(") == 2 and code.count("cs.add_diagonal_block_grads(") == 4
    assert "cs.gemm(cs.flat(x0), cs.stack(" in code and "def forward_grid(" not in result.output
    cell = rnndsl.compile("slstm", target="cuda")
    assert emit_cuda.persistent_grids(cell.plan, {"input": 64, "hidden": 64}, 1, 4, 132,
                                      227 * 1024) == {"forward": ("per-step", 0),
                                                      "backward": ("per-step", 0)}


@pytest.mark.parametrize("mode", [True, "single-block", "multi-block"])
def test_a_persistent_mode_on_block_diagonal_parameters_is_refused_by_name(mode):
    with pytest.raises(ValueError, match=rf"persistent={mode!r}: slstm has block-diagonal "
                                         r"parameters \(parameter 'R_[zifo]' is block-diagonal "
                                         r"\(4 blocks\)\); block-diagonal parameters run per "
                                         "step; the persistent kernels take dense recurrent "
                                         r"weights only \(None or False\)"):
        rnndsl.compile("slstm", target="cuda", persistent=mode)
    for allowed in (None, False):
        assert rnndsl.compile("slstm", target="cuda", persistent=allowed).engine.persistent \
            is allowed


def test_cli_shows_cuda_code_and_persistent_rule():
    from typer.testing import CliRunner

    from rnndsl.cli import app

    result = CliRunner().invoke(app, ["compile", "lstm", "--target", "cuda", "--show", "code"])
    assert result.exit_code == 0, result.output
    assert "persistent kernel auto" in result.output
    assert "@cuda.jit" in result.output and "def forward_phase1(" in result.output


# The simulator's tests run in this many processes at once, each every SIM_SHARDS-th test
# (conftest.py): in one process they took 535 of the suite's 1057 s on 2 cores, the other
# pytest worker idle for the last few minutes.
SIM_SHARDS = 2


if not ON_DEVICE:
    def test_cuda_kernels_in_simulator():
        """Runs this file again with NUMBA_ENABLE_CUDASIM=1 in fresh interpreters, its tests
        shared between SIM_SHARDS of them; every shard must pass and run some."""
        procs = [subprocess.Popen(
            [sys.executable, "-m", "pytest", "-q", "-x", "-n", "0", "-p", "no:cacheprovider",
             __file__], env={**os.environ, "NUMBA_ENABLE_CUDASIM": "1",
                             "RNNDSL_SIM_SHARD": f"{k}/{SIM_SHARDS}"},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for k in range(SIM_SHARDS)]
        try:
            outputs = [proc.communicate(timeout=1200) for proc in procs]
        finally:
            for proc in procs:
                proc.kill()
        for k, (proc, (out, err)) in enumerate(zip(procs, outputs)):
            assert proc.returncode == 0, f"shard {k}: " + out[-6000:] + err[-3000:]
            assert re.search(r"\d+ passed", out), f"shard {k}: " + out[-2000:]


# -- on the device (the simulator, or a GPU) ------------------------------------------------
def compare(cuda_cell, ref, T, B, lengths, dtype=np.float64, tol=1e-10, problem_args=(2, 1)):
    """Every output, final state and gradient within `tol` of the reference, with the device's
    scratch buffers filled with NaN (`problem_args`: engines.problem's first size and step)."""
    with nan_scratch():
        diffs = differences(cuda_cell, ref, T, B, lengths, dtype, seed=T + B,
                            problem_args=problem_args)
    bad = {k: v for k, v in diffs.items() if not v < tol}
    assert not bad, bad


device = pytest.mark.skipif(not ON_DEVICE, reason="runs in the simulator subprocess")


@device
@pytest.mark.parametrize("name", sorted(rnndsl.builtin_tree_specs()))
def test_cuda_tree_cells_match_reference(name):
    """A batch of trees (a lone leaf, a full binary tree, a lopsided one; three children at a
    node where the cell takes any number), level by level on the device: every node's outputs
    and every gradient within 1e-10 of the reference, float64."""
    from rnndsl.engines.tree import TreeBatch

    rng = np.random.default_rng(5)
    parents = [[-1], [-1, 0, 0, 1, 1], [-1, 0, 1, 1, 0, 4]]
    if name == "child_sum_tree_lstm":
        parents[2] = [-1, 0, 0, 0, 1, 1]
    batch = TreeBatch.from_parents(parents, [rng.standard_normal((len(p), 2)) for p in parents])
    cells = [rnndsl.compile(name, target=t) for t in ("cuda", "reference")]
    params = cells[1].init_params(input=2, hidden=3, seed=1, dtype=np.float64)
    with nan_scratch():
        runs = [cell.forward(params, batch) for cell in cells]
        seed = rng.standard_normal(runs[1].output.shape)
        grads = [cell.backward(params, fwd, seed) for cell, fwd in zip(cells, runs)]
    np.testing.assert_allclose(runs[0].output, runs[1].output, rtol=0, atol=1e-10)
    for p in params:
        np.testing.assert_allclose(grads[0].params[p], grads[1].params[p], rtol=0, atol=1e-10)
    np.testing.assert_allclose(grads[0].inputs["x"], grads[1].inputs["x"], rtol=0, atol=1e-10)


def grid_of(mode):
    """Where a mode runs: the multi-block kernel on a simulated device of 3 multiprocessors
    whose blocks run concurrently (tests/cudasim_grid.py), the others as the simulator is."""
    if mode == "multi-block" and SIMULATOR:
        from cudasim_grid import concurrent_blocks

        return concurrent_blocks(3)
    return contextlib.nullcontext()


SIMULATOR = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
MODES = {"per-step": False, "single-block": "single-block", "multi-block": "multi-block"}


# Every spec on the per-step path; the persistent kernels on a sample of the plan shapes they
# treat apart (hidden units owned across gates: lstm, gru; a second product in the step:
# x_gru_split; columns split where no size is shared: layernorm_lstm, jordan), and on every
# spec with --long (the simulator runs each case in seconds).
PERSISTENT_SAMPLE = ["gru", "jordan", "layernorm_lstm", "lstm", "x_gru_split"]
# (Block-diagonal parameters need sizes their blocks divide: their own test, below.)
MODE_CASES = [(name, mode) for name in sorted(set(SPECS) - BLOCK_SPECS) for mode in sorted(MODES)
              if mode == "per-step" or long_checks() or name in PERSISTENT_SAMPLE]


@device
@pytest.mark.parametrize("name, mode", MODE_CASES)
def test_cuda_matches_reference(name, mode):
    """Hidden size 3: the multi-block kernel gives each of its 3 blocks one hidden unit (or
    a slice of the columns); lengths include 0."""
    cell = rnndsl.compile(SPECS[name], target="cuda", persistent=MODES[mode])
    ref = rnndsl.compile(SPECS[name], target="reference")
    with grid_of(mode):
        compare(cell, ref, 3, 2, [3, 0])
    assert cell.engine.last_variant == {"forward": mode, "backward": mode}
    if mode == "multi-block" and SIMULATOR:  # (fewer where a product has fewer columns)
        assert all(2 <= n <= 3 for n in cell.engine.last_blocks.values()), cell.engine.last_blocks


@device
def test_float32_and_auto_mode():
    cell = rnndsl.compile("lstm", target="cuda")  # auto: at tiny sizes one block is cheapest
    compare(cell, rnndsl.compile("lstm", target="reference"), 2, 2, None, np.float32, 1e-5)
    assert cell.engine.last_variant == {"forward": "single-block", "backward": "single-block"}


@device
@pytest.mark.parametrize("name", ["lstm", "delta_net"])
def test_without_input_gradients_the_rest_is_the_same(name):
    """input_grads=False skips the inputs' GEMM (the row kernels compute them either way)."""
    cell = rnndsl.compile(name, target="cuda", persistent=False)
    params, xs, state0 = problem(cell, 3, 2, seed=5)
    fwd = cell.forward(params, xs, state0, [3, 1])
    d_out = np.random.default_rng(0).standard_normal(fwd.output.shape)
    full = cell.backward(params, fwd, d_out)
    part = cell.backward(params, fwd, d_out, input_grads=False)
    assert part.inputs == {} and full.inputs
    for k in full.params:
        np.testing.assert_array_equal(part.params[k], full.params[k], err_msg=k)


@device
def test_time_loop_choice_follows_fit_and_cost():
    """cs.choose_time_loop on made-up devices, so that the answers do not depend on the one
    the tests run on: (K, N) = (64, 256) is an LSTM's recurrent product at H=64."""
    from rnndsl.backend import cuda_support as cs

    lstm = [(64, 256)]
    facts = dict(syncs=1, barriers=2, launches=2, elements=64, limit=132)

    def choose(mode, products=lstm, unit=64, batch=1, itemsize=4, shared=48 * 1024, **kw):
        args = {**facts, **kw}
        return cs.choose_time_loop(mode, products, unit, batch, itemsize, args["syncs"],
                                   args["barriers"], args["launches"], args["elements"],
                                   args["limit"], shared)

    # float32: 64 KiB of weights, past 48 KiB for one block; a 64-block grid owns one unit
    # of every gate per block (4 columns of 64 words, padded)
    stride = cs.column_stride(64)
    assert stride // cs.LANES % 2 == 1 and 64 <= stride < 64 + 2 * cs.LANES
    assert choose("multi-block") == ("multi-block", 64, 1, (4 * stride + 64) * 4)
    with pytest.raises(ValueError, match="single-block kernel needs more shared memory"):
        choose("single-block")
    assert choose("single-block", shared=227 * 1024)[:2] == ("single-block", 1)
    # rows of the vector staged at once: as many as the room left holds, at most B
    assert choose("single-block", batch=3, shared=227 * 1024)[2] == 3
    assert choose("single-block", batch=1000, shared=(256 * stride + 24 * 64) * 4)[2] == 24
    with pytest.raises(ValueError, match="needs two co-resident blocks"):
        choose("multi-block", limit=1)
    with pytest.raises(ValueError, match="persistent kernel does not fit"):
        choose(True, products=[(4096, 16384)], unit=4096, limit=2)
    assert choose(False) == ("per-step", 0, 0, 0)
    # the auto mode takes the cheapest by the cost model, and the per-step path where no
    # persistent kernel fits
    assert choose(None)[0] == "multi-block"  # one grid sync (1.4 us) against two launches
    assert choose(None, products=[(4096, 16384)], unit=4096, limit=2)[0] == "per-step"
    saved = dict(cs.COST)
    try:
        cs.COST["launch_us"] = 0.0  # launches for free: the per-step path wins
        assert choose(None)[0] == "per-step"
    finally:
        cs.COST.update(saved)


@device
def test_a_forced_kernel_that_does_not_fit_is_refused():
    from rnndsl.backend import cuda_support as cs

    cell = rnndsl.compile("lstm", target="cuda", persistent="single-block")
    # float64 weights of 4*H*H words: past this device's shared memory per block
    hidden = int((cs.shared_limit() / 8 / 4) ** 0.5) + 2
    params = cell.init_params(1, hidden, dtype=np.float64)
    with pytest.raises(ValueError, match="persistent kernel does not fit"):
        cell.forward(params, np.zeros((1, 1, 1)))


@device
def test_device_arrays_in_device_arrays_out():
    from rnndsl.backend import cuda_support as cs

    cell = rnndsl.compile("lstm", target="cuda", persistent=False)
    params, xs, state0 = problem(cell, 2, 1, seed=0, first_size=2, step=1)
    host = cell.forward(params, xs, state0)
    dev = cell.forward({p: cs.device(v) for p, v in params.items()},
                       {k: cs.device(v) for k, v in xs.items()},
                       {k: cs.device(v) for k, v in state0.items()})
    assert cs.is_device(dev.output)
    np.testing.assert_allclose(cs.host(dev.output), host.output, atol=1e-14)
    d_out = np.ones(host.output.shape)
    g_host = cell.backward(params, host, d_out)
    g_dev = cell.backward({p: cs.device(v) for p, v in params.items()}, dev, cs.device(d_out))
    for p in g_host.params:
        assert cs.is_device(g_dev.params[p])
        np.testing.assert_allclose(cs.host(g_dev.params[p]), g_host.params[p], atol=1e-14)


@device
@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("seed", range(4))
def test_generated_specs_agree_with_the_reference(seed, mode):
    """The differential fuzzer's specs (tests/test_differential.py) on the CUDA kernels."""
    with grid_of(mode):
        problems = check_spec(seed, "cuda", T=2, B=3, lengths=(2, 1, 0), persistent=MODES[mode])
    assert not problems, problems[0]


# tests/test_block_kernels.py's cells, and slstm at one head (dense R: the persistent kernels
# run it)
BLOCK_CASES = {**BLOCK_CELLS, "slstm 1 head of 4": ("slstm", {"heads": 1}, (3, 1))}


@device
@pytest.mark.parametrize("name", sorted(BLOCK_CASES))
def test_block_diagonal_parameters_match_the_reference(name):
    """Block-diagonal parameters wherever the schedule puts a product (slstm at 5, 4 and 3
    heads: blocks 1, 2 and 4 wide; a GRU whose products take h_prev and r * h_prev; a
    product of the input over all rows and its deferred gradient; a stack of dense and
    block-diagonal weights with blocks of two sizes), per step in the auto mode, float64,
    lengths including 0. The problem's parameters are random off the blocks too, so a match
    also shows that the kernels read the blocks alone."""
    text, constants, sizes = BLOCK_CASES[name]
    cell = rnndsl.compile(text, target="cuda", constants=constants)
    compare(cell, rnndsl.compile(text, target="reference", constants=constants), 3, 2, [3, 0],
            problem_args=sizes)
    blocks = block_diagonal(cell.step) is not None
    assert blocks == (name != "slstm 1 head of 4")
    if blocks:
        assert cell.engine.last_variant == {"forward": "per-step", "backward": "per-step"}


@device
def test_block_diagonal_parameters_in_float32_and_without_input_gradients():
    """float32 to 3e-5 (test_block_kernels.py's bound); without the inputs' gradients the
    block product of the deferred input gradient is skipped and the rest is the same."""
    text, constants, sizes = BLOCK_CELLS["mixed 2 and 4 heads"]
    cell = rnndsl.compile(text, target="cuda", constants=constants)
    ref = rnndsl.compile(text, target="reference", constants=constants)
    compare(cell, ref, 3, 2, [3, 1], np.float32, 3e-5, problem_args=sizes)
    params, xs, state0 = problem(cell, 2, 2, seed=3, first_size=sizes[0], step=sizes[1])
    f = cell.forward(params, xs, state0, [2, 1])
    full = cell.backward(params, f, np.ones_like(f.output))
    part = cell.backward(params, f, np.ones_like(f.output), input_grads=False)
    assert part.inputs == {} and full.inputs
    for p in full.params:
        np.testing.assert_array_equal(part.params[p], full.params[p], err_msg=p)


# the first seeds whose generated spec has a block-diagonal parameter
BLOCK_SEEDS = [seed for seed in range(40) if "blocks:" in random_block_spec(seed)][:3]


@device
@pytest.mark.parametrize("seed", BLOCK_SEEDS)
def test_generated_block_specs_agree_with_the_reference(seed):
    """The differential fuzzer's block-diagonal specs (tests/test_differential.py)."""
    problems = check_spec(seed, "cuda", T=2, B=3, lengths=(2, 1, 0),
                          generate=random_block_spec)
    assert not problems, problems[0]


# The simulator runs a cell in seconds whatever its size: six operators to a cell, each with its
# own weight, so that a wrong value or derivative of any one of them shows in the gradients.
OP_GROUPS = [sorted(OP_CALLS)[k:k + 6] for k in range(0, len(OP_CALLS), 6)]


@device
@pytest.mark.parametrize("calls", OP_GROUPS, ids=lambda group: f"{group[0]}..{group[-1]}")
def test_every_operator_agrees_with_the_reference(calls):
    """The operator table of tests/test_ops.py on the CUDA kernels."""
    text = op_cell_text(" + ".join(f"{0.1 * (k + 2):.1f} * ({OP_CALLS[c]})"
                                   for k, c in enumerate(calls)))
    compare(rnndsl.compile(text, target="cuda", persistent=False),
            rnndsl.compile(text, target="reference"), 2, 3, [2, 1, 0])


@device
@pytest.mark.parametrize("hidden, shared, limit, free_launches, expected",
                         [(2, None, None, False, ("single-block", 1)),
                          (3, 300, None, False, ("multi-block", 3)),
                          (5, 300, 1, False, ("per-step", 0)),
                          (2, None, None, True, ("per-step", 0))],
                         ids=["one-block", "grid", "weights-too-big", "launches-free"])
def test_info_tells_the_time_loop_that_auto_mode_takes(hidden, shared, limit, free_launches,
                                                      expected):
    """`rnndsl info`'s answer (emit_cuda.persistent_grids) is what the glue runs, on this
    device or on one made up by replacing what cuda_support reads of it: one block at tiny
    sizes; a grid of one block per hidden unit when a block has 300 bytes of shared memory
    (float64, H=3: the weights take 288 bytes in one block, 96 in each of three); the per-step
    path when no kernel fits (H=5: 800 bytes of weights, 300 per block and one block), or
    when the cost model makes launches free."""
    from rnndsl.backend import cuda_support as cs

    cell = rnndsl.compile("lstm", target="cuda")
    params = cell.init_params(3, hidden, dtype=np.float64)
    x = np.zeros((2, 2, 3))
    saved = dict(cs.COST), cs.shared_limit, cs.cooperative_blocks
    try:
        if shared:
            cs.shared_limit = lambda: shared
        if limit:
            cs.cooperative_blocks = lambda kernel, threads: limit
        if free_launches:
            cs.COST["launch_us"] = 0.0
        with grid_of(expected[0]):
            fwd = cell.forward(params, x)
            cell.backward(params, fwd, np.ones(fwd.output.shape))
            told = emit_cuda.persistent_grids(cell.engine.plan, {"input": 3, "hidden": hidden},
                                              2, 8, cs.cooperative_blocks(None, cs.THREADS),
                                              cs.shared_limit())
    finally:
        cs.COST.update(saved[0])
        cs.shared_limit, cs.cooperative_blocks = saved[1:]
    ran = {p: (cell.engine.last_variant[p], cell.engine.last_blocks[p]) for p in told}
    assert told == ran == {"forward": expected, "backward": expected}


# -- the PyTorch bridge on the CUDA target ---------------------------------------------------
# In the simulator the tensors are CPU tensors, copied through the simulated device; on a GPU,
# tests/test_torch_cuda.py runs the same bridge on CUDA tensors.
@device
def test_bridge_on_a_cuda_cell_matches_the_cpu_target():
    torch = pytest.importorskip("torch")
    import rnndsl.torch as rt

    torch.manual_seed(0)
    on_cuda = rt.RNN("gru", 3, 4, num_layers=2, bidirectional=True, target="cuda",
                     dtype=torch.float64)
    on_cpu = rt.RNN("gru", 3, 4, num_layers=2, bidirectional=True, dtype=torch.float64)
    on_cpu.load_state_dict(on_cuda.state_dict())
    x = torch.randn(4, 3, 3, dtype=torch.float64)
    packed = torch.nn.utils.rnn.pack_padded_sequence(x, torch.tensor([4, 1, 3]),
                                                     enforce_sorted=False)
    results = []
    for module in (on_cuda, on_cpu):
        y, h = module(packed)
        (y.data.sum() + h.square().sum()).backward()
        results.append((y.data, h, [p.grad for p in module.parameters()]))
    (y1, h1, g1), (y2, h2, g2) = results
    torch.testing.assert_close(y1, y2, rtol=0, atol=1e-12)
    torch.testing.assert_close(h1, h2, rtol=0, atol=1e-12)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@device
def test_a_cell_retargeted_to_cuda_matches_the_reference():
    cell = rnndsl.compile("peephole_lstm")
    twin = rnndsl.compiler.retarget(cell, "cuda", persistent=False)
    assert twin.engine.name == "cuda" and twin.plan is cell.plan
    compare(twin, rnndsl.compile("peephole_lstm", target="reference"), 3, 2, [3, 1])


# -- cells with matrix values: one thread per batch row (emit_rows.py on cuda) ----------------
@contextlib.contextmanager
def stores_of_one_element():
    """In the simulator: every store a kernel makes writes one element (the simulator would
    run a slice or a whole-row assignment, which real CUDA may not lower)."""
    if not SIMULATOR:
        yield
        return
    from numba.cuda.simulator.cudadrv.devicearray import FakeWithinKernelCUDAArray as InKernel

    plain = InKernel.__setitem__

    def one_element(self, idx, value):
        assert np.ndim(value) == 0 and np.ndim(self._item._ary[idx]) == 0, idx
        plain(self, idx, value)

    InKernel.__setitem__ = one_element
    try:
        yield
    finally:
        InKernel.__setitem__ = plain


# Compiled for a GPU (Numba and NVVM, for sm_90), mlstm's backward row kernel took 62 s here
# and the NTM's 419 s (the simulator compiles nothing): on a GPU their cases run with --long.
SLOW_TO_COMPILE = {"mlstm", "ntm"}


def skip_slow_compiles_on_a_gpu(name: str):
    if name in SLOW_TO_COMPILE and not SIMULATOR and not long_checks():
        pytest.skip(f"{name}'s CUDA kernels take minutes to compile: --long")


@device
@pytest.mark.parametrize("name", MATRIX_SPECS)
def test_cuda_row_kernels_match_the_reference(name):
    """Every built-in cell with matrix values: outputs, final states and every gradient within
    1e-10 of the reference, float64, T=3, B=2 with lengths 3 and 1, sizes 2 to 5 (the NTM's
    4 slots of width 5). Against the reference rather than the cpu target: compiling the
    cpu's row kernels of the NTM alone takes minutes, and test_kernels.py holds the cpu target
    to the same reference."""
    skip_slow_compiles_on_a_gpu(name)
    cell = rnndsl.compile(name, target="cuda")
    with stores_of_one_element():
        compare(cell, rnndsl.compile(name, target="reference"), 3, 2, [3, 1])
    assert cell.engine.last_variant == {"forward": "per-row", "backward": "per-row"}


@device
@pytest.mark.parametrize("name", ["fast_weights", "mlstm"])
def test_cuda_row_kernels_recompute_matrix_states_to_the_same_gradients(name):
    """A tape budget of 0 keeps the matrix states (fast_weights' one beside a vector state,
    mlstm's two) only at step 0 of 3 (every 3 steps, the least memory at T=3, B=2), so
    backward recomputes them; the results are those of keeping every step."""
    from engines import relative

    skip_slow_compiles_on_a_gpu(name)
    kept = rnndsl.compile(name, target="cuda")
    recomputed = rnndsl.compile(name, target="cuda", tape_budget=0)
    params, xs, state0 = problem(kept, 3, 2, seed=1, first_size=2, step=1)
    rng = np.random.default_rng(2)
    runs = []
    for cell in (kept, recomputed):
        fwd = cell.forward(params, xs, state0, lengths=[3, 1])
        if not runs:
            d_out = {o: rng.standard_normal(v.shape) for o, v in fwd.outputs.items()}
            d_states = {s: rng.standard_normal(v.shape) for s, v in fwd.states.items()}
        grads = cell.backward(params, fwd, d_out, d_states)
        runs.append((fwd.tape.saved[0][-1], {**fwd.outputs, **fwd.states}, {
            f"{group} {k}": v for group in ("params", "inputs", "state0")
            for k, v in getattr(grads, group).items()}))
    (every_kept, results_kept, grads_kept), (every, results, grads) = runs
    assert (every_kept, every) == (1, 3)
    for k, v in {**results, **grads}.items():
        assert relative(v, {**results_kept, **grads_kept}[k]) < 1e-12, k


@device
def test_cuda_row_kernels_in_float32():
    """The float32 module of a matrix cell (its constants, arrays and GEMMs in float32)."""
    cell = rnndsl.compile("delta_net", target="cuda")
    compare(cell, rnndsl.compile("delta_net", target="reference"), 3, 2, [3, 1], np.float32,
            1e-5)


@device
def test_cuda_row_kernels_take_and_give_device_arrays():
    """Device arrays in give device arrays out, equal to a run on host arrays; and inference
    (save=False, the infer kernel) gives the same outputs."""
    from rnndsl.backend import cuda_support as cs

    cell = rnndsl.compile("fast_weights", target="cuda")
    params, xs, state0 = problem(cell, 2, 2, seed=0, first_size=2, step=1)
    on_device = [{k: cs.device(v) for k, v in d.items()} for d in (params, xs, state0)]
    host = cell.forward(params, xs, state0, lengths=[2, 1])
    dev = cell.forward(*on_device, lengths=[2, 1])
    inferred = cell.forward(params, xs, state0, lengths=[2, 1], save=False)
    assert inferred.tape is None
    for k in host.outputs:
        assert cs.is_device(dev.outputs[k])
        np.testing.assert_allclose(cs.host(dev.outputs[k]), host.outputs[k], rtol=0, atol=1e-14)
        np.testing.assert_array_equal(inferred.outputs[k], host.outputs[k])
    for k in host.states:
        assert cs.is_device(dev.states[k])
        np.testing.assert_allclose(cs.host(dev.states[k]), host.states[k], rtol=0, atol=1e-14)
    d_out = np.ones(host.output.shape)
    g_host = cell.backward(params, host, d_out)
    g_dev = cell.backward(on_device[0], dev, cs.device(d_out))
    for group in ("params", "inputs", "state0"):
        for k, v in getattr(g_host, group).items():
            assert cs.is_device(getattr(g_dev, group)[k]), (group, k)
            np.testing.assert_allclose(cs.host(getattr(g_dev, group)[k]), v, rtol=0, atol=1e-14,
                                       err_msg=f"{group} {k}")


@pytest.mark.skipif(ON_DEVICE, reason="runs once, outside the simulator subprocess")
def test_the_device_check_script_dry_runs_in_the_simulator(tmp_path):
    """benchmarks/device_check.py, which a lent GPU runs once, must not fail on its first use:
    its two equality parts run here in the simulator at tiny sizes."""
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "device_check.py"
    done = subprocess.run([sys.executable, str(script), "--simulate", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["equality"]["status"] == "ok", (tmp_path / "equality.txt").read_text()
    found = json.loads((tmp_path / "equality.json").read_text())
    assert len(found) == 16 and all(v < 1e-12 for v in found.values()), found
    assert {"slstm tiny auto", "slstm tiny steps"} <= set(found), found
    assert "lstm tiny graph, last run uncaptured (Numba's CUDA simulator), vs uncaptured" in found
    assert summary["rows"]["status"] == "ok", (tmp_path / "rows.txt").read_text()
    found = json.loads((tmp_path / "rows.json").read_text())
    assert sorted(found) == ["delta_net T=3 B=2 every step kept",
                             "delta_net T=3 B=2 recomputed (tape budget 0)"], found
    assert all(v < 1e-12 for v in found.values()), found


@device
def test_nan_in_the_padding_of_device_arrays_reaches_no_gradient():
    from rnndsl.backend import cuda_support as cs

    cell = rnndsl.compile("lstm", target="cuda", persistent=False)
    rng = np.random.default_rng(0)
    params = {p: cs.device(v) for p, v in cell.init_params(3, 4, dtype=np.float64).items()}
    x = rng.standard_normal((5, 2, 3))
    lengths = [5, 2]
    clean = cell.backward(params, cell.forward(params, cs.device(x), lengths=lengths),
                          cs.device(np.ones((5, 2, 4))))
    x[2:, 1] = np.nan
    x[3, 1, 0] = np.inf
    dirty = cs.device(x)
    grads = cell.backward(params, cell.forward(params, dirty, lengths=lengths),
                          cs.device(np.ones((5, 2, 4))))
    for p in params:
        np.testing.assert_allclose(cs.host(grads.params[p]), cs.host(clean.params[p]),
                                   rtol=1e-12, err_msg=p)
    assert not np.isfinite(cs.host(dirty)[2:, 1]).any()  # the caller's array is left as it was


# -- the time loop as a CUDA graph -------------------------------------------------------------
# The simulator cannot capture: there the choice says so and every loop runs uncaptured. The
# cache's own path (static buffers, copies in and out, keys, eviction, a failed capture) runs
# here with a fake capture whose replay runs the recorded loop again on the graph's buffers.
class FakeGraphs:
    """A capture that keeps the recording function; its replay calls it."""

    def __init__(self, fail: bool = False):
        self.captures = self.replays = 0
        self.fail = fail

    def capture(self, record):
        self.captures += 1
        if self.fail:
            raise RuntimeError("operation not permitted when stream is capturing")
        return record

    def replay(self, graph, stream):
        self.replays += 1
        graph(stream)


@pytest.fixture
def fake_graphs(monkeypatch):
    from rnndsl.backend import cuda_graphs as cg

    def install(size=8, fail=False):
        fake = FakeGraphs(fail)
        cache = cg.GraphCache(size, capture=fake.capture, replay=fake.replay)
        monkeypatch.setattr(cg, "_CACHE", cache)
        monkeypatch.setattr(cg, "why_not", lambda: None)
        monkeypatch.setattr(cg, "_device", lambda: 0)
        return fake, cache

    return install


@device
@pytest.mark.skipif(os.environ.get("NUMBA_ENABLE_CUDASIM") != "1", reason="the simulator's")
def test_the_simulator_runs_every_time_loop_uncaptured():
    from rnndsl.backend import cuda_graphs as cg

    assert cg.why_not() == "Numba's CUDA simulator"
    cell = rnndsl.compile("lstm", target="cuda", persistent=False)
    params = cell.init_params(2, 3, dtype=np.float64)
    for _ in range(3):
        cell.forward(params, np.ones((2, 2, 2)))
        assert cg.last_run() == "uncaptured"


@device
@pytest.mark.parametrize("name", ["lstm", "x_ln_lstm", "gru 2 heads of 3"] + (
    ["gru", "x_gru_split", "x_jordan", "x_indrnn", "x_parts"] if long_checks() else []))
def test_a_graph_s_buffers_give_the_uncaptured_results(name, fake_graphs):
    """The first call of a shape runs uncaptured, the second on the graph's static buffers
    (and captures), the third replays: each time every output and gradient matches the
    reference, with scratch buffers (the graph's too) full of NaN, so a buffer the loop reads
    but the copy-in skips, or writes but the copy-out skips, shows (block products too: a GRU
    with block-diagonal recurrent matrices, of h_prev and of r * h_prev)."""
    from rnndsl.backend import cuda_graphs as cg

    fake, cache = fake_graphs()
    text, constants, sizes = BLOCK_CELLS.get(name, (SPECS.get(name), {}, (2, 1)))
    cell = rnndsl.compile(text, target="cuda", persistent=False, constants=constants)
    ref = rnndsl.compile(text, target="reference", constants=constants)
    runs = []
    for _ in range(3):
        compare(cell, ref, 3, 2, [3, 1], problem_args=sizes)
        runs.append(cg.last_run())  # the backward pass's
    assert runs == ["uncaptured", "captured", "replayed"]
    assert fake.captures == 2 and fake.replays == 2  # a graph per pass, each replayed once
    compare(cell, ref, 3, 2, [1, 0], problem_args=sizes)  # other lengths: the same graphs
    assert fake.captures == 2 and fake.replays == 4 and len(cache.graphs) == 2


@device
def test_a_tape_survives_the_next_forward_through_the_same_graph(fake_graphs):
    fake_graphs()
    cell = rnndsl.compile("gru", target="cuda", persistent=False)
    params = cell.init_params(2, 3, dtype=np.float64)
    rng = np.random.default_rng(0)
    xa, xb = rng.standard_normal((2, 4, 2, 2))
    seed = rng.standard_normal((4, 2, 3))
    want = cell.backward(params, cell.forward(params, xa), seed)  # first calls: uncaptured
    for _ in range(2):  # captured, then replayed
        first = cell.forward(params, xa)
        second = cell.forward(params, xb)
        got = cell.backward(params, first, seed)
        assert not np.allclose(first.output, second.output)
        for p in params:
            np.testing.assert_allclose(got.params[p], want.params[p], rtol=1e-13, atol=1e-15)


@device
def test_the_graph_cache_keeps_the_most_recently_used(fake_graphs):
    from rnndsl.backend import cuda_graphs as cg

    fake, cache = fake_graphs(size=2)
    cell = rnndsl.compile("elman", target="cuda", persistent=False)
    params = cell.init_params(2, 3, dtype=np.float64)

    def run(T):
        cell.forward(params, np.ones((T, 1, 2)), save=False)
        return cg.last_run()

    assert [run(2), run(2), run(3), run(3), run(2)] == \
        ["uncaptured", "captured", "uncaptured", "captured", "replayed"]
    assert [run(4), run(4)] == ["uncaptured", "captured"]  # evicts T=3, the least recent
    assert sorted(key[1] for key in cache.graphs) == [2, 4]
    assert [run(3), run(3), run(3)] == ["uncaptured", "captured", "replayed"]
    assert sorted(key[1] for key in cache.graphs) == [3, 4]
    cg.set_graph_cache_size(1)
    assert len(cache.graphs) == 1
    cg.set_graph_cache_size(0)
    assert not cache.graphs
    with pytest.raises(ValueError, match="0 or more"):
        cg.set_graph_cache_size(-1)


@device
def test_a_capture_that_fails_leaves_the_loop_uncaptured(fake_graphs):
    from rnndsl.backend import cuda_graphs as cg

    fake, cache = fake_graphs(fail=True)
    cell = rnndsl.compile("elman", target="cuda", persistent=False)
    ref = rnndsl.compile("elman", target="reference")
    compare(cell, ref, 2, 2, [2, 1])
    with pytest.warns(UserWarning, match="could not be captured.*not permitted"):
        compare(cell, ref, 2, 2, [2, 1])  # the forward's capture fails; the result stands
    compare(cell, ref, 2, 2, [2, 1])
    assert cg.last_run() == "uncaptured" and not cache.graphs and fake.captures == 1
    assert cache.failure == "a capture failed: RuntimeError: operation not permitted when " \
        "stream is capturing"


@device
def test_arrays_that_are_not_contiguous_run_uncaptured(fake_graphs):
    from rnndsl.backend import cuda_support as cs
    from rnndsl.backend import cuda_graphs as cg

    fake_graphs()
    cell = rnndsl.compile(EXTRA["x_indrnn"], target="cuda", persistent=False)
    params = cell.init_params(2, 3, dtype=np.float64)
    x, m = np.ones((2, 2, 2)), np.linspace(-1, 1, 24).reshape(2, 2, 6)
    strided = cs.device(m)[:, :, ::2]  # the phase kernels read it as it is
    assert not strided.is_c_contiguous()
    for _ in range(3):
        out = cell.forward(params, {"x": cs.device(x), "m": strided})
        assert cg.last_run() == "uncaptured"
    np.testing.assert_allclose(cs.host(out.output),
                               cell.forward(params, {"x": x, "m": m[:, :, ::2]}).output,
                               rtol=0, atol=1e-15)


@device
def test_the_graph_cache_size_comes_from_the_environment(monkeypatch):
    from rnndsl.backend import cuda_graphs as cg

    for text, size in (("", cg.DEFAULT_CACHE_SIZE), ("0", 0), ("3", 3)):
        monkeypatch.setenv("RNNDSL_CUDA_GRAPHS", text)
        assert cg._size_from_environment() == size
    monkeypatch.setenv("RNNDSL_CUDA_GRAPHS", "many")
    with pytest.warns(UserWarning, match="whole number"):
        assert cg._size_from_environment() == cg.DEFAULT_CACHE_SIZE


@device
def test_the_graph_choice_names_each_reason_not_to_capture(monkeypatch):
    """The reasons, most decisive first, each with everything after it allowed."""
    torch = pytest.importorskip("torch")
    from rnndsl.backend import cuda_graphs as cg
    from rnndsl.backend import cuda_support as cs

    monkeypatch.setattr(cs, "SIMULATOR", False)
    monkeypatch.setattr(cs, "_BACKEND", "torch")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    assert cg.why_not() is None
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert cg.why_not() == "the stream is already being captured"
    monkeypatch.setattr(cs, "_BACKEND", "cupy")
    assert cg.why_not() == "the GEMMs go through cupy, not PyTorch"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cg.why_not() == "PyTorch has no CUDA here"
    monkeypatch.setitem(sys.modules, "torch", None)
    assert cg.why_not() == "PyTorch is not installed"
    monkeypatch.setattr(cs, "SIMULATOR", True)
    assert cg.why_not() == "Numba's CUDA simulator"
    monkeypatch.setattr(cg._CACHE, "failure", "a capture failed: RuntimeError: no")
    assert cg.why_not() == "a capture failed: RuntimeError: no"
    monkeypatch.setattr(cg._CACHE, "size", 0)
    assert cg.why_not() == "turned off (RNNDSL_CUDA_GRAPHS=0)"
