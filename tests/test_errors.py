"""Every class of spec error: one bad spec each, its message, and its line and column in the
YAML file (not in the equation string). The CLI reports each one with exit status 2."""
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import rnndsl
from rnndsl.cli import app
from rnndsl.language.errors import SpecError

BAD = Path(__file__).parent / "bad_specs"

# file -> (words the message must contain, line, column)
CASES = {
    "yaml_syntax": (["YAML syntax error", "expected ',' or ']'", "line 2, column 8"], 3, 7),
    "empty": (["empty spec"], 1, 1),
    "missing_key": (["missing required key 'states'"], 1, 1),
    "unknown_key": (["unknown key 'output'", "did you mean 'outputs'"], 5, 1),
    "unknown_name": (["unknown name 'h_prv'", "did you mean 'h_prev'"], 6, 24),
    "defined_twice": (["'a' is defined twice", "first at line 6"], 7, 3),
    "state_never_assigned": (["state 'c' is never assigned"], 4, 21),
    "cycle": (["'h' depends on itself within one step", "h -> h", "h_prev"], 7, 20),
    "shape_mismatch": (["shape mismatch at '*'", "(hidden,)", "(input,)"], 7, 18),
    "unknown_function": (["unknown function 'tahn'", "did you mean 'tanh'"], 6, 7),
    "wrong_arity": (["'sigmoid' takes 1 argument, got 2"], 6, 7),
    "prev_of_non_state": (["'x_prev'", "'x' is not a state"], 6, 37),
    "undefined_output": (["output 'y' is not defined"], 5, 14),
    "bad_size": (["unknown size 'hiden'", "did you mean 'hidden'"], 4, 13),
    "malformed_equation": (["unexpected '*'", "expected an expression"], 6, 20),
    "list_equations": (["unknown name 'h_prv'"], 7, 23),
    "python_tag": (["YAML tag '!!python/object/apply:os.system' is not allowed"], 2, 10),
    "code_in_equation": (["unexpected character"], 7, 18),
}


def test_every_bad_spec_has_a_case():
    assert {p.stem for p in BAD.glob("*.yaml")} == set(CASES)


@pytest.mark.parametrize("name", list(CASES))
def test_error_message_and_position(name):
    words, line, column = CASES[name]
    path = BAD / f"{name}.yaml"
    with pytest.raises(SpecError) as info:
        rnndsl.compile(str(path))
    err = info.value
    for w in words:
        assert w in err.message, (w, err.message)
    assert (err.pos.file, err.pos.line, err.pos.column) == (str(path), line, column)
    # the position is in the YAML file: the quoted line is that file line
    file_line = path.read_text().splitlines()[line - 1]
    assert err.pos.text == file_line
    # rendered: file:line:col: message, the source line, a caret under the column
    assert err.render().splitlines() == [f"{path}:{line}:{column}: {err.message}",
                                         "    " + file_line, "    " + " " * (column - 1) + "^"]


@pytest.mark.parametrize("name", list(CASES))
def test_cli_check_exits_2_without_traceback(name):
    result = CliRunner().invoke(app, ["check", str(BAD / f"{name}.yaml")])
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    assert f"{name}.yaml:{CASES[name][1]}:{CASES[name][2]}:" in result.output


def test_cli_subprocess_compile_bad_spec(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "rnndsl.cli", "compile",
                           str(BAD / "unknown_name.yaml"), "--show", "backward"],
                          capture_output=True, text=True, cwd=tmp_path,
                          env={"PYTHONPATH": str(Path(__file__).parent.parent), "PATH": ""})
    assert proc.returncode == 2
    assert "Traceback" not in proc.stdout + proc.stderr
    assert "unknown_name.yaml:6:24: unknown name 'h_prv' (did you mean 'h_prev'?)" in proc.stderr


def test_no_user_text_is_executed(tmp_path, monkeypatch):
    """Neither a YAML python tag nor code in an equation runs: both are refused as SpecErrors."""
    monkeypatch.chdir(tmp_path)
    for name in ("python_tag", "code_in_equation"):
        with pytest.raises(SpecError):
            rnndsl.compile(str(BAD / f"{name}.yaml"))
    assert not (tmp_path / "rnndsl_pwned.txt").exists()


@pytest.mark.parametrize("equation, message", [
    ("h = eval(h_prev)", "unknown function 'eval'"),
    ("h = exec('x')", "unexpected character"),
    ("h = h_prev.__class__", "unexpected character '.'"),
    ("h = h_prev; import os", "unexpected character ';'"),
    ("h = (lambda: 0)()", "unexpected"),
    ("h = h_prev[0]", "'h_prev[0]' needs a vector whose size is a number"),
    ("h = `ls`", "unexpected character '`'"),
])
def test_code_in_equations_is_refused(equation, message):
    text = ("name: t\nsizes: [input, hidden]\ninputs: {x: input}\nstates: {h: hidden}\n"
            f"equations: |\n  {equation}\n")
    with pytest.raises(SpecError) as info:
        rnndsl.compile(text)
    assert message in info.value.message
    assert info.value.pos.line == 6


@pytest.mark.parametrize("text, message, line, column", [
    ("name: t\nsizes: [input, hidden]\nstates: {h: hidden}\nequations: >\n  h = h_prev\n",
     "'equations: >' folds", 4, 12),
    ("name: t\nsizes: [input, hidden]\nstates: {h: hidden}\nequations: |\n  h = h_prev * 1e999\n",
     "too large for a float", 5, 16),
    ("name: t\nsizes: [input, hidden]\nstates: {h: hidden}\nequations: |\n  h = "
     + "(" * 150 + "h_prev" + ")" * 150 + "\n", "nested more than 100 levels", 5, 3),
    ("name: t\nsizes: [input, hidden]\nstates: {h: !foo hidden}\nequations: |\n  h = h_prev\n",
     "YAML tag '!foo'", 3, 13),
    ("name: t\nsizes: [input, hidden]\nstates: {h: hidden}\nequations: |\n  h = h\n",
     "'h' depends on itself", 5, 7),
    ("name: t\nsizes: [input, hidden]\nstates: {h: hidden}\nparams: {b: {shape: [hiden]}}\n"
     "equations: |\n  h = h_prev + b\n", "unknown size 'hiden'", 4, 22),
    ("name: t\nsizes: [input, hidden]\nstates: {h: hidden}\nequations: |\n  h = sigmoid\n",
     "'sigmoid' is a function", 5, 7),
])
def test_more_errors(text, message, line, column):
    with pytest.raises(SpecError) as info:
        rnndsl.compile(text)
    assert message in info.value.message
    assert (info.value.pos.line, info.value.pos.column) == (line, column)


def test_long_chain_of_equations_compiles():
    """Ordering equations does not recurse: 1500 equations written last-first are fine."""
    n = 1500
    eqs = [f"h = a{n - 1}"] + [f"a{k} = a{k - 1} * 2" for k in range(n - 1, 0, -1)] + ["a0 = h_prev"]
    text = ("name: t\nsizes: [input, hidden]\ninputs: {x: input}\nstates: {h: hidden}\nequations: |\n  "
            + "\n  ".join(eqs) + "\n")
    assert len(rnndsl.compile(text).step.values) == n + 1
