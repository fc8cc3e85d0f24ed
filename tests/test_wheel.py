"""The package as a user installs it: the wheel built from this checkout, installed with
torch into a fresh virtual environment, used from a folder outside the checkout.

This is what an editable install hides: data files found only through the checkout, peer
code that lives outside the package, imports of undeclared dependencies. It takes about a
minute (pip's cache makes the installs local copies)."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

USER_SPEC = """\
name: my_cell
summary: a user's own cell, outside the package
sizes: [input, hidden]
inputs: {x: input}
states: {h: hidden}
equations: |
  z = sigmoid(W_z @ x + U_z @ h_prev + b_z)
  h = z * h_prev + (1 - z) * tanh(W @ x + U @ h_prev + b)
"""

TORCH_SCRIPT = """\
import torch, rnndsl
from rnndsl.torch import RNN
assert "site-packages" in rnndsl.__file__, rnndsl.__file__
torch.manual_seed(0)
ref = torch.nn.LSTM(3, 4, 2, bidirectional=True)
mine = RNN("lstm", 3, 4, 2, bidirectional=True)
mine.load_state_dict(ref.state_dict())
x = torch.randn(5, 2, 3, requires_grad=True)
out, (h, c) = mine(x)
torch.testing.assert_close(out, ref(x)[0], atol=1e-5, rtol=1e-5)
out.sum().backward()
g_mine = x.grad.clone(); x.grad = None
ref(x)[0].sum().backward()
torch.testing.assert_close(g_mine, x.grad, atol=1e-5, rtol=1e-5)
custom = RNN("my_cell.yaml", 3, 4)
y, h = custom(torch.randn(5, 2, 3))
y.square().sum().backward()
assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in custom.parameters())
print("torch ok")
"""


def run(args, cwd, env, expect=0):
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == expect, (f"{' '.join(map(str, args))} exited {proc.returncode}:\n"
                                       f"{proc.stdout}\n{proc.stderr}")
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(the fresh environment's bin folder, a work folder outside the checkout, its env)."""
    tmp = tmp_path_factory.mktemp("wheel")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["RNNDSL_CACHE_DIR"] = str(tmp / "kernel-cache")
    run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir",
         tmp / "dist", ROOT], tmp, env)
    wheel, = (tmp / "dist").glob("rnndsl-*.whl")
    run([sys.executable, "-m", "venv", tmp / "venv"], tmp, env)
    bin_dir = tmp / "venv" / "bin"
    run([bin_dir / "python", "-m", "pip", "install", "--quiet", wheel, "torch==2.13.0"],
        tmp, env)
    work = tmp / "work"
    work.mkdir()
    (work / "my_cell.yaml").write_text(USER_SPEC)
    (work / "bad.yaml").write_text(USER_SPEC.replace("U @ h_prev + b)", "U @ h_prv + b)"))
    return bin_dir, work, env


def test_wheel_contains_the_data_and_no_checkout_paths(installed):
    bin_dir, work, env = installed
    out = run([bin_dir / "python", "-c", textwrap.dedent("""\
        import rnndsl, rnndsl.resources as r
        print(rnndsl.__file__); print(r.grammar_path()); print(r.specs_dir())""")], work, env)
    package, grammar, specs = out.split()
    assert "site-packages" in package and str(ROOT) not in out
    assert Path(grammar).is_file() and Path(specs).is_dir()


def test_cli_from_the_installed_wheel(installed):
    bin_dir, work, env = installed
    rnndsl = bin_dir / "rnndsl"
    listed = run([rnndsl, "list"], work, env)
    builtins = sorted(p.stem for pattern in ("*.yaml", "trees/*.yaml")
                      for p in (ROOT / "specs").glob(pattern))  # the tree cells travel too
    assert sorted(line.split()[0] for line in listed.splitlines() if line.strip()) == builtins
    assert "generated" in run([rnndsl, "compile", "lstm"], work, env)
    assert "my_cell.yaml: ok" in run([rnndsl, "check", "my_cell.yaml"], work, env)
    err = run([rnndsl, "check", "bad.yaml"], work, env, expect=2)
    assert "bad.yaml:8:" in err and "h_prv" in err and "Traceback" not in err
    out = run([rnndsl, "train", "my_cell.yaml", "--task", "adding", "--length", "5",
               "--hidden", "4", "--steps", "2", "--batch", "4"], work, env)
    assert "my_cell" in out and "Traceback" not in out


def test_torch_from_the_installed_wheel(installed):
    bin_dir, work, env = installed
    assert "torch ok" in run([bin_dir / "python", "-c", TORCH_SCRIPT], work, env)
    out = run([bin_dir / "rnndsl", "bench", "elman", "--size", "T1", "--repeats", "1",
               "--against", "torch"], work, env)
    assert "torch module" in out and "torch eager" in out
