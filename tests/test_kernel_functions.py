"""The scalar functions written into generated kernels, against NumPy in float64."""
import numpy as np
import pytest

from rnndsl.backend.emit_common import FASTMATH
from rnndsl.backend.kernel_lib import kernel_functions
from rnndsl.backend.loader import load_module

TOLERANCE = {"float32": 1e-6, "float64": 1e-14}


@pytest.fixture(scope="module", params=["float32", "float64"])
def functions(request):
    dtype = request.param
    source = "\n".join([
        "import math", "import numpy as np", "from numba import njit", f"DT = np.{dtype}",
        f"FAST = {FASTMATH}", "C0, C1, C05 = DT(0), DT(1), DT(0.5)",  # the kernels' flags
        kernel_functions(dtype, "cpu"),
        "@njit(fastmath=FAST, error_model='numpy')",
        "def apply(kind, x, out):",
        "    for i in range(x.size):",
        "        out[i] = (exp(x[i]) if kind == 0 else tanh(x[i]) if kind == 1 else",
        "                  sigmoid(x[i]) if kind == 2 else softplus(x[i]))",
    ])
    return dtype, load_module(source, f"test_functions_{dtype}")


def relative_error(got, want):
    return np.max(np.abs(got - want) / np.maximum(np.abs(want), np.finfo(np.float32).tiny))


@pytest.mark.parametrize("kind, reference, lo, hi", [
    (0, np.exp, -80.0, 80.0), (1, np.tanh, -20.0, 20.0), (2, lambda x: 1 / (1 + np.exp(-x)), -80.0, 40.0),
    (3, lambda x: np.logaddexp(0.0, x), -80.0, 80.0)])
def test_functions_are_accurate(functions, kind, reference, lo, hi):
    dtype, module = functions
    x = np.concatenate([np.linspace(lo, hi, 400_001), np.linspace(-1e-3, 1e-3, 2001),
                        [0.0, 1e-30, -1e-30]]).astype(dtype)
    out = np.empty_like(x)
    module.apply(kind, x, out)
    want = reference(x.astype(np.float64))
    assert relative_error(out.astype(np.float64), want) < TOLERANCE[dtype]


def test_saturation_gives_limits_not_nans(functions):
    dtype, module = functions
    x = np.array([-1e30, -1000.0, 1000.0, 1e30], dtype=dtype)
    for kind, want in ((1, [-1, -1, 1, 1]), (2, [0, 0, 1, 1])):
        out = np.empty_like(x)
        module.apply(kind, x, out)
        np.testing.assert_allclose(out, want, rtol=TOLERANCE[dtype], atol=1e-30)


def test_a_change_to_the_back_end_changes_every_module_key(monkeypatch):
    """Numba's cache of a generated kernel keeps the code of the compiled functions it calls
    (the micro-kernel, the kernel library) as they were, so an edit there must give the
    generated modules new keys, and so fresh compiles."""
    from pathlib import Path

    from rnndsl.backend import loader

    before = loader.content_hash("def f(): pass")
    real = Path.read_bytes

    def edited(path):
        data = real(path)
        return data + b"\n# edited\n" if path.name == "packed.py" else data

    loader._backend_hash.cache_clear()
    monkeypatch.setattr(Path, "read_bytes", edited)
    try:
        assert loader.content_hash("def f(): pass") != before
    finally:
        monkeypatch.undo()
        loader._backend_hash.cache_clear()
    assert loader.content_hash("def f(): pass") == before
