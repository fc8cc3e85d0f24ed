"""The CUDA target against cuDNN (torch.nn.LSTM / nn.GRU on the GPU) and an eager PyTorch loop
of the same cell on the GPU, float32, on the fixed workloads; one run, medians and ratios
(rnndsl time / peer time: below 1 means rnndsl is faster). Needs a GPU, PyTorch with CUDA and
the `cuda` extra; benchmarks/device_check.py runs it with the GPU tests in one go.

    python benchmarks/cuda_bench.py                          # lstm, gru, custom cells; T1 S M L
    python benchmarks/cuda_bench.py --specs lstm --sizes M T1 --json

Each rnndsl cell runs four ways: `auto` (the time loop the cost model picks per pass), `steps`
(persistent=False: one launch per step and phase, cuBLAS GEMMs) and, where they fit, the
persistent kernels `single` (persistent='single-block') and `multi` (persistent='multi-block',
one cooperative grid). Each row also gives, per mode, the forward time per time step in
microseconds (`{mode}_step_us`), printed beside a grid sync's 1.4 us (../shared/GPU.md) and
cuDNN's own time per step. Inputs are CUDA tensors handed to the cell without copies;
parameters are uploaded once, outside the timed region. Goals (issue 15, fwd+bwd): LSTM and
GRU at most 1.0x cuDNN's time at T1 and at S; a custom cell at T1 at least 20x faster than the
eager loop of the same cell (earlier, issue 6: LSTM within 1.5x of cuDNN at M). `bridge` is
the same cell as a one-layer `rnndsl.torch.RNN` on CUDA tensors (autograd, the custom op),
whose cost over the raw cell is the bridge's own.

The per-step loop (of `steps`, and of `auto` where it picks per-step launches) is replayed
from a CUDA graph once the warm-up calls have captured it; `nograph` times `steps` with graphs
turned off (every step launched from Python), the difference being the graphs'. The
persistent kernels are one launch per pass and never captured.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import contextmanager

import numpy as np
import torch

import rnndsl
from rnndsl import peers
from rnndsl.bench import WORKLOADS, problem

SPECS = ["lstm", "gru", "peephole_lstm", "indrnn", "layernorm_lstm"]
SIZES = ["T1", "S", "M", "L"]  # T1 first: the workload of the persistent kernels
MODES = {"auto": None, "steps": False, "single": "single-block", "multi": "multi-block"}
GRID_SYNC_US = 1.4  # one grid.sync() on an H200, measured (../shared/GPU.md)


def sync():
    from rnndsl.backend.cuda_support import cuda

    cuda.synchronize()
    torch.cuda.synchronize()


def median_gpu(fn, repeats: int, warmup: int = 2) -> float:
    """Median wall time of fn() with the device drained before and after each call."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def time_rnndsl(spec: str, size: str, persistent, repeats: int):
    from rnndsl.backend import cuda_support as cs

    try:
        cell = rnndsl.compile(spec, target="cuda", persistent=persistent)
    except ValueError:  # no persistent kernel for this cell (block-diagonal parameters)
        return None
    params, xs, _ = problem(cell, size)  # float32, host
    dparams = {p: cs.device(v) for p, v in params.items()}
    txs = {k: torch.as_tensor(v, device="cuda") for k, v in xs.items()}
    try:
        fwd = cell.forward(dparams, txs)
    except ValueError:  # a persistent kernel asked for that does not fit
        return None
    d_out = {o: torch.ones(tuple(v.shape), device="cuda") for o, v in fwd.outputs.items()}

    def forward():
        return cell.forward(dparams, txs)

    def forward_backward():
        f = cell.forward(dparams, txs)
        cell.backward(dparams, f, d_out)

    ran = {p: f"{v} ({cell.engine.last_blocks[p]})" for p, v in cell.engine.last_variant.items()}
    return median_gpu(forward, repeats), median_gpu(forward_backward, repeats), ran


@contextmanager
def graphs_off():
    from rnndsl.backend import cuda_graphs as cg

    before = cg.graph_cache_size()
    cg.set_graph_cache_size(0)
    try:
        yield
    finally:
        cg.set_graph_cache_size(before)


def time_eager(spec: str, size: str, repeats: int):
    cell = rnndsl.compile(spec)  # the plan (hoisted products) is all the eager loop reads
    params, xs, sizes = problem(cell, size)
    return peers.time_eager(cell, params, xs, sizes, repeats, device="cuda", timer=median_gpu)


