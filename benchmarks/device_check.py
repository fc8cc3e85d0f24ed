"""Everything a lent GPU should check, in one run of under 5 minutes, most important first;
each part has its own time limit, so one that hangs does not take the others with it. Results
go to OUT (default $OUT, else ./device_out): one file per part and summary.json.

    python benchmarks/device_check.py [--out DIR] [--quick]

1. equality at real sizes: the CUDA target against the CPU target in float64 (forward outputs,
   final states, every gradient; lstm, gru, peephole_lstm at T1 and M, each time loop: auto,
   per-step, single-block and multi-block persistent kernels, a forced kernel that does not fit
   recorded as such; slstm's block-diagonal kernels, auto and per-step: the same), the per-step time loop replayed from its CUDA graph against the same
   loop uncaptured (float64, lstm and gru at M, run between T1 and M, fwd+bwd run three times:
   uncaptured, captured, replayed; the key says how the last run went), and the PyTorch bridge
   on CUDA tensors against cuDNN in float32 (2-layer bidirectional LSTM and GRU, packed
   lengths): `equality.json`;
2. cells with matrix values (one GPU thread per batch row) against the CPU target in float64
   at modest sizes (T=30, B=40: two blocks of rows; sizes 8 to 16), each with every matrix
   state kept and with a tape budget of 0 (the least memory at these sizes keeps step 0's
   alone, and backward recomputes the rest): `rows.json`. delta_net and fast_weights, whose
   kernels compile in seconds (the CPU's meanwhile, in processes of their own); mlstm's and
   the NTM's CUDA kernels take minutes to compile (their backward 62 s and 419 s for sm_90
   here), past this part's limit: `pytest --long` with RNNDSL_TEST_GPU=1 runs them;
3. `tests/test_cuda.py` (with RNNDSL_TEST_GPU=1) and `tests/test_torch_cuda.py` on the GPU:
   `pytest.txt`;
4. `benchmarks/cuda_bench.py --json` at T1 and M, medians of 3 (`--quick`: lstm and gru
   only): `bench.txt` (the README's GPU table; rows as they come, so a part cut short keeps
   them).

`--simulate` runs parts 1 and 2 at tiny sizes in Numba's CUDA simulator, on the CPU (part 2
on delta_net alone): a dry run of the
script where there is no GPU (the multi-block kernel on a simulated device of 3
multiprocessors whose blocks run concurrently, tests/cudasim_grid.py).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# seconds per part: 5 minutes in all
LIMITS = {"equality": 90, "rows": 45, "pytest": 90, "bench": 75}


def equality(simulate: bool, record) -> dict:
    """Max relative differences: CUDA vs CPU float64, and the bridge vs cuDNN float32; each
    handed to `record(results)` as it comes (T1 first), so a part cut short keeps them."""
    from rnndsl.bench import WORKLOADS

    sys.path.insert(0, str(ROOT / "tests"))
    out = {}
    sizes = {"tiny": (3, 2, 3, 4)} if simulate else {w: WORKLOADS[w] for w in ("T1", "M")}
    grid = contextlib.nullcontext()
    if simulate:
        from cudasim_grid import concurrent_blocks

        grid = concurrent_blocks(3)
    graphs_at = "tiny" if simulate else "M"
    with grid:
        for size, dims in sizes.items():
            if size == graphs_at:  # after T1, the persistent kernels' case
                out.update(_graphs_vs_uncaptured(size, dims))
                record(out)
            _time_loops_vs_cpu(size, dims, out, record)
    if not simulate:
        out.update(_bridge_vs_cudnn())
    record(out)
    return out


def _time_loops_vs_cpu(size: str, dims: tuple, out: dict, record):
    """Each spec in each time loop at one size against the CPU target, into `out`."""
    import numpy as np

    import rnndsl

    from engines import differences

    T, B, I, H = dims
    lengths = [T] + [max(0, T - 7 * k) for k in range(1, B)]
    every = (("auto", None), ("steps", False), ("single", "single-block"),
             ("multi", "multi-block"))
    # slstm last: its block-diagonal R runs per step only (no persistent kernel to force)
    for spec, modes in (("lstm", every), ("gru", every), ("peephole_lstm", every),
                        ("slstm", every[:2])):
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


def rows(simulate: bool, record) -> dict:
    """Max relative differences of the matrix cells on CUDA from the CPU target, float64,
    each handed to `record(results)` as it comes. The CPU kernels compile meanwhile in
    processes of their own, into the kernel cache that the comparisons then load."""
    import numpy as np

    import rnndsl

    sys.path.insert(0, str(ROOT / "tests"))
    from engines import differences

    specs = ("delta_net",) if simulate else ("delta_net", "fast_weights")
    me = [sys.executable, str(Path(__file__).resolve())]
    compiling = {spec: subprocess.Popen(me + ["--compile-cpu", spec], cwd=ROOT) for spec in specs}
    T, B, first, step = (3, 2, 2, 1) if simulate else (30, 40, 8, 4)
    lengths = [T] + [max(0, T - 3 * k) for k in range(1, B)]
    out = {}
    try:
        for spec in specs:
            cells = {budget: rnndsl.compile(spec, target="cuda", tape_budget=budget)
                     for budget in (None, 0)}
            run_once(cells[None])  # its kernels compile while the CPU's compile elsewhere
            compiling[spec].wait()
            cpu = rnndsl.compile(spec)
            for budget, cuda in cells.items():
                diffs = differences(cuda, cpu, T, B, lengths, np.float64, seed=1,
                                    problem_args=(first, step))
                kept = "every step kept" if budget is None else "recomputed (tape budget 0)"
                out[f"{spec} T={T} B={B} {kept}"] = max(diffs.values())
                record(out)
    finally:
        for process in compiling.values():
            process.kill()
    return out


def run_once(cell):
    """One forward and backward pass at the least sizes: the cell's kernels compile."""
    import numpy as np

    sys.path.insert(0, str(ROOT / "tests"))
    from engines import problem

    params, xs, state0 = problem(cell, 1, 1, seed=0, first_size=2, step=1)
    fwd = cell.forward(params, xs, state0)
    cell.backward(params, fwd, {o: np.ones(v.shape) for o, v in fwd.outputs.items()})


