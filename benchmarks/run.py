"""rnndsl against its peers on the fixed workloads, in one run; prints a Markdown table of
medians and ratios (rnndsl time / peer time: below 1 means rnndsl is faster). Each row's
passes are timed in turns (rnndsl.bench.Turns: every pass once a round, each timed call
right after at least 50 ms of untimed calls of the same pass), so a slow spell of the
machine falls on rnndsl and its peers alike.

    python benchmarks/run.py                     # the README table (several minutes)
    python benchmarks/run.py --specs lstm --sizes S T1 --json

The peers, each the strongest of its kind that a user would write:
- nn: torch.nn.LSTM / GRU / RNN, for the cells PyTorch has (oneDNN runs the LSTM).
- eager: the cell as a PyTorch loop written by hand (rnndsl.peer_cells): the weights of all
  gates stacked, the input products hoisted into one matmul over all T*B rows, one stacked
  recurrent matmul per step over `x.unbind(0)`, gates by `chunk`, autograd for the backward.
  A spec without a hand-written loop gets rnndsl.peers.EagerLoop, the same shape evaluated
  from the cell's step IR.
- compile: the same loop with its step (and the hoisted input side) under torch.compile
  (Inductor), the way a recurrent loop is compiled: one graph of the step, reused T times.
  Compiling the whole loop would unroll all T steps (up to 1000) into one graph. The warm-up
  runs compile; they are not timed.
- jax: the same cell under jax.lax.scan and jax.jit, forward and jax.grad of the sum of the
  outputs w.r.t. every weight and the input, timed up to block_until_ready; only where JAX is
  installed (the `bench` extra).
compile and jax exist for the cells with a hand-written loop (all of DEFAULT).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np
import torch

import rnndsl
from rnndsl import peers
from rnndsl.backend.blas import blas_kernels
from rnndsl.environment import cpu_model
from rnndsl.bench import Turns, cell_passes, gemm_gflops, problem
from rnndsl.peer_cells import hand_cell

try:
    from rnndsl import jax_peers
except ImportError:  # JAX is an optional extra: no JAX column then
    jax_peers = None

DEFAULT = [("lstm", "S"), ("lstm", "M"), ("lstm", "L"), ("lstm", "T1"),
           ("gru", "S"), ("gru", "M"), ("gru", "L"), ("gru", "T1"),
           ("elman", "S"), ("elman", "M"), ("elman", "L"), ("elman", "T1"),
           *[(s, w) for s in ("peephole_lstm", "indrnn", "layernorm_lstm", "mgu")
             for w in ("S", "L", "T1")]]
PEERS = {"torch": "nn", "eager": "eager", "compile": "torch.compile", "jax": "JAX scan"}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--specs", nargs="*")
    ap.add_argument("--sizes", nargs="*")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--no-eager", action="store_true",
                    help="skip the eager PyTorch loops (and their torch.compile)")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    ap.add_argument("--no-jax", action="store_true", help="skip JAX")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    cases = [(s, w) for s, w in DEFAULT
             if (not args.specs or s in args.specs) and (not args.sizes or w in args.sizes)]
    if args.specs and not cases:
        cases = [(s, w) for s in args.specs for w in (args.sizes or ["S", "L", "T1"])]
    rows = []
    for spec, size in cases:
        cell = rnndsl.compile(spec)
        turns = Turns()  # rnndsl and its peers in turns, so a slow spell falls on all alike
        forward, forward_backward, flops = cell_passes(cell, size)
        slots = {"rnndsl": (turns(forward), turns(forward_backward))}
        lib = peers.time_library(spec, size, timer=turns)
        if lib:
            slots["torch"] = lib
        params, xs, sizes = problem(cell, size)
        hand = hand_cell(cell)
        if not args.no_eager:
            slots["eager"] = peers.time_eager(cell, params, xs, sizes, timer=turns)
            if hand and not args.no_compile:  # two warm-ups: graphs with and without grad
                slots["compile"] = peers.time_eager(
                    cell, params, xs, sizes, compiled=True,
                    timer=lambda fn, n: turns(fn, n, warmup=2))
        if hand and jax_peers and not args.no_jax:
            slots["jax"] = jax_peers.time_scan(hand, params, xs["x"], sizes["hidden"],
                                               timer=turns)
        turns.run(args.repeats)
        row = {"spec": spec, "size": size}
        for who, (f, fb) in slots.items():
            row[f"{who}_fwd"], row[f"{who}_fwdbwd"] = turns.median(f), turns.median(fb)
        row["rnndsl_gflops"] = flops / row["rnndsl_fwd"] / 1e9
        rows.append(row)
        print(_line(row), file=sys.stderr, flush=True)
    info = {"machine": f"{cpu_model() or platform.processor() or platform.machine()}, "
                       f"{os.cpu_count()} cores",
            "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
            "jax": jax_peers.jax.__version__ if jax_peers else None,
            "numpy": np.__version__, "gemm_gflops_f32": gemm_gflops(),
            "blas_kernels": blas_kernels(),
            "load_average": os.getloadavg()}
    if args.json:
        print(json.dumps({"info": info, "rows": rows}, indent=1))
        return
    load = ", ".join(f"{v:.1f}" for v in info["load_average"])
    print(f"Machine: {info['machine']}; {info['date']}; torch {info['torch']}; "
          f"jax {info['jax'] or 'not installed'}; float32 GEMM (rnndsl.backend.blas, OpenBLAS's "
          f"{info['blas_kernels'] or 'unknown'} kernels) {info['gemm_gflops_f32']:.0f} GFLOP/s; "
          f"load average at the end {load}. Medians of "
          f"{args.repeats} runs taken in turns, ms, forward / forward+backward; "
          "ratio = rnndsl / peer.\n")
    print("| cell | size | rnndsl | " + " | ".join(PEERS.values()) + " | rnndsl GFLOP/s |")
    print("|" + "---|" * (len(PEERS) + 4))
    for r in rows:
        print("| " + " | ".join(_cells(r)) + " |")


def _pair(a, b):
    return f"{a * 1e3:.2f} / {b * 1e3:.2f}"


def _cells(r):
    out = [r["spec"], r["size"], _pair(r["rnndsl_fwd"], r["rnndsl_fwdbwd"])]
    for peer in PEERS:
        f, fb = r.get(f"{peer}_fwd"), r.get(f"{peer}_fwdbwd")
        out.append("" if f is None else f"{_pair(f, fb)} ({r['rnndsl_fwd'] / f:.2f}x / "
                                        f"{r['rnndsl_fwdbwd'] / fb:.2f}x)")
    return out + [f"{r['rnndsl_gflops']:.1f}"]


def _line(r):
    return " ".join(_cells(r))


if __name__ == "__main__":
    main()
