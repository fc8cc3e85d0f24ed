"""Timing rnndsl cells on the fixed workloads; peers (PyTorch) live in rnndsl/peers.py.

Times are medians of several runs after a warm-up (which also compiles). "forward" runs the
cell over the batch for inference (nothing kept for backward, as PyTorch under no_grad);
"forward+backward" also computes the gradients of the sum of all outputs for every
parameter and the input.
"""
from __future__ import annotations

import time

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


# Seconds of untimed calls before each timed one in `Turns`
SETTLE = 0.05


class Turns:
    """A timer with median_time's call (`turns(fn, repeats)`) that times later, in turns: each
    function is warmed up when handed over and a slot number comes back; `run` then gives
    every function a turn a round, `repeats` rounds, and `median(slot)` gives its median. A
    slow spell of the machine (this project's VM ran the same pass 1.6 ms and 2.8 ms seconds
    apart) then falls on all of them alike, not on one, and ratios of them hold where times
    taken one after the other did not. A turn is untimed calls of the function for at least
    `settle` seconds (one call at least), then the timed one: threads that the previous
    library's call left spinning wind down meanwhile, and the cores this library's threads
    need are awake, as in a program that calls one library in a loop (after a pause instead,
    the VM's idle second core woke slowly: Elman at T1 forward+backward took 23 ms after a
    50 ms pause, 1 ms without). One untimed call was not enough: torch's OpenMP team spins
    for milliseconds after each operation, and rnndsl's LSTM forward at S, timed in turns
    with nn.LSTM, took 4.6-5.2 ms after one untimed call, 2.8-2.9 after 50-100 ms of them,
    2.9 with no torch call in the process; nn.LSTM's took 3.1-3.2 and 2.6-2.7 ms."""

    def __init__(self, settle: float = SETTLE):
        self._fns, self._times = [], []
        self.settle = settle

    def __call__(self, fn, repeats: int = 7, warmup: int = 1) -> int:
        for _ in range(warmup):
            fn()
        self._fns.append(fn)
        self._times.append([])
        return len(self._fns) - 1

    def run(self, repeats: int) -> None:
        for _ in range(repeats):
            for fn, times in zip(self._fns, self._times):
                start = time.perf_counter()
                fn()
                while time.perf_counter() - start < self.settle:
                    fn()
                start = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start)

    def median(self, slot: int) -> float:
        return float(np.median(self._times[slot]))


def cell_passes(cell: Cell, workload: str, dtype=np.float32):
    """The two timed passes of a cell on a workload, (forward, forward_backward), and the
    forward's FLOPs."""
    params, xs, sizes = problem(cell, workload, dtype)
    T, B, _ = workload_sizes(cell, workload)

    def forward():
        return cell.forward(params, xs, save=False)

    def forward_backward():
        fwd = cell.forward(params, xs)
        return cell.backward(params, fwd, {o: np.ones_like(v) for o, v in fwd.outputs.items()})

    return forward, forward_backward, evaluate_poly(flops_per_step(cell.step.roots()), sizes) * T * B


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