def _graphs_vs_uncaptured(size: str, dims: tuple) -> dict:
    """Max relative difference of the third fwd+bwd (replayed from a CUDA graph where one can
    be captured) from a run with graphs turned off, per spec, at one size."""
    import numpy as np

    import rnndsl
    from rnndsl.backend import cuda_graphs as cg
    from rnndsl.backend import cuda_support as cs

    from engines import problem, relative

    out = {}
    T, B, I, H = dims
    lengths = [T] + [max(1, T - 7 * k) for k in range(1, B)]
    for spec in ("lstm", "gru"):
        cell = rnndsl.compile(spec, target="cuda", persistent=False)
        params, xs, state0 = problem(cell, T, B, 2, I, H - I)
        seed = np.random.default_rng(3).standard_normal((T, B, H))

        def run():
            fwd = cell.forward(params, xs, state0, lengths)
            grads = cell.backward(params, fwd, seed)
            return [cs.host(fwd.output), *map(cs.host, grads.params.values()),
                    *map(cs.host, grads.inputs.values())]

        before = cg.graph_cache_size()
        cg.set_graph_cache_size(0)
        want = run()
        cg.set_graph_cache_size(before or cg.DEFAULT_CACHE_SIZE)
        for _ in range(3):
            got = run()
        worst = max(relative(a, b, 1e-30) for a, b in zip(got, want))
        why = cg.why_not()
        out[f"{spec} {size} graph, last run {cg.last_run()}"
            f"{f' ({why})' if why else ''}, vs uncaptured"] = worst
        cg.set_graph_cache_size(before)
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
    """Run one part in a session of its own: past its time limit, the part and every process
    it started (part 2's CPU compiles) are killed, so none runs on into the next part."""
    start = time.time()
    with subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, start_new_session=True) as part:
        try:
            stdout, stderr = part.communicate(timeout=LIMITS[name])
            status = "ok" if part.returncode == 0 else f"exit {part.returncode}"
        except subprocess.TimeoutExpired:
            os.killpg(part.pid, signal.SIGKILL)
            stdout, stderr = part.communicate()
            status = f"timed out after {LIMITS[name]} s"
    (out / f"{name}.txt").write_text(stdout + stderr)
    return {"status": status, "seconds": round(time.time() - start, 1)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "device_out"))
    ap.add_argument("--quick", action="store_true", help="the benchmark of lstm and gru only")
    ap.add_argument("--simulate", action="store_true",
                    help="a dry run of parts 1 and 2 in Numba's CUDA simulator")
    ap.add_argument("--equality-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--rows-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--compile-cpu", metavar="SPEC", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.compile_cpu:  # part 2's CPU kernels of one cell, into the kernel cache
        import rnndsl

        run_once(rnndsl.compile(args.compile_cpu))
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for only, part in ((args.equality_only, equality), (args.rows_only, rows)):
        if only:  # part 1 or 2, in its own process (see below)
            name = part.__name__
            part(args.simulate,
                 lambda found: (out / f"{name}.json").write_text(json.dumps(found, indent=1)))
            return
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if args.simulate:
        env["NUMBA_ENABLE_CUDASIM"] = "1"
    me = [sys.executable, str(Path(__file__).resolve()), "--out", str(out)]
    simulate = ["--simulate"] if args.simulate else []
    summary = {"equality": run_part("equality", me + ["--equality-only"] + simulate, out, env),
               "rows": run_part("rows", me + ["--rows-only"] + simulate, out, env)}
    if not args.simulate:
        gpu = dict(env, RNNDSL_TEST_GPU="1")
        summary["pytest"] = run_part("pytest", [sys.executable, "-m", "pytest", "-q", "-x",
                                                "tests/test_cuda.py", "tests/test_torch_cuda.py"],
                                     out, gpu)
        # T1 first: the persistent kernels' case; the other sizes do not fit the part's limit
        bench = [sys.executable, "benchmarks/cuda_bench.py", "--json", "--repeats", "3",
                 "--sizes", "T1", "M"]
        if args.quick:
            bench += ["--specs", "lstm", "gru"]
        summary["bench"] = run_part("bench", bench, out, env)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
