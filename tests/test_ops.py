"""Every operator of the language, because it exists: each user-callable function (primitive
or composite) in a cell, run by the reference, the CPU kernels (float64 and float32) and
finite differences. The CUDA kernels run the same table in tests/test_cuda.py (simulator).
A new record in ops.py is picked up here with no edit, unless its domain is restricted."""
import math

import numpy as np
import pytest

import rnndsl
from rnndsl.symbolic import ir, rank2
from rnndsl.language.check import FUNCTIONS
from rnndsl.engines.gradcheck import gradcheck
from rnndsl.symbolic.ops import MACROS, OPS
from rnndsl.backend.scratch import nan_scratch

from engines import differences

# Arguments, by position, as expressions of the cell's values (a, b: per-step vectors that
# depend on the input and the previous state). Functions with a restricted domain say so.
DOMAIN = {"log": ["1.5 + tanh(a)"], "sqrt": ["1.5 + tanh(a)"],
          "clip": ["a", "-0.3 + 0.1 * tanh(b)", "0.4 + sigmoid(b)"]}
DEFAULT_ARGS = ["a", "b", "0.2 * b"]
MATRIX_KINDS = ("matrix", "axis", "shift")  # reference target only: tests/test_matrix*.py


def calls() -> dict[str, str]:
    """One call of every user-callable function of vectors, at each number of arguments it
    takes (the functions of matrices, which only the reference engine runs, are
    tests/test_matrix.py's)."""
    out = {}
    for name, forms in FUNCTIONS.items():
        for arity, (_, kind) in forms.items():
            if kind in MATRIX_KINDS:
                continue
            args = DOMAIN.get(name, DEFAULT_ARGS)[:arity]
            out[f"{name}/{arity}"] = f"{name}({', '.join(args)})"
    return out


def cell_text(call: str) -> str:
    return f"""
name: op_cell
sizes: [input, hidden]
inputs: {{x: input}}
states: {{h: hidden}}
params: {{W: {{shape: [hidden, input]}}, V: {{shape: [hidden, input]}}, g: {{shape: [hidden]}}}}
equations: |
  a = W @ x + U @ h_prev + b0
  b = V @ x + b1
  h = tanh(h_prev + ({call}) * g + 0.1 * b)
"""


CALLS = calls()


@pytest.fixture(scope="module", params=sorted(CALLS))
def engines(request):
    text = cell_text(CALLS[request.param])
    return rnndsl.compile(text), rnndsl.compile(text, target="reference")


@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-11), (np.float32, 2e-5)])
def test_kernels_match_the_reference(engines, dtype, tol):
    cpu, ref = engines
    with np.errstate(all="ignore"), nan_scratch():
        diffs = differences(cpu, ref, 4, 3, [4, 2, 0], dtype=dtype)
    bad = {k: v for k, v in diffs.items() if not v < tol}
    assert not bad, bad


def test_derivatives_match_finite_differences(engines):
    cpu, ref = engines
    for cell in (ref, cpu):
        result = gradcheck(cell, T=3, B=2, lengths=[3, 2])
        assert result.worst[1] < 1e-6, (cell.engine.name, result.errors)


def test_every_operator_is_covered():
    """Primitives users cannot call are derivative helpers: some tested function's backward
    step must use each of them."""
    used = set()
    for call in CALLS.values():
        cell = rnndsl.compile(cell_text(call), target="reference")
        used |= {n.op for n in ir.topo_order(cell.backward_ir.roots() + cell.step.roots())}
    spelled = {op for forms in FUNCTIONS.values() for op, kind in forms.values()
               if kind not in MATRIX_KINDS}
    for name, op in OPS.items():
        if name in ("matvec_t",):  # the adjoint of matvec, scheduled as a stacked GEMM
            continue
        if name in rank2.OPS:  # tests/test_matrix.py covers these the same way
            continue
        assert name in used or name in spelled, f"no test reaches operator '{name}'"
    assert set(MACROS) <= {k.split("/")[0] for k in CALLS}


def _gelu(x):
    return 0.5 * x * (1 + math.erf(x / math.sqrt(2)))


def _gelu_tanh(x):
    return 0.5 * x * (1 + math.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


@pytest.mark.parametrize("name, x, want", [
    ("gelu", [-1.0, 0.5, 3.0], [_gelu(v) for v in (-1.0, 0.5, 3.0)]),
    ("gelu_tanh", [-1.0, 0.5], [_gelu_tanh(v) for v in (-1.0, 0.5)]),
    ("silu", [-1.0, 2.0], [-1 / (1 + math.e), 2 / (1 + math.exp(-2))]),
    ("elu", [-1.0, 2.0], [math.expm1(-1.0), 2.0]),
    ("leaky_relu", [-1.0, 2.0], [-0.01, 2.0]),
    ("hard_tanh", [-3.0, 0.25, 2.0], [-1.0, 0.25, 1.0]),
    ("softsign", [-3.0, 1.0], [-0.75, 0.5]),
])
def test_composites_have_their_textbook_values(name, x, want):
    """Values from their textbook definitions, computed here with Python's math module."""
    text = f"name: f\nsizes: [n]\ninputs: {{x: n}}\nstates: {{h: n}}\nequations: |\n" \
           f"  h = {name}(x) + 0 * h_prev\n"
    xs = np.array(x).reshape(1, 1, -1)
    for target in ("cpu", "reference"):
        got = rnndsl.compile(text, target=target).forward({}, xs).states["h"][0]
        np.testing.assert_allclose(got, want, rtol=1e-12, err_msg=target)


def test_clip_and_optional_arguments():
    text = "name: f\nsizes: [n]\ninputs: {x: n}\nstates: {h: n}\nequations: |\n" \
           "  h = clip(x, -0.5, 0.5) + elu(x, 2) + leaky_relu(x, 0.1) + 0 * h_prev\n"
    x = np.array([-2.0, 0.2, 3.0])
    want = np.clip(x, -0.5, 0.5) + np.where(x > 0, x, 2 * np.expm1(x)) + np.where(x > 0, x, 0.1 * x)
    got = rnndsl.compile(text).forward({}, x.reshape(1, 1, -1)).states["h"][0]
    np.testing.assert_allclose(got, want, rtol=1e-12)
