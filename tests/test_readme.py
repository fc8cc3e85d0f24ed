"""Every code block of the README runs as written, so that the README stays true.

The blocks are read from README.md, never copied here:
* shell blocks (```bash, or unlabelled ones whose lines are commands): each command runs, in
  order, in one scratch folder per block that sees the checkout's `specs/`, `examples/`,
  `tests/` and README.md, and must exit 0. A `$ command` line is followed by its expected
  output, which must be printed exactly. Installing, the test suite itself and the GPU are excepted, and marked
  as skipped with the reason (`EXCEPTED`).
* To keep the suite fast, training runs are shortened: `--steps N` becomes N // 1000 (at
  least 2), a `train` or `compare` without `--steps` gets `--steps 2`, a `sweep` draws one
  point (`--samples 1`) and trains one seed (`--seeds 1`), and `bench` runs the smallest
  workload (`--size S`) with `--repeats 1`. Every other flag is passed as written.
* An output block of derived equations (`d_... = ...`) must appear, line by line, in what the
  README's `--show backward` command prints.
* Python blocks run in order within their section, in one namespace per section.
* YAML blocks compile, to the same step as the built-in spec of their name.
"""
import contextlib
import importlib.util
import io
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import rnndsl

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
PROGRAMS = ("rnndsl", "pip", "python", "$ ")
EXCEPTED = [  # (pattern, why the command is not run here)
    (r"^pip install -e \"\.\[cuda\]\"", "needs a GPU (the cuda extra)"),
    (r"^NUMBA_ENABLE_CUDASIM=1 python -m pytest tests/test_cuda\.py",
     "part of this suite (tests/test_cuda.py re-runs itself in the simulator)"),
    (r"^pip install", "installs: the suite runs in the installed package; tests/test_wheel.py "
                      "installs the wheel in a fresh environment"),
    (r"^python -m pytest", "the suite that runs this test"),
    (r"^python benchmarks/", "a benchmark of minutes: its figures are in the README, with the "
                             "machine and the date"),
    (r"^sh examples/ntm/experiment\.sh", "an hour of training: tests/test_train.py trains and "
                                        "evaluates the ntm with the same commands, at toy size"),
    (r"^ray start", "starts a node of a Ray cluster: tests/test_sweep.py starts a cluster of two "
                    "nodes on a loopback address"),
    (r"^rnndsl sweep .*--address", "needs a running Ray cluster: tests/test_sweep.py runs one"),
]


def missing(command: str) -> str | None:
    """Why a command cannot run here: the optional extra it needs is not installed."""
    if command.startswith("rnndsl sweep") and importlib.util.find_spec("ray") is None:
        return 'needs Ray Tune, the sweep extra: pip install -e ".[sweep]"'
    return None


def blocks():
    """(line number, language, section, text) of every fenced block."""
    for m in FENCE.finditer(README):
        before = README[:m.start()]
        section = re.findall(r"^## (.*)$", before, re.M)
        yield before.count("\n") + 1, m.group(1), section[-1] if section else "", m.group(2)


def is_shell(lang: str, text: str) -> bool:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return lang == "bash" or (lang == "" and all(ln.startswith(PROGRAMS) for ln in lines[:1]))


def shell_lines(text: str):
    """(command, expected output or None) of a shell block: comments cut, `\\` lines joined,
    `a && b` split."""
    lines = text.replace("\\\n", " ").splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        if not line.strip():
            continue
        if line.startswith("$ "):
            expected = []
            while i < len(lines) and not lines[i].startswith(PROGRAMS):
                expected.append(lines[i])
                i += 1
            yield line[2:], "\n".join(expected)
            continue
        command = re.sub(r"\s+#.*$", "", line).strip()
        for part in command.split(" && "):
            yield part.strip(), None


def excepted(command: str) -> str | None:
    return next((why for pattern, why in EXCEPTED if re.match(pattern, command)), None)


