"""Block-diagonal recurrent matrices on the cpu target: one forward+backward pass of slstm,
whose kernels multiply by the diagonal blocks alone, against the same cell with dense
recurrent matrices (the spec without `blocks:`) run on the same parameters, zeros off the
blocks included, and against the reference engine; medians of alternated runs after a
warm-up that compiles the kernels, and how far each one's gradients are from the reference's
in float64.

    python benchmarks/block_bench.py                      # T=100 B=16 I=H=128, 4 heads, float32
    python benchmarks/block_bench.py --heads 8 --repeats 21
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np

import rnndsl
from rnndsl.compiler import builtin_specs
from rnndsl.symbolic.ops import block_diagonal


def dense_text() -> str:
    """slstm with its recurrent matrices declared without blocks: dense products."""
    text = builtin_specs()["slstm"].read_text()
    return text.replace(", blocks: heads}", "}")


def one_pass(cell, params, x, d_out) -> tuple[float, dict]:
    start = time.perf_counter()
    grads = cell.backward(params, cell.forward(params, x), d_out)
    return time.perf_counter() - start, grads.params


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-T", type=int, default=100)
    ap.add_argument("-B", type=int, default=16)
    ap.add_argument("--size", type=int, default=128, help="input and hidden size")
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=11)
    args = ap.parse_args()
    constants = {"heads": args.heads}
    cells = {"blocks": rnndsl.compile("slstm", constants=constants),
             "dense": rnndsl.compile(dense_text(), constants=constants),
             "reference": rnndsl.compile("slstm", target="reference", constants=constants)}
    params = cells["blocks"].init_params(input=args.size, hidden=args.size, seed=0,
                                         dtype=np.float32)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.T, args.B, args.size)).astype(np.float32)
    d_out = rng.standard_normal((args.T, args.B, args.size)).astype(np.float32)
    times: dict[str, list[float]] = {name: [] for name in cells}
    grads = {name: one_pass(cell, params, x, d_out)[1] for name, cell in cells.items()}
    for k in range(args.repeats):  # alternated, so that a busy moment hurts each alike
        for name, cell in cells.items():
            if name != "reference" or k < 3:  # the reference is slow; three runs tell its time
                times[name].append(one_pass(cell, params, x, d_out)[0])
    exact = one_pass(cells["reference"], {p: v.astype(np.float64) for p, v in params.items()},
                     x.astype(np.float64), d_out.astype(np.float64))[1]
    blocks = {p: info.blocks for p, info in cells["blocks"].params.items()}
    # relative to the largest entry of any parameter's gradient (d b_i is rounding noise
    # around 0 where the input gate sets the stabiliser: i = exp(i~ - m) = 1 whatever i~ is);
    # of the dense cell's gradients, their blocks
    scale = max(np.abs(g).max() for g in exact.values())
    worst = {name: max(float(np.abs(block_diagonal(grads[name][p], blocks[p]) - exact[p]).max())
                       for p in exact) / scale for name in cells}
    print(f"slstm, T={args.T} B={args.B} I=H={args.size}, {args.heads} heads, float32, "
          f"forward+backward, load average {os.getloadavg()[0]:.1f}")
    best = np.median(times["blocks"])
    for name, ts in times.items():
        print(f"  {name:<10} {1e3 * np.median(ts):8.2f} ms  (median of {len(ts)}, best "
              f"{1e3 * min(ts):.2f})  {np.median(ts) / best:5.2f}x the blocks' time")
    print("  largest relative difference of a gradient from the float64 reference's: " +
          ", ".join(f"{name} {w:.1e}" for name, w in worst.items()))

if __name__ == "__main__":
    main()
