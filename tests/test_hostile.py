"""The hostile corpus (tests/hostile/): specs with bad bytes and hostile names, bad command
lines, damaged checkpoints, a damaged kernel cache, hostile file names. Every case must end in
a clear message naming what and where (exit status 2 from the CLI), with no traceback, no
file left behind and nothing lost; no user text may run or reach the terminal raw."""
import ast
import io
import json
import tokenize
import zipfile
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import rnndsl
from rnndsl.backend import loader
from rnndsl.cli import app
from rnndsl.language.errors import SpecError, UserError
from rnndsl.training.train import TrainConfig, read_checkpoint, train

HOSTILE = Path(__file__).parent / "hostile"

# spec file -> (words the message must contain, line, column)
SPECS = {
    "non_utf8": (["byte 0xe9 is not UTF-8"], 2, 13),
    "nul_byte": (["character '\\x00' (U+0000) is not allowed"], 5, 11),
    "control_char": (["character '\\x07' (U+0007) is not allowed"], 5, 14),
    "deep_yaml": (["nested more than 32 levels"], 5, 40),
    "long_name": (["at most 64 characters"], 1, 7),
    "escape_in_name": (["spec name 'cell\x1b[31m'"], 1, 7),
    "traversal_name": (["spec name '../../etc/passwd'"], 1, 7),
    "code_in_name": (["spec name '__import__"], 1, 7),
    "init_nan": (["init of 'b' must be a finite number, not nan"], 5, 20),
    "init_overflow": (["init of 'b' must be a finite number, not inf"], 5, 20),
    "init_minus_inf": (["init of 'b' must be a finite number, not -inf"], 5, 31),
    "orthogonal_vector": (["init 'orthogonal' needs a matrix; 'b' has shape (hidden,)"], 5, 10),
    "python_apply": (["YAML tag '!!python/object/apply:os.system' is not allowed"], 5, 10),
    "empty_bytes": (["empty spec"], 1, 1),
}
OPTIONS = [line.split("\t") for line in (HOSTILE / "options.txt").read_text().splitlines()
           if line and not line.startswith("#")]
TINY = dict(spec="elman", task="adding", length=4, hidden=4, batch=2, eval_batch=4, log_every=2,
            dtype="float64")
TINY_ARGS = ["--task", "adding", "--length", "4", "--hidden", "4", "--batch", "2",
             "--dtype", "float64"]


def invoke(args, cwd: Path):
    """Run the CLI in `cwd`; return the result and the files created there."""
    before = set(cwd.rglob("*"))
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)
        result = CliRunner().invoke(app, args)
    return result, set(cwd.rglob("*")) - before


def assert_refused(result, *words):
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit), result.exception  # not an escaped error
    assert "Traceback" not in result.output and "\x1b" not in result.output
    for w in words:
        assert w in result.output, (w, result.output)


def test_every_corpus_spec_has_a_case():
    assert {p.stem for p in (HOSTILE / "specs").glob("*.yaml")} == set(SPECS)


@pytest.mark.parametrize("name", list(SPECS))
def test_hostile_spec(name, tmp_path):
    words, line, column = SPECS[name]
    path = HOSTILE / "specs" / f"{name}.yaml"
    with pytest.raises(SpecError) as info:
        rnndsl.compile(str(path), target="reference")
    err = info.value
    assert all(w in err.message for w in words), err.message
    assert (err.pos.file, err.pos.line, err.pos.column) == (str(path), line, column)
    result, created = invoke(["check", str(path)], tmp_path)
    assert_refused(result, f"{name}.yaml:{line}:{column}:")
    assert not created


@pytest.mark.parametrize("args, words", OPTIONS, ids=[a for a, _ in OPTIONS])
def test_bad_command_line(args, words, tmp_path):
    result, created = invoke(args.split(), tmp_path)
    assert_refused(result, words)
    assert not created


# -- user text never runs and never reaches the terminal raw ---------------------------------
# Every character str.splitlines() breaks at; Python's tokenizer ends a comment only at \r and
# \n, but none may reach the header.
LINE_BREAKS = ["\r", "\n", "\r\n", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85", "\u2028",
               "\u2029"]
