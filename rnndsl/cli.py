"""The `rnndsl` command: parses arguments and calls library functions, nothing more."""
from __future__ import annotations

import sys
from enum import Enum
from functools import wraps
from pathlib import Path

import typer

from . import compiler
from .errors import SpecError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Recurrent cells written as equations, compiled to fused kernels.")

SPEC = typer.Argument(..., help="A spec file, or the name of a built-in spec (see `rnndsl list`).")


class Show(str, Enum):
    ir = "ir"
    backward = "backward"
    code = "code"


def reports_spec_errors(fn):
    """A bad spec is reported as `file:line:col: message` with a caret, and exit status 2."""
    @wraps(fn)
    def run(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SpecError as exc:
            typer.echo(exc.render(), err=True)
            raise typer.Exit(2) from None
    return run


@app.command("list")
def list_specs():
    """The built-in cells, one line each."""
    for name, path in compiler.builtin_specs().items():
        spec = compiler.load(path)
        typer.echo(f"{name:<18} {spec.summary}")


@app.command()
@reports_spec_errors
def check(spec: str = SPEC):
    """Check a spec: names, shapes, cycles. Prints nothing but 'ok' when it is sound."""
    step, _ = compiler.analyse(spec)
    typer.echo(f"{spec}: ok ({step.name}: {len(step.values)} equations, "
               f"{len(step.params)} parameters)")


@app.command("compile")
@reports_spec_errors
def compile_(spec: str = SPEC,
             show: list[Show] = typer.Option([], "--show", help="Also print: ir, backward, code."),
             target: str = typer.Option("cpu", help=f"One of: {', '.join(compiler.TARGETS)}."),
             dtype: str = typer.Option("float32", help="float32 or float64: the kernels to emit."),
             ):
    """Check, differentiate and emit kernels; print a summary of the cell."""
    from .summary import describe

    cell = compiler.compile(spec, target=target)
    typer.echo(describe(cell))
    if hasattr(cell.engine, "path"):
        typer.echo(f"  generated {cell.engine.path(dtype)}")
    for what in show:
        typer.echo("")
        if what is Show.ir:
            typer.echo("# forward step\n" + cell.step.equations())
        elif what is Show.backward:
            typer.echo("# backward step (d_<s>_next: adjoint arriving from step t+1 and the "
                       "loss)\n" + cell.backward_ir.equations())
        elif what is Show.code:
            if not hasattr(cell.engine, "source_code"):
                raise SpecError(f"the {target} target generates no code")
            typer.echo(cell.engine.source_code(dtype))


@app.command()
@reports_spec_errors
def gradcheck(spec: str = SPEC,
              steps: int = typer.Option(4, help="Sequence length T."),
              batch: int = typer.Option(3, help="Batch size B."),
              size: int = typer.Option(3, help="Smallest size; each size is one larger."),
              seed: int = typer.Option(0),
              tolerance: float = typer.Option(1e-6, help="Largest relative error accepted."),
              target: str = typer.Option("reference", help="Engine whose gradients are checked.")):
    """Finite differences against the derived gradients for every parameter, input and initial
    state (float64); exit status 1 if the worst relative error exceeds the tolerance."""
    from rich.progress import Progress

    from .gradcheck import gradcheck as run_check

    cell = compiler.compile(spec, target=target)
    count = len(cell.params) + len(cell.inputs) + len(cell.states)
    with Progress(transient=True) as bar:
        task = bar.add_task(f"gradcheck {cell.name}", total=count)
        result = run_check(cell, T=steps, B=batch, size=size, seed=seed,
                           progress=lambda _name: bar.advance(task))
    for name, err in result.errors.items():
        typer.echo(f"  {name:<24} {err:.2e}")
    worst, err = result.worst
    verdict = "ok" if err <= tolerance else "FAILED"
    typer.echo(f"{cell.name}: worst relative error {err:.2e} ({worst}) {verdict}")
    if err > tolerance:
        raise typer.Exit(1)


@app.command()
@reports_spec_errors
def bench(spec: str = SPEC,
          size: str = typer.Option("S", help="Workload: S, M, L or T1 (see README)."),
          against: str = typer.Option("", help="'torch': also time PyTorch's module and an "
                                               "eager loop of the same cell."),
          repeats: int = typer.Option(7, help="Runs per timing; the median is reported."),
          json_out: bool = typer.Option(False, "--json", help="Print JSON.")):
    """Time a cell forward and forward+backward on a fixed workload (float32)."""
    import json

    from . import bench as timing

    if size not in timing.WORKLOADS:
        raise typer.BadParameter(f"size must be one of {', '.join(timing.WORKLOADS)}")
    cell = compiler.compile(spec)
    mine = timing.time_cell(cell, size, repeats=repeats)
    T, B, I, H = timing.WORKLOADS[size]
    row = {"spec": cell.name, "size": size, "T": T, "B": B, "input": I, "hidden": H,
           "forward_ms": mine.forward * 1e3, "forward_backward_ms": mine.forward_backward * 1e3,
           "forward_gflops": mine.forward_gflops}
    if against == "torch":
        peers = timing.load_peers()
        params, xs, sizes = timing.problem(cell, size)
        lib = peers.time_library(cell.name, size, repeats)
        if lib:
            row["torch_module_ms"] = [v * 1e3 for v in lib]
        row["torch_eager_ms"] = [v * 1e3 for v in peers.time_eager(cell, params, xs, sizes,
                                                                   max(3, repeats // 2))]
    elif against:
        raise typer.BadParameter("--against takes 'torch'")
    if json_out:
        typer.echo(json.dumps(row, indent=1))
        return
    typer.echo(f"{cell.name} {size} (T={T}, B={B}, I={I}, H={H}), float32, median of {repeats}:")
    typer.echo(f"  rnndsl       forward {row['forward_ms']:8.2f} ms   forward+backward "
               f"{row['forward_backward_ms']:8.2f} ms   ({mine.forward_gflops:.1f} GFLOP/s)")
    for label, key in (("torch module", "torch_module_ms"), ("torch eager ", "torch_eager_ms")):
        if key in row:
            f, fb = row[key]
            typer.echo(f"  {label} forward {f:8.2f} ms   forward+backward {fb:8.2f} ms   "
                       f"(rnndsl/peer {row['forward_ms'] / f:.2f}x, "
                       f"{row['forward_backward_ms'] / fb:.2f}x)")


# -- training -----------------------------------------------------------------------------------
# Options shared by `train` and `compare` (declared once, used in both signatures).
TASK = typer.Option(None, help="adding, copy, repeat_copy, recall, sort or charlm. Without a "
                               "task: a short demonstration (adding problem, T=50, lr 1e-2, "
                               "2000 steps).")
LENGTH = typer.Option(None, help="Sequence length (the task's default when not given).")
TEXT = typer.Option(None, help="charlm: a text file to model (default: a shipped text).")
HIDDEN = typer.Option(64, help="Hidden size of every layer.")
STEPS = typer.Option(None, help="Optimizer steps (default 1000; the demonstration: 2000).")
LAYERS = typer.Option(1, help="Stacked layers.")
BIDIRECTIONAL = typer.Option(None, help="concat, separate or alternate.")
RESIDUAL = typer.Option(False, "--residual", help="Add each layer's input to its output.")
DENSE = typer.Option(None, help="add or concat: every layer sees all lower layers' outputs.")
ORTHOGONAL = typer.Option(False, "--orthogonal", help="Orthogonal recurrent matrices at init.")
OPTIMIZER = typer.Option("adam", help="adam or sgd.")
LR = typer.Option(None, help="Learning rate (adam 1e-3, sgd 0.1 when not given).")
MOMENTUM = typer.Option(0.0, help="SGD momentum.")
CLIP = typer.Option(1.0, help="Clip gradients by global norm at this threshold (0: off).")
CLIP_VALUE = typer.Option(None, help="Also clip every gradient element to [-v, v].")
BATCH = typer.Option(32, help="Sequences per batch.")
SEED = typer.Option(0, help="Seed of the parameters and of every batch.")
DTYPE = typer.Option("float32", help="float32 or float64.")
JSON = typer.Option(False, "--json", help="Machine-readable log: one JSON object per line.")
PLOT = typer.Option(None, help="Write a learning curve to this image (needs matplotlib).")


def _configs(specs, task, length, steps, lr, **options):
    from .train import TrainConfig

    if task is None:  # the demonstration run: long enough for the LSTM to solve the task
        task, length, steps, lr = "adding", length or 50, steps or 2000, lr or 1e-2
    return [TrainConfig(spec=s, task=task, length=length, steps=steps or 1000, lr=lr, **options)
            for s in specs]


def _check_plot(path):
    if path is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise typer.BadParameter("--plot needs matplotlib: pip install 'rnndsl[plot]'")


def _run(configs, json_out: bool, save=None, resume=None):
    """Train each configuration with a progress bar (or JSON lines); return the results."""
    import json

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, \
        TimeElapsedColumn

    from .optim import TrainingDiverged
    from .train import train

    results = []
    try:
        for config in configs:
            if json_out:
                def show(step, rec, name=config.spec):
                    if rec is not None:
                        typer.echo(json.dumps({"spec": name, **rec}))
                results.append(train(config, progress=show, save=save, resume=resume))
                typer.echo(json.dumps({"spec": config.spec, "final": results[-1].final,
                                       "seconds": results[-1].seconds}))
                continue
            columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                       TextColumn("{task.fields[status]}"), TimeElapsedColumn()]
            with Progress(*columns, transient=False) as bar:
                jobs = []  # the bar appears with the first step, after any error in the setup

                def show(step, rec, config=config):
                    if not jobs:
                        jobs.append(bar.add_task(config.spec, total=config.steps, status=""))
                    status = None if rec is None else _status(rec)
                    bar.update(jobs[0], completed=step, **({"status": status} if status else {}))
                results.append(train(config, progress=show, save=save, resume=resume))
    except TrainingDiverged as exc:
        typer.echo(f"training stopped: {exc}", err=True)
        raise typer.Exit(1) from None
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    return results


def _status(rec: dict) -> str:
    acc = f"  acc {rec['accuracy']:.3f}" if "accuracy" in rec else ""
    return f"loss {rec['loss']:.4f}{acc}  {rec['steps_per_s']:.0f} steps/s"


def _summary(results) -> None:
    first = results[0].config
    typer.echo(f"task {first.task}" + (f", length {first.length}" if first.length else "") +
               f", {first.steps} steps, batch {first.batch}, seed {first.seed}; held-out "
               f"batch of {first.eval_batch} (trivial baseline {results[0].final['baseline']})")
    typer.echo(f"  {'cell':<18} {'loss':>10} {'accuracy':>9} {'seconds':>8} {'steps/s':>8}")
    for r in results:
        acc = r.final.get("accuracy")
        acc = f"{acc:9.3f}" if acc is not None else f"{'-':>9}"
        rate = r.steps_run / r.seconds if r.seconds else 0.0
        typer.echo(f"  {r.config.describe().split(';')[0]:<18} {r.final['loss']:10.5f} {acc} "
                   f"{r.seconds:8.1f} {rate:8.1f}")


def _train_command(specs, json_out, plot, save=None, resume=None, task=None, length=None,
                   steps=None, clip=None, **options):
    _check_plot(plot)
    configs = _configs(specs, task, length, steps, clip=clip or None, **options)
    if not json_out and len(configs) == 1:
        typer.echo(configs[0].describe())
    results = _run(configs, json_out, save=save, resume=resume)
    if not json_out:
        _summary(results)
    if plot:
        from .train import plot_curves
        plot_curves(results, plot)


@app.command("train")
@reports_spec_errors
def train_(spec: str = typer.Argument("lstm", help="A spec file or a built-in spec name."),
           task: str = TASK, length: int = LENGTH, text: str = TEXT, hidden: int = HIDDEN, steps: int = STEPS,
           layers: int = LAYERS, bidirectional: str = BIDIRECTIONAL, residual: bool = RESIDUAL,
           dense: str = DENSE, orthogonal: bool = ORTHOGONAL, optimizer: str = OPTIMIZER,
           lr: float = LR, momentum: float = MOMENTUM, clip: float = CLIP,
           clip_value: float = CLIP_VALUE, batch: int = BATCH, seed: int = SEED,
           dtype: str = DTYPE, json_out: bool = JSON, plot: str = PLOT,
           save: str = typer.Option(None, help="Write a checkpoint (.npz) at the end."),
           resume: str = typer.Option(None, help="Continue from a checkpoint.")):
    """Train a network of SPEC cells on a generated task with BPTT."""
    options = dict(locals())  # every option above, passed on by name
    _train_command([options.pop("spec")], **options)


@app.command()
@reports_spec_errors
def compare(specs: list[str] = typer.Argument(..., help="Spec files or built-in names."),
            task: str = TASK, length: int = LENGTH, text: str = TEXT, hidden: int = HIDDEN, steps: int = STEPS,
            layers: int = LAYERS, bidirectional: str = BIDIRECTIONAL, residual: bool = RESIDUAL,
            dense: str = DENSE, orthogonal: bool = ORTHOGONAL, optimizer: str = OPTIMIZER,
            lr: float = LR, momentum: float = MOMENTUM, clip: float = CLIP,
            clip_value: float = CLIP_VALUE, batch: int = BATCH, seed: int = SEED,
            dtype: str = DTYPE, json_out: bool = JSON, plot: str = PLOT):
    """Train several cells on the same task, data and seeds; print a table."""
    options = dict(locals())
    _train_command(options.pop("specs"), **options)

def main():
    app(prog_name="rnndsl")


if __name__ == "__main__":
    main()
