"""Named constants: a `constants:` section, folded into the generated code, set again when
compiling (`constants=` and `rnndsl compile --set`), never a parameter."""
import numpy as np
import pytest
from typer.testing import CliRunner

import rnndsl
from rnndsl.cli import app

SPEC = """name: decay
sizes: [input, hidden]
inputs: {x: input}
states: {h: hidden}
constants: {lam: 0.95, eta: 0.5}
equations: |
  h = lam * h_prev + eta * tanh(W @ x)
"""


def run_numpy(lam, eta, w, x):
    h = np.zeros((x.shape[1], w.shape[0]))
    for xt in x:
        h = lam * h + eta * np.tanh(xt @ w.T)
    return h


def test_constants_are_folded_and_never_trained():
    c = rnndsl.compile(SPEC)
    assert list(c.params) == ["W"]
    assert "h = 0.95 * h_prev + 0.5 * tanh(W @ x)" in c.step.equations()
    assert "DT(0.95)" in c.engine.source_code("float64")
    p = c.init_params(input=2, hidden=3, dtype=np.float64)
    x = np.random.default_rng(0).standard_normal((4, 2, 2))
    f = c.forward(p, x)
    np.testing.assert_allclose(f.states["h"], run_numpy(0.95, 0.5, p["W"], x), rtol=1e-12)
    assert set(c.backward(p, f, np.ones_like(f.output)).params) == {"W"}


def test_compile_with_other_values_changes_the_code_and_its_cache_file():
    a = rnndsl.compile(SPEC)
    b = rnndsl.compile(SPEC, constants={"lam": 0.9})
    assert "h = 0.9 * h_prev + 0.5 * tanh(W @ x)" in b.step.equations()
    assert "DT(0.9)" in b.engine.source_code("float64")
    assert a.engine.path("float64") != b.engine.path("float64")
    p = b.init_params(input=2, hidden=3, dtype=np.float64)
    x = np.random.default_rng(1).standard_normal((4, 2, 2))
    np.testing.assert_allclose(b.forward(p, x).states["h"], run_numpy(0.9, 0.5, p["W"], x),
                               rtol=1e-12)
    assert rnndsl.compile(SPEC, constants={"lam": 0.95}).engine.path("float64") == \
        a.engine.path("float64")


@pytest.mark.parametrize("constants, message", [
    ({"lamda": 0.9}, "cannot set constant 'lamda': the spec 'decay' has no such constant "
                     "(did you mean 'lam'?); its constants: lam, eta"),
    ({"lam": float("nan")}, "cannot set constant 'lam' to nan: a constant is a finite number"),
    ({"lam": True}, "cannot set constant 'lam' to True"),
    ({"lam": "0.9"}, "cannot set constant 'lam' to '0.9'"),
])
def test_bad_overrides(constants, message):
    with pytest.raises(rnndsl.SpecError) as info:
        rnndsl.compile(SPEC, constants=constants)
    assert message in info.value.message


def test_cli_set():
    runner = CliRunner()
    ok = runner.invoke(app, ["compile", SPEC, "--set", "lam=0.9", "--set", "eta=2",
                             "--show", "ir"])
    assert ok.exit_code == 0, ok.output
    assert "h = 0.9 * h_prev + 2 * tanh(W @ x)" in ok.output
    for args, message in ((["--set", "lamb=0.9"], "no such constant (did you mean 'lam'?)"),
                          (["--set", "lam"], "--set 'lam': expected NAME=NUMBER"),
                          (["--set", "lam=fast"], "--set 'lam=fast': expected NAME=NUMBER"),
                          (["--set", "lam=inf"], "a constant is a finite number")):
        bad = runner.invoke(app, ["compile", SPEC, *args])
        assert bad.exit_code == 2 and message in bad.output, bad.output
        assert "Traceback" not in bad.output


@pytest.mark.parametrize("constants, equation, message, line, column", [
    ("{h: 0.5}", "h = h_prev", "constant 'h' has the name of a state", 5, 13),
    ("{x: 0.5}", "h = h_prev", "constant 'x' has the name of an input", 5, 13),
    ("{hidden: 2}", "h = h_prev", "constant 'hidden' has the name of a size", 5, 13),
    ("{tanh: 2}", "h = h_prev", "constant 'tanh' has the name of a function", 5, 13),
    ("{h_prev: 2}", "h = h_prev", "constant 'h_prev' has the name of a state's previous", 5, 13),
    ("{b: 2}", "h = h_prev + b", "constant 'b' has the name of a parameter", 5, 13),
    ("{lam: .inf}", "h = h_prev", "constant 'lam' must be a finite number", 5, 18),
    ("{lam: fast}", "h = h_prev", "constant 'lam' must be a finite number", 5, 18),
    ("{lam: [1, 2]}", "h = h_prev", "'constants.lam' must be a single value", 5, 18),
    ("[lam]", "h = h_prev", "constants must be a mapping", 5, 12),
    ("{lam: 0.5}", "lam = h_prev\n  h = lam", "'lam' is a constant and cannot be assigned", 8, 3),
    ("{lam: 0.5}", "h = lam @ h_prev", "the left side of '@' must be a weight matrix", 8, 7),
    ("{lam: 0.5}", "h = h_prev * lamb", "unknown name 'lamb' (did you mean 'lam'?)", 8, 16),
])
def test_misused_constants_are_located_errors(constants, equation, message, line, column):
    text = ("name: t\nsizes: [input, hidden]\ninputs: {x: input}\nstates: {h: hidden}\n"
            f"constants: {constants}\n"
            + ("params: {b: {shape: hidden}}\n" if "+ b" in equation else "params: {}\n")
            + f"equations: |\n  {equation}\n")
    with pytest.raises(rnndsl.SpecError) as info:
        rnndsl.compile(text)
    assert message in info.value.message
    assert (info.value.pos.line, info.value.pos.column) == (line, column), info.value.message
