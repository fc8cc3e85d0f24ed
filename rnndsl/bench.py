"""Timing rnndsl cells on the fixed workloads; peers (PyTorch) live in rnndsl/peers.py.

Times are medians of several runs after a warm-up (which also compiles). "forward" runs the
cell over the batch for inference (nothing kept for backward, as PyTorch under no_grad);
"forward+backward" also computes the gradients of the sum of all outputs for every
parameter and the input.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from rnndsl.language.errors import UserError
from rnndsl.engines.cell import Cell
from rnndsl.summary import evaluate_poly, flops_per_step

# name: (T, B, input size, hidden size)
WORKLOADS = {
    "S": (100, 16, 128, 128),
    "M": (100, 64, 512, 512),
    "L": (500, 8, 256, 256),
    "T1": (1000, 1, 64, 64),
}


def median_time(fn, repeats: int = 7, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def workload_sizes(cell: Cell, workload: str) -> tuple[int, int, dict[str, int]]:
    """T, B and a value for every size of the cell: `input` is I, every other size is H."""
    T, B, I, H = WORKLOADS[workload]
    return T, B, {s: (I if s == "input" else H) for s in cell.sizes}


def problem(cell: Cell, workload: str, dtype=np.float32, seed: int = 0):
    T, B, sizes = workload_sizes(cell, workload)
    params = cell.init_params(seed=seed, dtype=dtype, **sizes)
    rng = np.random.default_rng(seed)
    xs = {x: rng.standard_normal((T, B, sizes[n])).astype(dtype) for x, n in cell.inputs.items()}
    return params, xs, sizes


@dataclass
class CellTiming:
    forward: float
    forward_backward: float
    forward_gflops: float  # useful FLOPs per second of the forward pass


def time_cell(cell: Cell, workload: str, dtype=np.float32, repeats: int = 7) -> CellTiming:
    params, xs, sizes = problem(cell, workload, dtype)
    T, B, _ = workload_sizes(cell, workload)

    def forward():
        return cell.forward(params, xs, save=False)

    def forward_backward():
        fwd = cell.forward(params, xs)
        return cell.backward(params, fwd, {o: np.ones_like(v) for o, v in fwd.outputs.items()})

    f = median_time(forward, repeats)
    fb = median_time(forward_backward, repeats)
    flops = evaluate_poly(flops_per_step(cell.step.roots()), sizes) * T * B
    return CellTiming(f, fb, flops / f / 1e9)


def gemm_gflops(dtype=np.float32, n: int = 1024, repeats: int = 7) -> float:
    """The machine's GEMM rate through the BLAS the kernels call (rnndsl.backend.blas), the roofline
    for the large workloads."""
    from rnndsl.backend.blas import gemm

    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n)).astype(dtype)
    b = rng.standard_normal((n, n)).astype(dtype)
    return 2 * n ** 3 / median_time(lambda: gemm(a, b), repeats) / 1e9


def load_peers():
    """rnndsl.peers: PyTorch's modules and an eager loop of any spec (needs PyTorch)."""
    try:
        from rnndsl import peers
    except ImportError as exc:
        raise UserError(f"timing against PyTorch needs torch ({exc}): pip install "
                        "'rnndsl[torch]'") from None
    return peers
