"""Overhead of the PyTorch bridge over calling a cell's kernels directly, at S and T1.

Three ways to run the same forward+backward pass (float32, loss = sum of the outputs,
gradients for every parameter and the input), medians (and minima) of several interleaved
runs after a warm-up:
  direct  cell.forward + cell.backward on NumPy arrays (the kernels and the runtime's checks)
  op      rnndsl.torch.cell_apply (the custom op) with torch autograd
  module  rnndsl.torch.RNN(spec, I, H) forward + output.sum().backward()
Overhead = op or module time / direct time - 1.

    python benchmarks/bridge_overhead.py                 # lstm at S and T1
    python benchmarks/bridge_overhead.py --specs lstm --sizes S --repeats 5
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

import rnndsl
from rnndsl.torch import RNN, cell_apply

WORKLOADS = {"S": (100, 16, 128, 128), "T1": (1000, 1, 64, 64)}  # T, B, I, H


def interleaved_times(fns: dict, repeats: int) -> dict:
    """Median and minimum time of each function, the functions run in turn within each repeat
    (so that load from other processes falls on all of them alike)."""
    for fn in fns.values():
        fn()  # warm-up (compiles the kernels)
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: (float(np.median(t)), min(t)) for name, t in times.items()}


def measure(spec: str, workload: str, repeats: int, target: str | None) -> dict:
    T, B, I, H = WORKLOADS[workload]
    torch.manual_seed(0)
    module = RNN(spec, I, H, target=target, dtype=torch.float32)
    cell = module.cell
    params = [p.detach() for p in module.layer_params(0)]
    arrays = {n: p.numpy() for n, p in zip(cell.params, params)}
    x = torch.randn(T, B, I)
    ones = np.ones((T, B, H), np.float32)

    def direct():
        fwd = cell.forward(arrays, x.numpy())
        cell.backward(arrays, fwd, ones)

    leaves = [p.clone().requires_grad_() for p in params]
    xg = x.clone().requires_grad_()

    def op():
        outs, _ = cell_apply(cell, leaves, xg)
        outs[cell.outputs[0]].sum().backward()

    def mod():
        out, _ = module(xg)
        out.sum().backward()

    times = interleaved_times({"direct": direct, "op": op, "module": mod}, repeats)
    return {"spec": spec, "workload": workload, "engine": cell.engine.name, **times}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--specs", nargs="+", default=["lstm"])
    ap.add_argument("--sizes", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--target", default=None, help="rnndsl target (default: rnndsl's default)")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, "
          "forward+backward, ms: median (min)")
    print("| spec | workload | engine | direct | op | module | op overhead | module overhead |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for spec in args.specs:
        for w in args.sizes:
            r = measure(spec, w, args.repeats, args.target)
            (d, dmin), (o, omin), (m, mmin) = r["direct"], r["op"], r["module"]
            print(f"| {spec} | {w} | {r['engine']} | {1e3 * d:.2f} ({1e3 * dmin:.2f}) | "
                  f"{1e3 * o:.2f} ({1e3 * omin:.2f}) | {1e3 * m:.2f} ({1e3 * mmin:.2f}) | "
                  f"{100 * (o / d - 1):+.1f}% ({100 * (omin / dmin - 1):+.1f}%) | "
                  f"{100 * (m / d - 1):+.1f}% ({100 * (mmin / dmin - 1):+.1f}%) |")

if __name__ == "__main__":
    main()
