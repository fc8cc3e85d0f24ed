"""rnndsl against PyTorch on the fixed workloads, in one run; prints a Markdown table of
medians and ratios (rnndsl time / peer time: below 1 means rnndsl is faster).

    python benchmarks/run.py                     # the README table (several minutes)
    python benchmarks/run.py --specs lstm --sizes S T1 --json
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
from rnndsl.bench import gemm_gflops, problem, time_cell

DEFAULT = [("lstm", "S"), ("lstm", "M"), ("lstm", "L"), ("lstm", "T1"),
           ("gru", "S"), ("gru", "M"), ("gru", "L"), ("gru", "T1"),
           ("elman", "S"), ("elman", "M"), ("elman", "L"), ("elman", "T1"),
           *[(s, w) for s in ("peephole_lstm", "indrnn", "layernorm_lstm", "mgu")
             for w in ("S", "L", "T1")]]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--specs", nargs="*")
    ap.add_argument("--sizes", nargs="*")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--no-eager", action="store_true", help="skip the eager PyTorch loops")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    cases = [(s, w) for s, w in DEFAULT
             if (not args.specs or s in args.specs) and (not args.sizes or w in args.sizes)]
    if args.specs and not cases:
        cases = [(s, w) for s in args.specs for w in (args.sizes or ["S", "L", "T1"])]
    rows = []
    for spec, size in cases:
        cell = rnndsl.compile(spec)
        mine = time_cell(cell, size, repeats=args.repeats)
        row = {"spec": spec, "size": size, "rnndsl_fwd": mine.forward,
               "rnndsl_fwdbwd": mine.forward_backward, "rnndsl_gflops": mine.forward_gflops}
        lib = peers.time_library(spec, size, args.repeats)
        if lib:
            row["torch_fwd"], row["torch_fwdbwd"] = lib
        if not args.no_eager:
            params, xs, sizes = problem(cell, size)
            row["eager_fwd"], row["eager_fwdbwd"] = peers.time_eager(
                cell, params, xs, sizes, repeats=max(3, args.repeats // 2))
        rows.append(row)
        print(_line(row), file=sys.stderr, flush=True)
    info = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
            "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
            "numpy": np.__version__, "gemm_gflops_f32": gemm_gflops()}
    if args.json:
        print(json.dumps({"info": info, "rows": rows}, indent=1))
        return
    print(f"Machine: {info['machine']}; {info['date']}; torch {info['torch']}; float32 GEMM "
          f"(rnndsl.backend.blas) {info['gemm_gflops_f32']:.0f} GFLOP/s. Medians of {args.repeats} runs, ms; "
          "ratio = rnndsl / peer.\n")
    print("| cell | size | rnndsl fwd | fwd+bwd | nn fwd | nn fwd+bwd | ratio fwd | ratio fwd+bwd "
          "| eager fwd | eager fwd+bwd | ratio fwd | ratio fwd+bwd | rnndsl GFLOP/s |")
    print("|" + "---|" * 13)
    for r in rows:
        print("| " + " | ".join(_cells(r)) + " |")


def _ms(v):
    return "" if v is None else f"{v * 1e3:.2f}"


def _ratio(a, b):
    return "" if a is None or b is None else f"{a / b:.2f}x"


def _cells(r):
    g = r.get
    return [r["spec"], r["size"], _ms(g("rnndsl_fwd")), _ms(g("rnndsl_fwdbwd")),
            _ms(g("torch_fwd")), _ms(g("torch_fwdbwd")),
            _ratio(g("rnndsl_fwd"), g("torch_fwd")), _ratio(g("rnndsl_fwdbwd"), g("torch_fwdbwd")),
            _ms(g("eager_fwd")), _ms(g("eager_fwdbwd")),
            _ratio(g("rnndsl_fwd"), g("eager_fwd")), _ratio(g("rnndsl_fwdbwd"), g("eager_fwdbwd")),
            f"{r['rnndsl_gflops']:.1f}"]


def _line(r):
    return " ".join(_cells(r))


if __name__ == "__main__":
    main()
