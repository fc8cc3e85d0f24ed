"""ONNX Runtime inference of an exported rnndsl LSTM against the exported torch.nn.LSTM (ONNX's
fused LSTM op) and against rnndsl's own CPU kernels, at S and T1, float32, one run.

The three run the same weights on the same input (checked to agree before timing):
  rnndsl onnx  rnndsl.export_onnx of the `lstm` spec: one Scan, input products hoisted
  nn onnx      torch.onnx.export (TorchScript exporter) of nn.LSTM: ONNX's LSTM operator
  kernels      the cell's generated CPU kernels, cell.forward(..., save=False)
Medians of runs after a warm-up, each contender in a block of its own; ratio = rnndsl onnx / peer (below 1: faster).

    python benchmarks/onnx_bench.py                    # S and T1, 20 repeats
    python benchmarks/onnx_bench.py --sizes S --repeats 5 --threads 1
"""
from __future__ import annotations

import argparse
import io
import os
import platform
import time
from datetime import date

import numpy as np
import onnxruntime as ort
import torch

import rnndsl
from rnndsl.backend.blas import blas_threads

ort.set_default_logger_severity(3)

WORKLOADS = {"S": (100, 16, 128, 128), "T1": (1000, 1, 64, 64)}  # T, B, I, H


def medians(fns: dict, repeats: int) -> dict:
    """Each function timed in a block of its own after a warm-up: not interleaved, since the
    kernels' BLAS threads spin after each call and would slow whatever ran next."""
    out = {}
    for name, fn in fns.items():
        fn()  # warm-up (compiles the kernels, plans the sessions)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        out[name] = float(np.median(times))
    return out


def session(model_bytes: bytes, threads: int):
    # ONNX Runtime's threads spin after each run by default, taking the cores from whatever
    # runs next (here: the other contenders, interleaved); without spinning all are fair.
    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.intra_op_num_threads = threads
    return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])


def measure(workload: str, repeats: int, threads: int) -> dict:
    T, B, I, H = WORKLOADS[workload]
    torch.manual_seed(0)
    lstm = torch.nn.LSTM(I, H)
    x = np.random.default_rng(0).standard_normal((T, B, I)).astype(np.float32)

    cell = rnndsl.compile("lstm")
    params = {}  # torch's stacked blocks (i, f, g, o) as the spec's parameters
    for kind, weight, bias in (("i", lstm.weight_ih_l0, lstm.bias_ih_l0),
                               ("h", lstm.weight_hh_l0, lstm.bias_hh_l0)):
        for gate, w, b in zip("ifgo", weight.detach().numpy().reshape(4, H, -1),
                              bias.detach().numpy().reshape(4, H)):
            params[f"W_{kind}{gate}"], params[f"b_{kind}{gate}"] = w, b
    ours = session(rnndsl.export_onnx(cell, params).SerializeToString(), threads)
    zeros = np.zeros((B, H), np.float32)
    feed = {"input.x": x, "state0.h": zeros, "state0.c": zeros,
            "lengths": np.full(B, T, np.int64)}

    buffer = io.BytesIO()
    torch.onnx.export(lstm, (torch.from_numpy(x),), buffer, dynamo=False, input_names=["x"],
                      output_names=["y", "h", "c"])
    theirs = session(buffer.getvalue(), threads)

    y_ours = ours.run(["output.h"], feed)[0]
    y_theirs = theirs.run(["y"], {"x": x})[0]
    y_kernels = cell.forward(params, x, save=False).output
    for name, y in (("nn onnx", y_theirs), ("kernels", y_kernels)):
        assert np.abs(y - y_ours).max() < 1e-4, f"{name} disagrees with rnndsl onnx"

    times = medians({
        "rnndsl onnx": lambda: ours.run(["output.h"], feed),
        "nn onnx": lambda: theirs.run(["y"], {"x": x}),
        "kernels": lambda: cell.forward(params, x, save=False),
    }, repeats)
    return {name: t * 1e3 for name, t in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=0,
                        help="threads of ONNX Runtime and of the kernels' BLAS (0: their "
                             "defaults, one per core)")
    args = parser.parse_args()
    if args.threads:
        blas_threads(args.threads)
    print(f"{platform.machine()}, {os.cpu_count()} cores, load average "
          f"{os.getloadavg()[0]:.1f}, {date.today()}, onnxruntime {ort.__version__}, "
          f"torch {torch.__version__}, float32, threads {args.threads or 'default'}, "
          f"medians of {args.repeats} (ms)\n")
    print("| size | rnndsl onnx | nn.LSTM onnx | rnndsl kernels | onnx / nn onnx | "
          "onnx / kernels |")
    print("|---|---:|---:|---:|---:|---:|")
    for workload in args.sizes:
        ms = measure(workload, args.repeats, args.threads)
        mine = ms["rnndsl onnx"]
        print(f"| {workload} | {mine:.2f} | {ms['nn onnx']:.2f} | {ms['kernels']:.2f} | "
              f"{mine / ms['nn onnx']:.2f}x | {mine / ms['kernels']:.2f}x |")


if __name__ == "__main__":
    main()