def shortened(args: list[str]) -> list[str]:
    """The README's command with fewer training steps and timing repeats (see the docstring)."""
    args = list(args)
    if args[:1] == ["rnndsl"] and args[1:2] in (["train"], ["compare"], ["sweep"]):
        if "--steps" in args:
            i = args.index("--steps") + 1
            args[i] = str(max(2, int(args[i]) // 1000))
        else:
            args += ["--steps", "2"]
    if args[:2] == ["rnndsl", "sweep"]:
        for option in ("--samples", "--seeds"):
            if option in args:
                args[args.index(option) + 1] = "1"
    if args[:2] == ["rnndsl", "bench"]:
        if "--size" in args:
            args[args.index("--size") + 1] = "S"
        args += ["--repeats", "1"]
    return args


def scratch(tmp_path: Path) -> Path:
    for name in ("specs", "examples", "tests"):
        (tmp_path / name).symlink_to(ROOT / name)
    (tmp_path / "README.md").write_text(README)
    return tmp_path


def run_shell(command: str, cwd: Path) -> subprocess.CompletedProcess:
    args = shortened(shlex.split(command))
    env = dict(os.environ)
    while args and re.match(r"^\w+=", args[0]):  # VAR=value before the program
        key, value = args.pop(0).split("=", 1)
        env[key] = value
    if args[0] == "rnndsl":
        args = [sys.executable, "-c", "from rnndsl.cli import main; main()", *args[1:]]
    elif args[0] == "python":
        args[0] = sys.executable
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


SHELL = [(line, list(shell_lines(text))) for line, lang, _, text in blocks()
         if is_shell(lang, text)]
RUNNABLE = [pytest.param([(c, e) for c, e in cmds if not excepted(c)], id=f"line{line}",
                         marks=[pytest.mark.skip(reason=why) for why in
                                {missing(c) for c, _ in cmds if not excepted(c)} if why])
            for line, cmds in SHELL if any(not excepted(c) for c, _ in cmds)]
NOT_RUN = [pytest.param(c, marks=pytest.mark.skip(reason=excepted(c)), id=f"line{line}-{c}")
           for line, cmds in SHELL for c, _ in cmds if excepted(c)]


def test_every_block_is_one_this_test_reads():
    for line, lang, _, text in blocks():
        assert is_shell(lang, text) or lang in ("python", "yaml") or \
            (lang == "" and text.startswith("d_")), f"README.md:{line}: a block nothing checks"
    langs = [lang for _, lang, _, _ in blocks()]
    assert len(RUNNABLE) >= 4 and langs.count("python") >= 4 and "yaml" in langs


@pytest.mark.parametrize("commands", RUNNABLE)
def test_shell_block_runs(commands, tmp_path):
    cwd = scratch(tmp_path)
    for command, expected in commands:
        proc = run_shell(command, cwd)
        out = proc.stdout + proc.stderr
        if expected is not None:
            assert out.rstrip("\n") == expected.rstrip("\n"), command
        else:
            assert proc.returncode == 0, f"{command} exited {proc.returncode}:\n{out}"
        assert "Traceback" not in out, f"{command}:\n{out}"


@pytest.mark.parametrize("command", NOT_RUN)
def test_excepted_command(command):
    """Never runs: one skipped test per README command that is excepted, with the reason."""


def test_derived_equations_are_what_show_backward_prints(tmp_path):
    """Each block of derived equations, against the `--show backward` command before it."""
    shown, command = [], None
    for _, lang, _, text in blocks():
        if is_shell(lang, text):
            command = next((c for c, _ in shell_lines(text)
                            if "--show backward" in c and not excepted(c)), command)
        elif lang == "" and text.startswith("d_"):
            shown.append((command, text))
    assert shown
    cwd = scratch(tmp_path)
    for command, text in shown:
        out = run_shell(command, cwd).stdout.splitlines()
        for line in text.splitlines():
            if line != "...":
                assert line in out, (command, line)


SECTIONS = {}
for _line, _lang, _section, _text in blocks():
    if _lang == "python":
        SECTIONS.setdefault(_section, []).append(_text)


@pytest.mark.parametrize("section", list(SECTIONS))
def test_python_blocks_run(section, tmp_path, monkeypatch):
    if "import torch" in "".join(SECTIONS[section]):
        pytest.importorskip("torch")
    monkeypatch.chdir(scratch(tmp_path))
    scope = {}
    with contextlib.redirect_stdout(io.StringIO()):
        for text in SECTIONS[section]:
            exec(compile(text, f"README.md ({section})", "exec"), scope)


def test_yaml_blocks_are_the_built_in_specs():
    texts = [t for _, lang, _, t in blocks() if lang == "yaml"]
    for text in texts:
        cell = rnndsl.compile(text, target="reference")
        assert equations(cell) == equations(rnndsl.compile(cell.name, target="reference"))


def equations(cell) -> str:
    """A cell's forward equations (a tree cell's, step by step)."""
    return cell.equations() if hasattr(cell, "equations") else cell.step.equations()


def test_layer_norm_expression_compiles():
    expr = re.search(r"Layer norm is\s+`(.*?)`", README, re.S).group(1)
    cell = rnndsl.compile("name: t\nsizes: [input, hidden]\ninputs: {x: input}\n"
                          f"states: {{h: hidden}}\nequations: |\n  v = W @ x\n  h = {expr}\n")
    assert set(cell.params) == {"W", "a", "b"}