def time_bridge(spec: str, size: str, repeats: int):
    import rnndsl.torch as rt

    T, B, I, H = WORKLOADS[size]
    module = rt.RNN(spec, I, H).to("cuda")
    x = torch.randn(T, B, I, device="cuda")
    xg = x.clone().requires_grad_(True)

    def forward():
        with torch.no_grad():
            module(x)

    def forward_backward():
        y, _ = module(xg)
        y.sum().backward()

    return median_gpu(forward, repeats), median_gpu(forward_backward, repeats)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--specs", nargs="*", default=SPECS)
    ap.add_argument("--sizes", nargs="*", default=SIZES)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("cuda_bench needs a GPU and PyTorch with CUDA")
    from rnndsl.backend import cuda_graphs as cg
    from rnndsl.backend import cuda_support as cs

    rows = []
    for spec in args.specs:
        if spec not in rnndsl.builtin_specs():
            print(f"skipping {spec}: not a built-in spec", file=sys.stderr)
            continue
        for size in args.sizes:
            row = {"spec": spec, "size": size}
            steps = WORKLOADS[size][0]
            for mode, flag in MODES.items():
                got = time_rnndsl(spec, size, flag, args.repeats)
                if got is not None:
                    row[f"{mode}_fwd"], row[f"{mode}_fwdbwd"], row[f"{mode}_ran"] = got
                    row[f"{mode}_step_us"] = got[0] / steps * 1e6
            with graphs_off():
                row["nograph_fwd"], row["nograph_fwdbwd"], _ = \
                    time_rnndsl(spec, size, False, args.repeats)
            row["nograph_step_us"] = row["nograph_fwd"] / steps * 1e6
            lib = (peers.time_library(spec, size, args.repeats, "cuda", median_gpu)
                   if spec in ("lstm", "gru") else None)
            if lib:
                row["cudnn_fwd"], row["cudnn_fwdbwd"] = lib
                row["cudnn_step_us"] = lib[0] / steps * 1e6
            row["bridge_fwd"], row["bridge_fwdbwd"] = time_bridge(spec, size, args.repeats)
            row["eager_fwd"], row["eager_fwdbwd"] = time_eager(spec, size,
                                                               max(3, args.repeats // 2))
            rows.append(row)
            print(row, file=sys.stderr, flush=True)
    info = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"),
            "torch": torch.__version__, "cudnn": torch.backends.cudnn.version(),
            "gemm": cs.backend(), "graphs": cg.why_not() or "captured", **cs.versions()}
    if args.json:
        print(json.dumps({"info": info, "rows": rows}, indent=1))
        return
    print(f"Device: {info['device']}; {info['date']}; torch {info['torch']}, cuDNN "
          f"{info['cudnn']}; GEMMs via {info['gemm']}. float32, medians of {args.repeats} runs, "
          "ms; ratio = rnndsl (auto) / peer; auto ran = each pass's time loop (grid); "
          "steps: the per-step loop from a CUDA graph, no graph: launched from Python.\n")
    print("| cell | size | auto fwd | auto fwd+bwd | auto ran | steps fwd+bwd | steps fwd+bwd, no "
          "graph | single fwd+bwd | multi fwd+bwd | cuDNN fwd | cuDNN fwd+bwd | ratio fwd "
          "| ratio fwd+bwd "
          "| eager fwd+bwd | ratio | bridge fwd+bwd | bridge / auto |")
    print("|" + "---|" * 17)
    for r in rows:
        g = r.get
        print("| " + " | ".join([
            r["spec"], r["size"], _ms(g("auto_fwd")), _ms(g("auto_fwdbwd")),
            ", ".join(g("auto_ran", {}).values()), _ms(g("steps_fwdbwd")),
            _ms(g("nograph_fwdbwd")), _ms(g("single_fwdbwd")), _ms(g("multi_fwdbwd")),
            _ms(g("cudnn_fwd")), _ms(g("cudnn_fwdbwd")), _ratio(g("auto_fwd"), g("cudnn_fwd")),
            _ratio(g("auto_fwdbwd"), g("cudnn_fwdbwd")), _ms(g("eager_fwdbwd")),
            _ratio(g("auto_fwdbwd"), g("eager_fwdbwd")), _ms(g("bridge_fwdbwd")),
            _ratio(g("bridge_fwdbwd"), g("auto_fwdbwd"))]) + " |")
    columns = [*MODES, "nograph", "cudnn"]
    print(f"\nForward time per step, us (a grid sync: {GRID_SYNC_US} us):\n")
    print("| cell | size | " + " | ".join(columns) + " |")
    print("|" + "---|" * (len(columns) + 2))
    for r in rows:
        print("| " + " | ".join([r["spec"], r["size"]] + [
            _us(r.get(f"{m}_step_us")) for m in columns]) + " |")


def _ms(v):
    return "" if v is None else f"{v * 1e3:.2f}"


def _us(v):
    return "" if v is None else f"{v:.2f}"


def _ratio(a, b):
    return "" if a is None or b is None else f"{a / b:.2f}x"


if __name__ == "__main__":
    main()
