"""The differential fuzzer: random valid specs (tests/specgen.py) run by the CPU kernels and by
the NumPy reference, float64, forward and backward, at B = 3 with per-sequence lengths (one of
them 0), half of the specs with the time loop cut into one-row chunks on threads, with every
scratch buffer of the kernels filled with NaN (rnndsl.backend.scratch) so that a read before a
write cannot pass by luck. (The CUDA kernels get the same in tests/test_cuda.py,
in the simulator.)

By default a small batch with fixed seeds runs (12 specs, about a minute); thousands run with
`python -m pytest tests/test_differential.py --fuzz-specs 2000 -s`, which prints a report
(`--fuzz-seconds` puts a time box on it, `--fuzz-seed` moves the first seed). Cells with a
matrix-valued state (specgen.random_matrix_spec) run the same way, a quarter as many (each
compiles longer), cells whose square matrices are mostly block-diagonal
(`random_spec(seed, blocks=True)`), half as many, and a quarter as many vector cells at
T = 8, B = 10 with every size 32, where the products over all T*B rows take the micro-kernel.
"""
import re
import time
from contextlib import contextmanager

import numpy as np
import pytest

import rnndsl
from rnndsl.backend import panel_gemm, row_threads
from rnndsl.backend.scratch import nan_scratch

from engines import differences
from specgen import BLOCK_SIZES, random_matrix_spec, random_spec

TOLERANCE = 1e-9
FLOOR = 1e-3  # values are O(1): below this, differences are rounding in a cancellation


@contextmanager
def one_row_chunks(on: bool):
    """The CPU time loops on one thread per batch row (rnndsl.backend.row_threads), for half
    of the specs; the other half run all rows in one chunk."""
    if not on:
        yield
        return
    before = row_threads.MIN_ROWS
    row_threads.MIN_ROWS = 1
    row_threads.set_loop_threads(8)
    try:
        yield
    finally:
        row_threads.MIN_ROWS = before
        row_threads.set_loop_threads(None)


def check_spec(seed: int, target: str = "cpu", T: int = 4, B: int = 3, lengths=(4, 2, 0),
               generate=random_spec, sizes: tuple = (), **compile_args) -> list[str]:
    """Problems found with the spec of `seed` on `target`, as readable lines (none: agreed).
    `sizes`: engines.problem's (first size, step), else its own or BLOCK_SIZES."""
    text = generate(seed)
    try:
        cell = rnndsl.compile(text, target=target, **compile_args)
        ref = rnndsl.compile(text, target="reference")
        blocks = any(info.blocks > 1 for info in ref.params.values())
        with np.errstate(all="ignore"), nan_scratch(), one_row_chunks(seed % 2 == 0):
            diffs = differences(cell, ref, T, B, list(lengths), floor=FLOOR,
                                problem_args=sizes or (BLOCK_SIZES if blocks else ()))
    except Exception as exc:  # a valid spec must compile and run
        return [f"seed {seed}: {type(exc).__name__}: {exc}\n{text}"]
    bad = {k: v for k, v in diffs.items() if not v <= TOLERANCE}
    return [f"seed {seed}: {k} differs by {v:.3g}\n{text}" for k, v in bad.items()][:1]


def random_block_spec(seed: int) -> str:
    return random_spec(seed, blocks=True)


# every size 32 and T * B = 80 rows: the products over all rows (input products, input
# gradients) take the micro-kernel (panel_gemm.py), which the small problems above leave to
# BLAS, with its rule's size lowered (it takes only large products on rnndsl's own threads)
PANELS = dict(T=8, B=10, lengths=(8, 3, 0, 8, 5, 1, 8, 2, 7, 6), sizes=(32, 0))


@pytest.mark.parametrize("generate, share, problem", [
    (random_spec, 1, {}), (random_matrix_spec, 4, {}), (random_block_spec, 2, {}),
    (random_spec, 4, PANELS)], ids=["vectors", "matrices", "blocks", "vectors-panels"])
def test_generated_specs_agree_with_the_reference(request, monkeypatch, generate, share,
                                                  problem):
    if problem is PANELS:
        monkeypatch.setattr(panel_gemm, "OWN_THREADS_MIN_WORK", 0)
    first = request.config.getoption("--fuzz-seed")
    count = max(1, request.config.getoption("--fuzz-specs") // share)
    budget = request.config.getoption("--fuzz-seconds")
    start, tried, problems = time.monotonic(), 0, []
    while tried < count and not (budget and time.monotonic() - start > budget):
        problems += check_spec(first + tried, generate=generate, **problem)
        tried += 1
    print(f"\ndifferential fuzzer: {tried} generated specs (seeds {first}..{first + tried - 1}) "
          f"in {time.monotonic() - start:.0f} s, {len(problems)} disagreeing")
    assert not problems, "\n\n".join(problems[:5])
    assert tried >= 1


def test_the_matrix_generator_covers_the_matrix_language():
    texts = "\n".join(random_matrix_spec(seed) for seed in range(40))
    for construct in ["outer(", ").T @ (", ") @ (", "sum(", "mean(", "norm(", "softmax(",
                      ", key)", ", value)", "tanh(M", "M_prev", "M, value", "[h, M", "shift("]:
        assert construct in texts, construct


def test_the_block_generator_makes_block_diagonal_matrices_and_keeps_the_rest():
    texts = [random_block_spec(seed) for seed in range(40)]
    assert "blocks: 2}" in "".join(texts) and "blocks: 4}" in "".join(texts)
    assert sum("blocks:" in t for t in texts) >= 15
    for seed, text in enumerate(texts):  # the same spec, but for the blocks
        assert re.sub(r", blocks: \d", "", text) == random_spec(seed)


def test_generator_covers_the_language():
    """The batch above is only as good as what the generator writes."""
    texts = "\n".join(random_spec(seed) for seed in range(40))
    for construct in ["sigmoid(", "tanh(", "relu(", "exp(", "log(", "softplus(", "hard_sigmoid(",
                      "abs(", "sqrt(", "softmax(", "sum(", "mean(", "max(", "min(", " ** ", " / ",
                      "@ (", "output", "u: ", "c: ", "shape: []", "y = W", "h = W", "1e300",
                      "1e-300", "_prev"]:
        assert construct in texts, construct


@pytest.mark.parametrize("seed", range(3))
def test_a_broken_kernel_is_caught(seed, monkeypatch):
    """The comparison can fail: a kernel with a wrong derivative rule is reported."""
    from rnndsl.symbolic import ops

    tanh = ops.OPS["tanh"]
    monkeypatch.setitem(ops.OPS, "tanh", ops.Op(tanh.numpy, tanh.grad, "sigmoid({0})"))
    found = [s for s in range(seed * 20, seed * 20 + 20) if "tanh(" in random_spec(s)][:2]
    assert any(check_spec(s) for s in found)
