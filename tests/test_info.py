"""`rnndsl info`: what the process runs on, as text and as JSON."""
import json
import platform
import os
import re
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from rnndsl import __version__
from rnndsl.cli import app
from rnndsl.environment import cpu_model


def test_info_reports_versions_blas_cache_and_cuda(tmp_path, monkeypatch):
    monkeypatch.setenv("RNNDSL_CACHE_DIR", str(tmp_path / "cache"))
    result = CliRunner().invoke(app, ["info", "--json"])
    assert result.exit_code == 0, result.output
    found = json.loads(result.output)
    assert found["versions"]["rnndsl"] == __version__
    assert found["versions"]["numba"] and found["versions"]["numpy"]
    assert found["kernel_cache"] == str(tmp_path / "cache")
    assert found["cuda"]["imports"] in (True, False)
    text = CliRunner().invoke(app, ["info"])
    assert text.exit_code == 0 and "CUDA target:" in text.output and "kernel cache:" in text.output


def test_info_in_the_simulator_names_each_pass_time_loop(tmp_path):
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "1", "RNNDSL_CACHE_DIR": str(tmp_path)}
    env.pop("RNNDSL_CUDA_GRAPHS", None)  # the default cache size
    out = subprocess.run([sys.executable, "-m", "rnndsl.cli", "info", "--json"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    cuda = json.loads(out.stdout)["cuda"]
    assert cuda["simulator"] is True and cuda["gemm_backend"] == "numba"
    assert set(cuda["time_loop"]) == {"lstm S", "lstm M", "lstm L", "lstm T1"}
    for passes in cuda["time_loop"].values():
        assert set(passes) == {"forward", "backward"}
        assert all(re.fullmatch(r"per-step|single-block|multi-block \(\d+ blocks\)", m)
                   for m in passes.values())
    assert cuda["graphs"] == {"captured": False, "why_not": "Numba's CUDA simulator",
                              "cache_size": 8}
    text = subprocess.run([sys.executable, "-m", "rnndsl.cli", "info"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert "per-step time loops: launched step by step, no CUDA graphs (Numba's CUDA " \
        "simulator)" in text.stdout, text.stdout


def test_info_says_when_graphs_are_turned_off(tmp_path):
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "1", "RNNDSL_CACHE_DIR": str(tmp_path),
           "RNNDSL_CUDA_GRAPHS": "0"}
    out = subprocess.run([sys.executable, "-m", "rnndsl.cli", "info", "--json"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    graphs = json.loads(out.stdout)["cuda"]["graphs"]
    assert graphs == {"captured": False, "why_not": "turned off (RNNDSL_CUDA_GRAPHS=0)",
                      "cache_size": 0}


def test_a_cuda_support_that_cannot_import_is_reported_not_raised(monkeypatch):
    # as numba-cuda 0.30 does on NumPy 2.5 (np.row_stack is gone)
    import rnndsl.backend

    monkeypatch.setitem(sys.modules, "rnndsl.backend.cuda_support", None)
    monkeypatch.delattr(rnndsl.backend, "cuda_support", raising=False)
    result = CliRunner().invoke(app, ["info"])
    assert result.exit_code == 0, result.output
    assert "CUDA target: cannot import Numba's CUDA support (ModuleNotFoundError" in result.output


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"),
                    reason="OpenBLAS's x86 kernels are named only on x86")
@pytest.mark.parametrize("kernels", ["Sandybridge", "Haswell"])
def test_info_names_the_kernels_openblas_runs(tmp_path, kernels):
    # OPENBLAS_CORETYPE makes OpenBLAS load the named CPU's kernels (both run on any x86-64
    # with AVX2); the report must name what it loaded, not what the machine is
    env = {**os.environ, "RNNDSL_CACHE_DIR": str(tmp_path), "OPENBLAS_CORETYPE": kernels}
    out = subprocess.run([sys.executable, "-m", "rnndsl.cli", "info", "--json"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["cpu_blas"]["kernels"] == kernels


def test_the_cpu_model_is_read_off_cpuinfo(tmp_path):
    # /proc/cpuinfo's layout: tab-padded keys, one block per processor
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 26\n"
                       "model\t\t: 2\nmodel name\t: AMD EPYC\n\nprocessor\t: 1\n"
                       "model name\t: another\n")
    assert cpu_model(str(cpuinfo)) == "AMD EPYC, family 26 model 2"
    assert cpu_model(str(tmp_path / "absent")) is None
    cpuinfo.write_text("processor\t: 0\nBogoMIPS\t: 50.00\n")  # no model name (some ARM)
    assert cpu_model(str(cpuinfo)) is None
