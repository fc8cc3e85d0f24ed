"""Everything a lent GPU should check, in one run of under 5 minutes, most important first;
each part has its own time limit, so one that hangs does not take the others with it. Results
go to OUT (default $OUT, else ./device_out): one file per part and summary.json.

    python benchmarks/device_check.py [--out DIR] [--quick]

1. equality at real sizes: the CUDA target against the CPU target in float64 (forward outputs,
   final states, every gradient; lstm, gru, peephole_lstm at M and T1, each time loop: auto,
   per-step, single-block and multi-block persistent kernels, a forced kernel that does not fit
   recorded as such),
   and the PyTorch bridge on CUDA tensors against cuDNN in float32 (2-layer bidirectional
   LSTM and GRU, packed lengths): `equality.json`;
2. `tests/test_cuda.py` (with RNNDSL_TEST_GPU=1) and `tests/test_torch_cuda.py` on the GPU:
   `pytest.txt`;
3. `benchmarks/cuda_bench.py --json`: `bench.json` (the README's GPU table).

`--simulate` runs part 1 at tiny sizes in Numba's CUDA simulator, on the CPU: a dry run of
the script where there is no GPU (the multi-block kernel on a simulated device of 3
multiprocessors whose blocks run concurrently, tests/cudasim_grid.py).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LIMITS = {"equality": 120, "pytest": 120, "bench": 240}  # seconds per part


def equality(simulate: bool, record) -> dict:
    """Max relative differences: CUDA vs CPU float64, and the bridge vs cuDNN float32; each
    handed to `record(results)` as it comes (T1 first), so a part cut short keeps them."""
    import numpy as np

    import rnndsl
    from rnndsl.bench import WORKLOADS

    sys.path.insert(0, str(ROOT / "tests"))
    from engines import differences

    out = {}
    sizes = {"tiny": (3, 2, 3, 4)} if simulate else {w: WORKLOADS[w] for w in ("T1", "M")}
    grid = contextlib.nullcontext()
    if simulate:
        from cudasim_grid import concurrent_blocks

        grid = concurrent_blocks(3)
    modes = (("auto", None), ("steps", False), ("single", "single-block"),
             ("multi", "multi-block"))
    with grid:
        for size, (T, B, I, H) in sizes.items():
            lengths = [T] + [max(0, T - 7 * k) for k in range(1, B)]
            for spec in ("lstm", "gru", "peephole_lstm"):
                cpu = rnndsl.compile(spec)
                for mode, persistent in modes:
                    cuda = rnndsl.compile(spec, target="cuda", persistent=persistent)
                    try:
                        diffs = differences(cuda, cpu, T, B, lengths, np.float64, seed=1,
                                            problem_args=(I, H - I))
                    except ValueError as exc:  # a forced kernel that does not fit
                        out[f"{spec} {size} {mode}"] = str(exc)
                        continue
                    out[f"{spec} {size} {mode}"] = max(diffs.values())
                    record(out)
    if not simulate:
        out.update(_bridge_vs_cudnn())
    record(out)
    return out


def _bridge_vs_cudnn() -> dict:
    import torch

    import rnndsl.torch as rt

    out = {}
    for kind in ("LSTM", "GRU"):
        torch.manual_seed(0)
        twin = getattr(torch.nn, kind)(128, 128, num_layers=2, bidirectional=True).cuda()
        mine = rt.RNN.from_torch(twin)
        x = torch.randn(100, 16, 128, device="cuda")
        lengths = torch.randint(1, 101, (16,))
        lengths[0] = 100
        packed = torch.nn.utils.rnn.pack_padded_sequence(x, lengths, enforce_sorted=False)
        results = []
        for module in (twin, mine):
            y, h = module(packed)
            h = h[0] if isinstance(h, tuple) else h
            (y.data.square().sum() + h.sum()).backward()
            results.append([y.data, h, *(p.grad for p in module.parameters())])
        worst = max(float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))
                    for a, b in zip(results[1], results[0]))
        out[f"bridge {kind.lower()} vs cuDNN (float32, packed, 2x bidirectional)"] = worst
    return out


def run_part(name: str, command: list[str], out: Path, env: dict) -> dict:
    start = time.time()
    try:
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=LIMITS[name])
        status = "ok" if done.returncode == 0 else f"exit {done.returncode}"
        text = done.stdout + done.stderr
    except subprocess.TimeoutExpired as exc:
        status = f"timed out after {LIMITS[name]} s"
        text = (exc.stdout or b"").decode(errors="replace") + \
            (exc.stderr or b"").decode(errors="replace")
    (out / f"{name}.txt").write_text(text)
    return {"status": status, "seconds": round(time.time() - start, 1)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "device_out"))
    ap.add_argument("--quick", action="store_true", help="the benchmark at M and T1 only")
    ap.add_argument("--simulate", action="store_true",
                    help="a dry run of part 1 in Numba's CUDA simulator")
    ap.add_argument("--equality-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.equality_only:  # part 1, in its own process (see below)
        equality(args.simulate,
                 lambda found: (out / "equality.json").write_text(json.dumps(found, indent=1)))
        return
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if args.simulate:
        env["NUMBA_ENABLE_CUDASIM"] = "1"
    me = [sys.executable, str(Path(__file__).resolve()), "--out", str(out)]
    summary = {"equality": run_part("equality", me + ["--equality-only"] +
                                    (["--simulate"] if args.simulate else []), out, env)}
    if not args.simulate:
        gpu = dict(env, RNNDSL_TEST_GPU="1")
        summary["pytest"] = run_part("pytest", [sys.executable, "-m", "pytest", "-q", "-x",
                                                "tests/test_cuda.py", "tests/test_torch_cuda.py"],
                                     out, gpu)
        bench = [sys.executable, "benchmarks/cuda_bench.py", "--json", "--repeats", "5"]
        if args.quick:
            bench += ["--sizes", "T1", "M"]  # T1 first: the persistent kernels' case
        summary["bench"] = run_part("bench", bench, out, env)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