TINY_SPEC = ("name: {name}\nsummary: \"red \\e[31m alert\\r\"\nsizes: [input, hidden]\n"
             "inputs: {{x: input}}\nstates: {{h: hidden}}\nequations: |\n  h = tanh(W @ x + U @ h_prev)\n")


@pytest.mark.parametrize("brk", LINE_BREAKS, ids=[repr(b) for b in LINE_BREAKS])
def test_a_file_name_cannot_inject_code(brk, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RNNDSL_CACHE_DIR", str(tmp_path / "cache"))
    payload = "import os; os.system('touch PWNED')"
    path = tmp_path / f"a{brk}{payload}{brk}#.yaml"
    path.write_text(TINY_SPEC.format(name="injected"))
    cell = rnndsl.compile(str(path))
    header = cell.engine.header("float32")
    source = cell.engine.source_code("float32")
    assert source.startswith(header) and payload not in source and "\r" not in source
    # the header is comments only: no statement, and every token in its lines a comment
    assert ast.parse(header).body == []
    end = header.count("\n")
    kinds = {tok.type for tok in tokenize.generate_tokens(io.StringIO(source).readline)
             if tok.start[0] <= end}
    assert kinds <= {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE}, kinds
    cell.engine.module("float32")  # imported: nothing may run
    result, _ = invoke(["compile", str(path)], tmp_path)
    assert result.exit_code == 0, result.output
    assert not list(tmp_path.rglob("PWNED"))


def test_summary_and_paths_are_escaped_on_the_terminal(tmp_path, monkeypatch):
    monkeypatch.setenv("RNNDSL_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "cell\x1b[2J.yaml"
    path.write_text(TINY_SPEC.format(name="escaped"))
    for args in (["compile", str(path), "--target", "reference"], ["check", str(path)]):
        result, _ = invoke(args, tmp_path)
        assert result.exit_code == 0, result.output
        assert "\x1b" not in result.output and "\r" not in result.output
    assert "cell\\x1b[2J.yaml: ok" in invoke(["check", str(path)], tmp_path)[0].output
    assert "red \\x1b[31m alert\\r" in invoke(["compile", str(path), "--target", "reference"],
                                               tmp_path)[0].output
    bad = tmp_path / "bad\x1b[31m.yaml"
    bad.write_text("name: t\nsizes: [input, hidden]\nstates: {h: hidden}\nequations: |\n"
                   "  h = \x1b[31m\n")
    result, _ = invoke(["check", str(bad)], tmp_path)
    assert_refused(result, "bad\\x1b[31m.yaml:")


def test_an_existing_file_is_read_as_a_file_whatever_its_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "equations: x.yaml").write_text(TINY_SPEC.format(name="colon"))
    assert rnndsl.compile("equations: x.yaml", target="reference").name == "colon"


# -- checkpoints ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "run.npz"
    train(TrainConfig(steps=4, **TINY), save=path)
    return path


def _rewrite(src: Path, dst: Path, change):
    with np.load(src) as data:
        entries = {k: data[k] for k in data.files}
    change(entries)
    np.savez(dst, **entries)


def _flip_middle_byte(src: Path, dst: Path):
    data = bytearray(src.read_bytes())
    data[len(data) // 2] ^= 0xFF
    dst.write_bytes(bytes(data))


CORRUPT = {
    "empty": (lambda s, d: d.write_bytes(b""), "not a readable checkpoint"),
    "truncated": (lambda s, d: d.write_bytes(s.read_bytes()[: s.stat().st_size // 2]),
                  "not a readable checkpoint"),
    "bit_flipped": (_flip_middle_byte, "not a readable checkpoint"),
    "text_file": (lambda s, d: d.write_text("hello"), "not a readable checkpoint"),
    "no_step": (lambda s, d: _rewrite(s, d, lambda e: e.pop("step")), "no step entry"),
    "no_param": (lambda s, d: _rewrite(s, d, lambda e: e.pop("param/layer0.fwd.W_ih")),
                 "parameter 'layer0.fwd.W_ih' is missing"),
    "param_shape": (lambda s, d: _rewrite(s, d, lambda e: e.update(
        {"param/layer0.fwd.W_ih": np.zeros((2, 2))})), "shape (2, 2), expected (4, 2)"),
    "param_nan": (lambda s, d: _rewrite(s, d, lambda e: e["param/layer0.fwd.W_ih"].fill(np.nan)),
                  "not finite"),
    "step_huge": (lambda s, d: _rewrite(s, d, lambda e: e.update(step=np.array(10**6))),
                  "claims step 1000000 of a 4-step run"),
    "step_negative": (lambda s, d: _rewrite(s, d, lambda e: e.update(step=np.array(-1))),
                      "claims step -1"),
    "config_not_json": (lambda s, d: _rewrite(s, d, lambda e: e.update(config=np.array("{"))),
                        "not a valid checkpoint"),
    "config_unknown_key": (lambda s, d: _rewrite(s, d, lambda e: e.update(
        config=np.array(json.dumps({"spec": "elman", "colour": "red"})))), "colour"),
    "config_bad_setting": (lambda s, d: _rewrite(s, d, lambda e: e.update(config=np.array(
        json.dumps({**json.loads(str(e["config"])), "lr": -1})))), "holds bad settings: lr"),
    "optim_foreign": (lambda s, d: _rewrite(s, d, lambda e: e.update(
        {"optim/m/nothing": np.zeros(3)})), "'m/nothing' belongs to no parameter"),
    "optim_t_negative": (lambda s, d: _rewrite(s, d, lambda e: e.update(
        {"optim/t": np.array(-3)})), "'t' must be a whole number >= 0"),
}


@pytest.mark.parametrize("name", list(CORRUPT))
def test_damaged_checkpoint(name, checkpoint, tmp_path):
    make, words = CORRUPT[name]
    bad = tmp_path / "bad.npz"
    make(checkpoint, bad)
    before = bad.read_bytes()
    with pytest.raises(UserError, match="bad.npz"):
        train(TrainConfig(steps=6, **TINY), resume=bad)
    result, created = invoke(["train", "--resume", str(bad), "--steps", "6",
                              "--save", str(bad)], tmp_path)
    assert_refused(result, "bad.npz", words)
    assert not created and bad.read_bytes() == before  # nothing lost, nothing left


def test_a_folder_or_a_missing_file_is_no_checkpoint(tmp_path):
    for path, words in ((tmp_path, "is a folder"), (tmp_path / "none.npz", "does not exist")):
        with pytest.raises(UserError, match=words):
            read_checkpoint(path)


# -- training never loses work ----------------------------------------------------------------
class Killed(Exception):
    pass


def test_periodic_checkpoints_survive_a_kill_and_resume_exactly(tmp_path):
    ckpt = tmp_path / "run.npz"
    whole = train(TrainConfig(steps=7, **TINY))

    def kill_at_step_5(step, _record):
        if step == 5:
            raise Killed

    with pytest.raises(Killed):
        train(TrainConfig(steps=7, **TINY), progress=kill_at_step_5, save=ckpt, save_every=2)
    assert read_checkpoint(ckpt)["step"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.npz"]  # no temporary left
    resumed = train(TrainConfig(steps=7, **TINY), resume=ckpt)
    assert resumed.steps_run == 3
    for k, v in whole.params.items():
        np.testing.assert_array_equal(resumed.params[k], v, err_msg=k)


def test_resume_takes_the_settings_from_the_checkpoint(tmp_path):
    ckpt = tmp_path / "run.npz"
    result, _ = invoke(["train", "gru", *TINY_ARGS, "--steps", "2", "--save", str(ckpt)],
                       tmp_path)
    assert result.exit_code == 0, result.output
    # no flags but --steps: the checkpoint's settings; an agreeing flag is fine
    result, _ = invoke(["train", "--resume", str(ckpt), "--steps", "4", "--hidden", "4",
                        "--json", "--save", str(ckpt)], tmp_path)
    assert result.exit_code == 0, result.output
    last = json.loads(result.output.splitlines()[-1])
    assert last["settings"]["spec"] == "gru" and last["settings"]["hidden"] == 4
    assert set(last["versions"]) == {"rnndsl", "numba", "numpy", "python"}
    assert read_checkpoint(ckpt)["step"] == 4
    # a flag that disagrees is named; fewer steps than the checkpoint's is refused
    result, _ = invoke(["train", "lstm", "--resume", str(ckpt), "--hidden", "9"], tmp_path)
    assert_refused(result, "--hidden 9 (the checkpoint has 4)", "lstm (the checkpoint has gru)")
    result, _ = invoke(["train", "--resume", str(ckpt), "--steps", "3"], tmp_path)
    assert_refused(result, "is at step 4; steps (3) must be at least that")


def test_tables_and_legends_show_short_names(tmp_path):
    spec = tmp_path / "deep" / "folder" / "my_cell.yaml"
    spec.parent.mkdir(parents=True)
    spec.write_text(TINY_SPEC.format(name="my_cell"))
    result, _ = invoke(["compare", "elman", str(spec), *TINY_ARGS, "--steps", "2"], tmp_path)
    assert result.exit_code == 0, result.output
    assert "1xmy_cell" in result.output and str(spec.parent) not in result.output


def test_version_and_completion():
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.startswith(f"rnndsl {rnndsl.__version__}")
    assert "--install-completion" in CliRunner().invoke(app, ["--help"]).output


# -- the kernel cache ---------------------------------------------------------------------------
def _run_tiny(name: str):
    """Compile (a fresh module each time) and run a small cell; its module's path."""
    for key in [k for k in loader.sys.modules if k.startswith(f"{loader.PREFIX}{name}_")]:
        del loader.sys.modules[key]
    cell = rnndsl.compile(TINY_SPEC.format(name=name))
    params = cell.init_params(2, 3)
    cell.forward(params, np.ones((2, 1, 2), np.float32))
    return Path(cell.engine.path())


def _truncate(p: Path):
    p.write_bytes(p.read_bytes()[:20])


DAMAGE = {
    "random_bytes_in_module": lambda m: m.write_bytes(np.random.default_rng(0).bytes(300)),
    "truncated_numba_index": lambda m: [_truncate(p) for p in
                                        m.parent.glob(f"__pycache__/{m.stem}*.nbi")],
    "empty_numba_index": lambda m: [p.write_bytes(b"") for p in
                                    m.parent.glob(f"__pycache__/{m.stem}*.nbi")],
    "garbled_numba_data": lambda m: [p.write_bytes(b"\x80\x05garbage") for p in
                                     m.parent.glob(f"__pycache__/{m.stem}*.nbc")],
}


@pytest.mark.parametrize("name", list(DAMAGE))
def test_a_damaged_cache_is_repaired(name, tmp_path, monkeypatch):
    monkeypatch.setenv("RNNDSL_CACHE_DIR", str(tmp_path))
    module = _run_tiny(f"damage_{name}")
    DAMAGE[name](module)
    assert _run_tiny(f"damage_{name}") == module  # runs again, from a repaired cache


@pytest.mark.parametrize("where, words", [
    ("file", "File exists"), ("under_file", "Not a directory"), ("/sys", "Permission denied"),
    ("/sys/rnndsl", "Operation not permitted"), ("module_is_folder", "is not a file"),
])
def test_an_unusable_cache_is_named(where, words, tmp_path, monkeypatch):
    cache = {"file": tmp_path / "f", "under_file": tmp_path / "f" / "cache"}.get(where, where)
    (tmp_path / "f").write_text("not a folder")
    if where == "module_is_folder":
        cache = tmp_path / "cache"
        monkeypatch.setenv("RNNDSL_CACHE_DIR", str(cache))
        module = _run_tiny("folder_in_place")
        module.unlink()
        module.mkdir()
    monkeypatch.setenv("RNNDSL_CACHE_DIR", str(cache))
    with pytest.raises(UserError, match=words) as info:
        _run_tiny("folder_in_place" if where == "module_is_folder" else "unusable")
    assert "kernel cache" in str(info.value)
    if where != "module_is_folder":
        spec = tmp_path / "cli.yaml"  # a cell no test has loaded in this process
        spec.write_text(TINY_SPEC.format(name=f"unusable_cli_{abs(hash(where))}"))
        assert_refused(invoke(["compile", str(spec)], tmp_path)[0], "kernel cache", words)


def test_cache_location_and_clear(tmp_path, monkeypatch):
    monkeypatch.delenv("RNNDSL_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert loader.cache_root() == tmp_path / "xdg" / "rnndsl"
    assert invoke(["cache", "path"], tmp_path)[0].output.strip() == str(tmp_path / "xdg" / "rnndsl")
    monkeypatch.setenv("RNNDSL_CACHE_DIR", str(tmp_path / "shared"))
    _run_tiny("cleared")
    keep = tmp_path / "shared" / "my_notes.txt"
    keep.write_text("not rnndsl's")
    result, _ = invoke(["cache", "clear"], tmp_path)
    assert result.exit_code == 0 and "removed" in result.output
    assert loader.cache_files() == [] and keep.read_text() == "not rnndsl's"


# -- the Python API ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gru():
    cell = rnndsl.compile("gru", target="reference")
    params = cell.init_params(3, 4)
    x = np.ones((5, 2, 3))
    return cell, params, x, cell.forward(params, x)


API = {
    "state0_unknown_key": (lambda c, p, x, f: c.forward(p, x, state0={"hh": np.zeros((2, 4))}),
                           "state0: unknown name(s) 'hh'"),
    "d_states_unknown_key": (lambda c, p, x, f: c.backward(p, f, d_states={"hx": np.ones((2, 4))}),
                             "d_states: unknown name(s) 'hx'"),
    "d_states_broadcast": (lambda c, p, x, f: c.backward(p, f, d_states={"h": np.ones((1, 4))}),
                           "d_states['h'] has shape (1, 4), expected (2, 4)"),
    "lengths_fractional": (lambda c, p, x, f: c.forward(p, x, lengths=[2.7, 3.2]),
                           "lengths must be 2 whole numbers"),
    "lengths_strings": (lambda c, p, x, f: c.forward(p, x, lengths=["2", "3"]),
                        "lengths must be 2 whole numbers"),
    "no_time_steps": (lambda c, p, x, f: c.forward(p, x[:0]), "input 'x' has 0 time steps"),
    "no_sequences": (lambda c, p, x, f: c.forward(p, x[:, :0]), "input 'x' has 0 sequences"),
    "hidden_zero": (lambda c, p, x, f: c.init_params(3, 0), "size 'hidden' must be a whole"),
    "hidden_zero_arrays": (lambda c, p, x, f: c.forward(
        {k: np.zeros(tuple(0 if d == 4 else d for d in v.shape)) for k, v in p.items()}, x),
        "size 'hidden' is 0"),
    "size_unknown": (lambda c, p, x, f: c.init_params(3, 4, hiden=3), "unknown name(s) 'hiden'"),
    "param_wrong_shape": (lambda c, p, x, f: c.forward({**p, "b_ir": np.zeros(5)}, x),
                          "size 'hidden' is 4 from parameter"),
    "param_wrong_ndim": (lambda c, p, x, f: c.forward({**p, "W_ir": np.zeros(12)}, x),
                         "parameter 'W_ir' must have 2 dimension(s)"),
}


@pytest.mark.parametrize("name", list(API))
def test_python_api_refuses_bad_arguments(name, gru):
    call, words = API[name]
    with pytest.raises(ValueError) as info:
        call(*gru)
    assert words in str(info.value)


def test_whole_float_lengths_are_fine(gru):
    cell, params, x, _ = gru
    fwd = cell.forward(params, x, lengths=[2.0, 5.0])
    np.testing.assert_array_equal(fwd.tape.lengths, [2, 5])
