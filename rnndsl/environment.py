"""What rnndsl runs on, for `rnndsl info`: versions of what it uses, the CPU kernels' BLAS, the
kernel cache, and the CUDA target: whether it imports, the GPU it found, who does its GEMMs,
which time loop the auto mode gives each pass on the benchmark workloads, and whether the
per-step loops are captured as CUDA graphs."""
from __future__ import annotations

import os
import platform
import sys
from importlib import metadata

from rnndsl import __version__

REQUIRED = ("numpy", "numba", "llvmlite", "scipy", "lark", "pyyaml", "typer")
OPTIONAL = ("torch", "onnx", "onnxruntime", "onnxscript", "matplotlib", "ray", "numba-cuda",
            "cupy-cuda12x", "cupy-cuda11x")


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def cpu_model(cpuinfo: str = "/proc/cpuinfo") -> str | None:
    """The CPU's model name and family (Linux), which a benchmark's figures depend on: the same
    name covers generations ("AMD EPYC", family 25 or 26), or None where it cannot be read."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            pairs = [line.split(":", 1) for line in f.read().split("\n\n")[0].splitlines()
                     if ":" in line]
        fields = {key.strip(): value.strip() for key, value in pairs}
    except OSError:
        return None
    name = fields.get("model name", "")
    family, model = fields.get("cpu family", ""), fields.get("model", "")
    if not name:
        return None
    return f"{name}, family {family} model {model}" if family else name


def report() -> dict:
    from rnndsl.backend.blas import blas_kernels, blas_threads
    from rnndsl.backend.loader import cache_root

    versions = {"rnndsl": __version__, "python": sys.version.split()[0]}
    versions.update({d: _version(d) for d in REQUIRED})
    versions.update({d: v for d in OPTIONAL if (v := _version(d)) is not None})
    try:
        cache = str(cache_root())
    except Exception as exc:  # an unusable home: the error says what to set
        cache = f"unusable: {exc}"
    return {"versions": versions,
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()}",
            "cpu": cpu_model(),
            "cpu_blas": {"library": "the OpenBLAS bundled with SciPy (Numba's np.dot)",
                         "threads": blas_threads(), "kernels": blas_kernels()},
            "kernel_cache": cache,
            "cuda": _cuda()}


def _cuda() -> dict:
    """The CUDA target as this process would use it. The import of Numba's CUDA support can
    fail on a stack it does not support (numba-cuda 0.30 on NumPy 2.5): that is reported."""
    try:
        from rnndsl.backend import cuda_support as cs
    except Exception as exc:
        return {"imports": False, "error": f"{type(exc).__name__}: {exc}"}
    out = {"imports": True, "simulator": cs.SIMULATOR, "gpu": None}
    if not cs.available():
        return out
    if not cs.SIMULATOR:
        device = cs.cuda.get_current_device()
        name = device.name.decode() if isinstance(device.name, bytes) else str(device.name)
        out["gpu"] = {"name": name, "compute_capability": ".".join(map(str, device.compute_capability)),
                      "multiprocessors": int(device.MULTIPROCESSOR_COUNT)}
    out["gemm_backend"] = cs.backend()
    out["time_loop"] = _time_loops(cs)
    out["graphs"] = _graphs()
    return out


def _graphs() -> dict:
    """Whether the per-step time loops would be captured as CUDA graphs, and why not."""
    from rnndsl.backend import cuda_graphs as cg

    reason = cg.why_not()
    return {"captured": reason is None, "why_not": reason, "cache_size": cg.graph_cache_size()}


def _time_loops(cs) -> dict:
    """For the LSTM on each benchmark workload in float32, per pass, the time loop that the
    auto mode takes: 'single-block', 'multi-block (N blocks)' (persistent kernels) or
    'per-step' (one launch per step and phase, GEMMs in cuBLAS)."""
    from rnndsl import compiler
    from rnndsl.bench import WORKLOADS, workload_sizes
    from rnndsl.backend.emit_cuda import persistent_grids

    cell = compiler.compile("lstm", target="cuda")
    limit = cs.cooperative_blocks(None, cs.THREADS)
    out = {}
    for workload in WORKLOADS:
        _, batch, sizes = workload_sizes(cell, workload)
        grids = persistent_grids(cell.engine.plan, sizes, batch, 4, limit, cs.shared_limit())
        out[f"lstm {workload}"] = {p: f"{v} ({n} blocks)" if v == "multi-block" else v
                                   for p, (v, n) in grids.items()}
    return out


def lines(info: dict) -> list[str]:
    """The report as text."""
    out = ["versions: " + ", ".join(f"{k} {v}" for k, v in info["versions"].items()),
           f"machine: {info['machine']}" + (f"; {info['cpu']}" if info["cpu"] else ""),
           f"CPU kernels' BLAS: {info['cpu_blas']['library']}, "
           f"{info['cpu_blas']['threads'] or 'unknown'} thread(s), "
           f"{info['cpu_blas']['kernels'] or 'unknown'} kernels",
           f"kernel cache: {info['kernel_cache']}"]
    cuda = info["cuda"]
    if not cuda["imports"]:
        out.append(f"CUDA target: cannot import Numba's CUDA support ({cuda['error']})")
        return out
    if cuda["simulator"]:
        out.append("CUDA target: Numba's simulator (NUMBA_ENABLE_CUDASIM=1), on the CPU")
    elif cuda["gpu"] is None:
        out.append("CUDA target: no GPU found")
        return out
    else:
        gpu = cuda["gpu"]
        out.append(f"CUDA target: {gpu['name']} (compute capability "
                   f"{gpu['compute_capability']}, {gpu['multiprocessors']} multiprocessors)")
    out.append(f"  GEMMs: {cuda['gemm_backend']}")
    for what, passes in cuda["time_loop"].items():
        out.append(f"  time loop, {what}: " +
                   ", ".join(f"{p} {mode}" for p, mode in passes.items()))
    graphs = cuda["graphs"]
    if graphs["captured"]:
        out.append(f"  per-step time loops: captured as CUDA graphs and replayed (at most "
                   f"{graphs['cache_size']} kept; RNNDSL_CUDA_GRAPHS=0 turns them off)")
    else:
        out.append(f"  per-step time loops: launched step by step, no CUDA graphs "
                   f"({graphs['why_not']})")
    return out
