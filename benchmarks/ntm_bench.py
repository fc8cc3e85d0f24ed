"""The Neural Turing Machine, forward + backward on the CPU: rnndsl's cpu kernels for the
built-in `ntm` against the same NTM as a PyTorch user writes it (rnndsl.eager_ntm.EagerNTM: an
nn.LSTMCell controller, nn.Linear heads, a Python loop over time), loaded with the same
parameters, float32.

    python benchmarks/ntm_bench.py     # batch 16, 128 slots x 20, T=40, hidden 100, input 9

Both start from zero states (the eager module's default) and take the loss sum(y * d_y) for a
fixed random d_y; a pass is forward plus the gradients of every parameter and of the input.
The first pass of each compiles or warms up; then --repeats passes of each, in turns, and
the medians. Both run on --threads threads (1 by default; with more, rnndsl's row kernels
split the batch rows between that many threads and torch runs each operation on them). Before timing, both compute the loss and every gradient of one pass
(by rnndsl's parameter names, through torch.func.functional_call) and must agree to
--tolerance, relative to each array's largest element or 1e-3 if that is smaller (some
gradients, such as the read gate's at the first steps from zero weightings, are rounding
noise in both).
"""
from __future__ import annotations

import argparse
import os
import platform
from datetime import datetime, timezone

import numpy as np
import torch

import rnndsl
from rnndsl.backend.blas import blas_threads
from rnndsl.bench import Turns
from rnndsl.eager_ntm import EagerNTM


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


class Problem:
    """The cell, its parameters, an input, d_y and zero initial states, in float32."""

    def __init__(self, sizes: dict, T: int, B: int, seed: int = 0):
        self.sizes, self.T, self.B = sizes, T, B
        self.cell = rnndsl.compile("ntm")
        self.params = self.cell.init_params(seed=seed, dtype=np.float32, **sizes)
        rng = np.random.default_rng(seed)
        self.x = rng.standard_normal((T, B, sizes["input"])).astype(np.float32)
        self.d_y = rng.standard_normal((T, B, sizes["hidden"])).astype(np.float32)
        self.state0 = {s: np.zeros((B, *(sizes[d] for d in (n if isinstance(n, tuple) else (n,)))),
                                   np.float32) for s, n in self.cell.states.items()}
        self.module = EagerNTM(*sizes.values(), dtype=torch.float32)
        self.module.load_rnndsl(self.params)

    def rnndsl_pass(self):
        """Loss, parameter gradients by name, input gradient."""
        fwd = self.cell.forward(self.params, self.x, self.state0)
        grads = self.cell.backward(self.params, fwd, self.d_y)
        return float((fwd.output * self.d_y).sum(dtype=np.float64)), grads.params, \
            grads.inputs["x"]

    def eager_pass(self):
        """What a PyTorch user times: forward, the loss, backward (gradients in .grad)."""
        self.module.zero_grad(set_to_none=True)
        x = torch.from_numpy(self.x).requires_grad_()
        y, _ = self.module(x)
        (y * torch.from_numpy(self.d_y)).sum().backward()
        return x

    def eager_gradients(self):
        """The eager module's loss and gradients by rnndsl's names (functional_call)."""
        tensors = {p: torch.tensor(v, requires_grad=True) for p, v in self.params.items()}
        x = torch.from_numpy(self.x).requires_grad_()
        state0 = {s: torch.from_numpy(v) for s, v in self.state0.items()}
        y, _ = torch.func.functional_call(self.module, self.module.stacked(tensors), (x, state0))
        loss = (y.double() * torch.from_numpy(self.d_y).double()).sum()
        loss.backward()
        grads = {p: (t.grad.numpy() if t.grad is not None else np.zeros_like(self.params[p]))
                 for p, t in tensors.items()}
        return float(loss.detach()), grads, x.grad.numpy()


FLOOR = 1e-3  # gradients below this cancel to rounding noise (zero initial weightings)


def relative(a, b) -> float:
    """max |a - b| / max(max |b|, FLOOR)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max(initial=0.0) / max(np.abs(b).max(initial=0.0), FLOOR))


def check(problem: Problem, tolerance: float) -> float:
    """The worst relative difference of the loss and every gradient; fails past tolerance."""
    loss, dparams, dx = problem.rnndsl_pass()
    want_loss, want_params, want_dx = problem.eager_gradients()
    diffs = {"loss": relative(loss, want_loss), "d x": relative(dx, want_dx)}
    diffs.update({f"d {p}": relative(dparams[p], want_params[p]) for p in want_params})
    worst = max(diffs, key=diffs.get)
    if not diffs[worst] <= tolerance:
        raise SystemExit(f"rnndsl and the eager NTM disagree: {worst} differs by "
                         f"{diffs[worst]:.3g} (tolerance {tolerance:g})")
    return diffs[worst]


def median_seconds(problem: Problem, repeats: int) -> tuple[float, float]:
    """Medians of `repeats` passes of each, in turns (rnndsl.bench.Turns: each timed pass right
    after at least 50 ms of untimed ones of the same side, so that torch's OpenMP threads,
    which spin for a while after an eager pass, have wound down before an rnndsl pass is
    timed)."""
    turns = Turns()
    mine, theirs = turns(problem.rnndsl_pass), turns(problem.eager_pass)
    turns.run(repeats)
    return turns.median(mine), turns.median(theirs)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-B", "--batch", type=int, default=16)
    ap.add_argument("-T", "--steps", type=int, default=40)
    ap.add_argument("--slots", type=int, default=128)
    ap.add_argument("--width", type=int, default=20)
    ap.add_argument("--hidden", type=int, default=100)
    ap.add_argument("--input", type=int, default=9)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tolerance", type=float, default=1e-3)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    blas_threads(args.threads)
    sizes = {"input": args.input, "hidden": args.hidden, "slots": args.slots,
             "width": args.width}
    problem = Problem(sizes, args.steps, args.batch)
    worst = check(problem, args.tolerance)
    mine, theirs = median_seconds(problem, args.repeats)
    print(f"{cpu_model()}, {os.cpu_count()} cores, load average "
          f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}, "
          f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; torch {torch.__version__}, "
          f"{args.threads} thread(s)")
    print(f"ntm, batch {args.batch}, {args.slots} slots x {args.width}, T={args.steps}, hidden "
          f"{args.hidden}, input {args.input}, float32; loss and every gradient agree to "
          f"{worst:.1g}")
    print(f"forward+backward, median of {args.repeats}: rnndsl cpu {mine * 1e3:.1f} ms, eager "
          f"PyTorch {theirs * 1e3:.1f} ms, ratio {theirs / mine:.1f}x")
    return mine, theirs


if __name__ == "__main__":
    main()
