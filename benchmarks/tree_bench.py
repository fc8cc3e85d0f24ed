"""Tree cells: forward + backward of a batch of trees, rnndsl (level by level, CPU kernels)
against the same cell in eager PyTorch written recursively (a node at a time), float32.

    python benchmarks/tree_bench.py            # about a minute on 2 cores

Workload: 256 random full binary trees of 31 to 63 nodes, an input of 128 on every node,
hidden 128; the loss is the sum of the roots' h. rnndsl is timed as the median of --repeats
runs after a warm-up run (kernels compiled); PyTorch once, after a warm-up on one tree. Both
use --threads BLAS threads (1 by default: on a machine shared with other work, multithreaded
BLAS calls that wait for a busy core vary by 3x from run to run).
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

import rnndsl
from rnndsl.backend.blas import blas_threads
from rnndsl.engines.tree import TreeBatch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from tree_references import REFERENCES  # noqa: E402  (the recursive PyTorch cells)


def full_binary_trees(rng, count: int, smallest: int, largest: int) -> list[list[int]]:
    """Parent arrays: each tree grown by splitting a random leaf until it has n nodes."""
    trees = []
    for _ in range(count):
        n = int(rng.integers(smallest // 2, largest // 2 + 1)) * 2 + 1
        parent, leaves = [-1], [0]
        while len(parent) < n:
            leaf = leaves.pop(int(rng.integers(len(leaves))))
            leaves += [len(parent), len(parent) + 1]
            parent += [leaf, leaf]
        trees.append(parent)
    return trees


def time_eager(name, params, parents, inputs) -> float:
    p = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    start = time.perf_counter()
    loss = 0
    for parent, x in zip(parents, inputs):
        kids = [[] for _ in parent]
        for i, q in enumerate(parent):
            if q >= 0:
                kids[q].append(i)
        loss = loss + REFERENCES[name][0](p, torch.from_numpy(x), kids, 0)[0].sum()
    loss.backward()
    return time.perf_counter() - start


def time_rnndsl(cell, params, batch, repeats: int) -> float:
    d = np.zeros((batch.size, 128), np.float32)
    d[batch.roots] = 1.0
    times = []
    for _ in range(repeats + 1):  # the first run compiles the kernels
        start = time.perf_counter()
        cell.backward(params, cell.forward(params, batch), d)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trees", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    blas_threads(args.threads)
    rng = np.random.default_rng(0)
    parents = full_binary_trees(rng, args.trees, 31, 63)
    inputs = [rng.standard_normal((len(p), 128)).astype(np.float32) for p in parents]
    batch = TreeBatch.from_parents(parents, inputs)
    heights = len(batch.levels)
    print(f"{args.trees} trees, {batch.size} nodes ({min(map(len, parents))}-"
          f"{max(map(len, parents))} per tree), {heights} levels; input = hidden = 128, float32, "
          f"{args.threads} thread(s)")
    print("| cell | rnndsl fwd+bwd ms | eager PyTorch (recursive) fwd+bwd ms | ratio |")
    print("|---|---|---|---|")
    for name in ("binary_tree_lstm", "child_sum_tree_lstm"):
        cell = rnndsl.compile(name)
        params = cell.init_params(input=128, hidden=128, seed=0)
        mine = time_rnndsl(cell, params, batch, args.repeats)
        time_eager(name, params, parents[:1], inputs[:1])  # warm-up
        theirs = time_eager(name, params, parents, inputs)
        print(f"| {name} | {mine * 1e3:.1f} | {theirs * 1e3:.0f} | {theirs / mine:.1f}x |",
              flush=True)


if __name__ == "__main__":
    main()
