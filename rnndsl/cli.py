"""The `rnndsl` command: parses arguments and calls library functions, nothing more.

Options are validated where they are declared: a known set of choices is an Enum (so the
shell completes it and a wrong one is refused by name), a number has its range (`min=`), and
the library checks the rest (`TrainConfig`, checkpoints, the cache) with a `UserError`. Every
refusal is one line naming the option or file, exit status 2, no traceback; user text in
output goes through `printable`.
"""
from __future__ import annotations

import re
import sys
from contextlib import contextmanager
from enum import Enum
from functools import wraps
from pathlib import Path

import typer

from rnndsl import __version__
from rnndsl import compiler
from rnndsl.engines.tree import TreeCell
from rnndsl.language.errors import SpecError, UserError, printable
from rnndsl.training.tasks import TASKS
from rnndsl.training.train import (BIDIRECTIONAL, CONDITIONS, DENSE, DTYPES, KERNEL_THREADS,
                                   SAVE_EVERY)
from rnndsl.bench import WORKLOADS
from rnndsl.training.optim import OPTIMIZERS, SCHEDULES

app = typer.Typer(no_args_is_help=True,
                  help="Recurrent cells written as equations, compiled to fused kernels.")
cache_app = typer.Typer(no_args_is_help=True, help="The folder of generated kernels.")
app.add_typer(cache_app, name="cache")

SPEC = typer.Argument(..., help="A spec file, or the name of a built-in spec (see `rnndsl list`).")


def _choices(name: str, values) -> type[Enum]:
    return Enum(name, {v: v for v in values}, type=str)


Show = _choices("Show", ("ir", "backward", "code"))
Target = _choices("Target", compiler.TARGETS)
Dtype = _choices("Dtype", DTYPES)
EXPR = "expr"  # over trees and token sequences: rnndsl.training.expr, not a sequence Task
Task = _choices("Task", (*TASKS, EXPR))
Optimizer = _choices("Optimizer", OPTIMIZERS)
Schedule = _choices("Schedule", SCHEDULES)
Bidirectional = _choices("Bidirectional", BIDIRECTIONAL)
Dense = _choices("Dense", DENSE)
Size = _choices("Size", WORKLOADS)
Condition = _choices("Condition", CONDITIONS)


def reports_input_errors(fn):
    """A bad spec is reported as `file:line:col: message` with a caret, any other bad input
    as `error: message`; both with exit status 2."""
    @wraps(fn)
    def run(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SpecError as exc:
            typer.echo(exc.render(), err=True)
        except UserError as exc:
            typer.echo(f"error: {printable(exc)}", err=True)
        raise typer.Exit(2)
    return run


def _show_version(value: bool):
    if value:
        import numba
        import numpy

        typer.echo(f"rnndsl {__version__} (numba {numba.__version__}, numpy {numpy.__version__}, "
                   f"python {sys.version.split()[0]})")
        raise typer.Exit()


@app.callback()
def main_options(version: bool = typer.Option(False, "--version", callback=_show_version,
                                              is_eager=True, help="Print the versions and exit.")):
    """Recurrent cells written as equations, compiled to fused kernels."""


@app.command("list")
@reports_input_errors
def list_specs():
    """The built-in cells, one line each."""
    for name, path in {**compiler.builtin_specs(), **compiler.builtin_tree_specs()}.items():
        spec = compiler.load(path)
        kind = "tree  " if spec.structure == "tree" else ""
        where = "" if spec.structure == "tree" or name in compiler.kernel_specs("cuda") else \
            " [cpu and reference targets]" if name in compiler.kernel_specs("cpu") else \
            " [reference target only]"
        typer.echo(f"{name:<20} {kind}{printable(spec.summary)}{where}")


@app.command()
@reports_input_errors
def check(spec: str = SPEC):
    """Check a spec: names, shapes, cycles. Prints nothing but 'ok' when it is sound."""
    if compiler.load(spec).structure == "tree":
        cell = compiler.compile(spec, target="reference")
        typer.echo(f"{printable(spec)}: ok ({cell.name}: tree cell, {len(cell.params)} "
                   "parameters)")
        return
    step, _ = compiler.analyse(spec)
    typer.echo(f"{printable(spec)}: ok ({step.name}: {len(step.values)} equations, "
               f"{len(step.layout.params)} parameters)")


@app.command("compile")
@reports_input_errors
def compile_(spec: str = SPEC,
             show: list[Show] = typer.Option([], "--show", help="Also print: ir, backward, code."),
             target: Target = typer.Option("cpu", help="Where the kernels run."),
             dtype: Dtype = typer.Option("float32", help="The kernels to emit."),
             set_: list[str] = typer.Option([], "--set", metavar="NAME=VALUE",
                                            help="Give a constant of the spec another value "
                                                 "(repeatable)."),
             ):
    """Check, differentiate and emit kernels; print a summary of the cell."""
    from rnndsl.summary import describe

    target, dtype = target.value, dtype.value
    cell = compiler.compile(spec, target=target, constants=_assignments(set_))
    typer.echo(describe(cell))
    if isinstance(cell, TreeCell):
        _show_tree(cell, show, target, dtype)
        return
    if hasattr(cell.engine, "path"):
        typer.echo(f"  generated {printable(cell.engine.path(dtype))}")
    for what in show:
        typer.echo("")
        if what == Show.ir:
            typer.echo("# forward step\n" + cell.step.equations())
        elif what == Show.backward:
            typer.echo("# backward step (d_<s>_next: adjoint arriving from step t+1 and the "
                       "loss)\n" + cell.backward_ir.equations())
        elif what == Show.code:
            if not hasattr(cell.engine, "source_code"):
                raise SpecError(f"the {target} target generates no code")
            typer.echo(cell.engine.source_code(dtype))


def _show_tree(cell: TreeCell, show: list[Show], target: str, dtype: str):
    steps = [c for c in (cell.edge, cell.node) if c is not None]
    for step in steps:
        if hasattr(step.engine, "path"):
            typer.echo(f"  generated {printable(step.engine.path(dtype))}")
    for what in show:
        typer.echo("")
        if what == Show.ir:
            typer.echo(cell.equations())
        elif what == Show.backward:
            typer.echo(cell.backward_equations())
        elif not hasattr(cell.node.engine, "source_code"):
            raise SpecError(f"the {target} target generates no code")
        else:
            typer.echo("\n".join(step.engine.source_code(dtype) for step in steps))


def _assignments(items: list[str]) -> dict[str, float]:
    """`--set lam=0.9 --set eta=0.5` as {'lam': 0.9, 'eta': 0.5}."""
    out = {}
    for item in items:
        name, _, value = item.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:  # no '=', or not a number
            raise UserError(f"--set {item!r}: expected NAME=NUMBER, e.g. --set lam=0.9") from None
    return out


@app.command()
@reports_input_errors
def gradcheck(spec: str = SPEC,
              steps: int = typer.Option(4, min=1, help="Sequence length T."),
              batch: int = typer.Option(3, min=1, help="Batch size B."),
              size: int = typer.Option(3, min=1, help="Smallest size; each size is one larger."),
              seed: int = typer.Option(0, min=0),
              tolerance: float = typer.Option(1e-6, min=0, help="Largest relative error accepted."),
              target: Target = typer.Option("reference", help="Engine whose gradients are checked.")):
    """Finite differences against the derived gradients for every parameter, input and initial
    state (float64); exit status 1 if the worst relative error exceeds the tolerance or is not
    a number. A tree cell is checked over three small trees (--steps and --batch do not
    apply)."""
    from rich.progress import Progress

    from rnndsl.engines.gradcheck import gradcheck as run_check
    from rnndsl.engines.gradcheck import tree_gradcheck

    cell = compiler.compile(spec, target=target.value)
    tree = isinstance(cell, TreeCell)
    count = len(cell.params) + len(cell.inputs) + (0 if tree else len(cell.states))
    with Progress(transient=True) as bar:
        task = bar.add_task(f"gradcheck {cell.name}", total=count)
        advance = lambda _name: bar.advance(task)  # noqa: E731
        result = tree_gradcheck(cell, size=size, seed=seed, progress=advance) if tree else \
            run_check(cell, T=steps, B=batch, size=size, seed=seed, progress=advance)
    for name, err in result.errors.items():
        typer.echo(f"  {name:<24} {err:.2e}")
    worst, err = result.worst
    verdict = "ok" if err <= tolerance else "FAILED"
    typer.echo(f"{cell.name}: worst relative error {err:.2e} ({worst}) {verdict}")
    if err != err and not tree:  # NaN
        typer.echo("not a number: the random initial states may lie outside the cell's domain "
                   "(the NTM's weightings are distributions: a negative weight sharpened by a "
                   "power is NaN); check it from Python with gradcheck(cell, state0=...)")
    if not err <= tolerance:
        raise typer.Exit(1)


@app.command()
@reports_input_errors
def bench(spec: str = SPEC,
          size: Size = typer.Option("S", help="Workload (see README)."),
          against: str = typer.Option("", help="'torch': also time PyTorch's module and an "
                                               "eager loop of the same cell."),
          repeats: int = typer.Option(7, min=1, help="Runs per timing; the median is reported."),
          json_out: bool = typer.Option(False, "--json", help="Print JSON.")):
    """Time a cell forward and forward+backward on a fixed workload (float32)."""
    import json

    from rnndsl import bench as timing

    size = size.value
    if against not in ("", "torch"):
        raise typer.BadParameter("--against takes 'torch'")
    _sequence_cells_only([spec], "times sequence workloads (tree cells: "
                                 "benchmarks/tree_bench.py)")
    cell = compiler.compile(spec)
    turns = timing.Turns()  # rnndsl and the peers in turns: a slow spell falls on all alike
    forward, forward_backward, flops = timing.cell_passes(cell, size)
    slots = {"rnndsl": (turns(forward), turns(forward_backward))}
    if against == "torch":
        peers = timing.load_peers()
        params, xs, sizes = timing.problem(cell, size)
        lib = peers.time_library(cell.name, size, timer=turns)
        if lib:
            slots["torch_module_ms"] = lib
        slots["torch_eager_ms"] = peers.time_eager(cell, params, xs, sizes, timer=turns)
    turns.run(repeats)
    ms = {who: [turns.median(slot) * 1e3 for slot in pair] for who, pair in slots.items()}
    T, B, I, H = timing.WORKLOADS[size]
    forward_ms, forward_backward_ms = ms.pop("rnndsl")
    row = {"spec": cell.name, "size": size, "repeats": repeats, "versions": versions(),
           "T": T, "B": B, "input": I, "hidden": H,
           "forward_ms": forward_ms, "forward_backward_ms": forward_backward_ms,
           "forward_gflops": flops / forward_ms / 1e6, **ms}
    if json_out:
        typer.echo(json.dumps(row, indent=1))
        return
    typer.echo(f"{cell.name} {size} (T={T}, B={B}, I={I}, H={H}), float32, median of {repeats}, "
               "taken in turns:")
    typer.echo(f"  rnndsl       forward {row['forward_ms']:8.2f} ms   forward+backward "
               f"{row['forward_backward_ms']:8.2f} ms   ({row['forward_gflops']:.1f} GFLOP/s)")
    for label, key in (("torch module", "torch_module_ms"), ("torch eager ", "torch_eager_ms")):
        if key in row:
            f, fb = row[key]
            typer.echo(f"  {label} forward {f:8.2f} ms   forward+backward {fb:8.2f} ms   "
                       f"(rnndsl/peer {row['forward_ms'] / f:.2f}x, "
                       f"{row['forward_backward_ms'] / fb:.2f}x)")


@app.command()
@reports_input_errors
def export(spec: str = SPEC,
           weights: str = typer.Option(..., help="A training checkpoint (`rnndsl train --save`): "
                                                 "the network and head to export."),
           output: str = typer.Option(..., "--output", "-o", help="The ONNX file to write.")):
    """Export a trained network of SPEC cells and its head as an ONNX model (inputs x, lengths;
    outputs y, prediction), one Scan over time per layer and direction."""
    from rnndsl.backend.onnx_export import export_checkpoint

    model = export_checkpoint(spec, weights, output)
    typer.echo(f"wrote {printable(output)}: {len(model.graph.node)} nodes, opset "
               f"{model.opset_import[0].version}")


# -- training -----------------------------------------------------------------------------------
# Options shared by `train` and `compare` (declared once, used in both signatures).
TASK = typer.Option(None, help="The task. Without one: a short demonstration (adding problem, "
                               "T=50, lr 1e-2, 2000 steps).")
LENGTH = typer.Option(None, min=1, help="Sequence length (the task's default when not given).")
TEXT = typer.Option(None, help="charlm: a text file to model (default: a shipped text).")
HIDDEN = typer.Option(64, min=1, help="Hidden size of every layer.")
STEPS = typer.Option(None, min=1, help="Optimizer steps (default 1000; the demonstration: 2000).")
LAYERS = typer.Option(1, min=1, help="Stacked layers.")
SIZES = typer.Option(None, "--size", help="A size of the cell other than its input and hidden, as "
                                           "NAME=N (repeatable; default: hidden), e.g. --size "
                                           "slots=128.")
BIDIRECTIONAL = typer.Option(None, help="Run each layer both ways, joined this way.")
RESIDUAL = typer.Option(False, "--residual", help="Add each layer's input to its output.")
DENSE = typer.Option(None, help="Every layer sees all lower layers' outputs, joined this way.")
ORTHOGONAL = typer.Option(False, "--orthogonal", help="Orthogonal recurrent matrices at init.")
OPTIMIZER = typer.Option("adam", help="The optimizer (adamw: Adam with decoupled weight "
                                       "decay).")
LR = typer.Option(None, help="Learning rate > 0 (adam and adamw 1e-3, sgd 0.1 when not given).")
WEIGHT_DECAY = typer.Option(None, help="adamw: decoupled weight decay >= 0 (default 0.01).")
SCHEDULE = typer.Option("constant", help="The learning rate over the run: constant, a linear "
                                         "warm-up, or a warm-up then a cosine decay to 0.")
WARMUP = typer.Option(0, min=0, help="Steps of linear warm-up (warmup and cosine schedules).")
THREADS = typer.Option(KERNEL_THREADS, min=1, help="Threads of the kernels (time loops and "
                                                   "BLAS) during training; default: the "
                                                   "BLAS's own setting, the cores.")
MOMENTUM = typer.Option(0.0, help="SGD momentum, in [0, 1).")
CLIP = typer.Option(1.0, help="Clip gradients by global norm at this threshold (0: off).")
CLIP_VALUE = typer.Option(None, help="Also clip every gradient element to [-v, v] (v > 0).")
BATCH = typer.Option(32, min=1, help="Sequences per batch.")
SEED = typer.Option(0, min=0, help="Seed of the parameters and of every batch.")
DTYPE = typer.Option("float32", help="Floating-point type of the run.")
JSON = typer.Option(False, "--json", help="Machine-readable log: one JSON object per line; "
                                          "the last holds the settings and versions.")
PLOT = typer.Option(None, help="Write a learning curve to this image (needs matplotlib).")
TENSORBOARD = typer.Option(None, help="Log the curves for TensorBoard: one folder per run in "
                                      "this folder (`tensorboard --logdir DIR`).")
DECODER = typer.Option(None, help="reverse, dates, expand: the decoder's spec (default: "
                                  "SPEC).")
CONDITION = typer.Option(None, help="expand: the decoder reads the vector as its initial "
                                    "state (default), as an input at every step, or both.")


def versions() -> dict:
    import numba
    import numpy

    return {"rnndsl": __version__, "numba": numba.__version__, "numpy": numpy.__version__,
            "python": sys.version.split()[0]}


def _sequence_cells_only(specs, why: str):
    """A tree cell given to a command that runs sequences is refused by name."""
    for spec in specs:
        if compiler.load(spec).structure == "tree":
            raise UserError(f"{printable(spec)} is a tree cell; this command {why}")


def _configs(specs, task, length, steps, lr, **options):
    from rnndsl.training.train import TrainConfig

    _sequence_cells_only(specs, "trains on sequences; --task expr trains tree cells")
    if task is None:  # the demonstration run: long enough for the LSTM to solve the task
        task, length, steps, lr = "adding", length or 50, steps or 2000, lr or 1e-2
    return [TrainConfig(spec=s, task=task, length=length, steps=steps or 1000, lr=lr, **options)
            for s in specs]


def _check_plot(path):
    if path is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise UserError("--plot needs matplotlib: pip install 'rnndsl[plot]'") from None
        from rnndsl.training.train import check_writable
        check_writable(path, "plot")


def _run(configs, json_out: bool, tensorboard=None, **train_options):
    """Train each configuration with a progress bar (or JSON lines), logging its curves for
    TensorBoard in `tensorboard` if given; return the results."""
    import json
    from dataclasses import asdict

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, \
        TimeElapsedColumn

    from rnndsl.training.optim import TrainingDiverged
    from rnndsl.training.train import train

    results = []
    try:
        for n, config in enumerate(configs):
            if json_out:
                def show(step, rec, name=config.label):
                    if rec is not None:
                        typer.echo(json.dumps({"spec": name, **rec}))
                with _tensorboard_logged(show, tensorboard, n, config.label) as logged:
                    results.append(train(config, progress=logged, **train_options))
                typer.echo(json.dumps({"spec": config.label, "final": results[-1].final,
                                       "seconds": results[-1].seconds,
                                       "settings": asdict(config), "versions": versions()}))
                continue
            columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                       TextColumn("{task.fields[status]}"), TimeElapsedColumn()]
            with Progress(*columns, transient=False) as bar:
                jobs = []  # the bar appears with the first step, after any error in the setup

                def show(step, rec, config=config):
                    if not jobs:
                        jobs.append(bar.add_task(config.label, total=config.steps, status=""))
                    status = None if rec is None else _status(rec)
                    bar.update(jobs[0], completed=step, **({"status": status} if status else {}))
                with _tensorboard_logged(show, tensorboard, n, config.label) as logged:
                    results.append(train(config, progress=logged, **train_options))
    except TrainingDiverged as exc:
        typer.echo(f"training stopped: {exc}", err=True)
        raise typer.Exit(1) from None
    except OSError as exc:  # e.g. the --text file of charlm
        where = f"{printable(exc.filename)}: " if exc.filename else ""
        raise UserError(f"{where}{exc.strerror or exc}") from None
    except ValueError as exc:  # a setting the library refused (UserError is one)
        raise UserError(str(exc)) from None
    return results


def _status(rec: dict) -> str:
    acc = f"  acc {rec['accuracy']:.3f}" if "accuracy" in rec else ""
    return f"loss {rec['loss']:.4f}{acc}  {rec['steps_per_s']:.0f} steps/s"


def _summary(results) -> None:
    first = results[0].config
    typer.echo(f"task {first.task}" + (f", length {first.length}" if first.length else "") +
               f", {first.steps} steps, batch {first.batch}, seed {first.seed}; held-out "
               f"batch of {first.eval_batch} (trivial baseline {results[0].final['baseline']})")
    exact = any("exact_match" in r.final for r in results)  # the sequence tasks
    typer.echo(f"  {'cell':<18} {'loss':>10} {'accuracy':>9}" +
               (f" {'exact':>6}" if exact else "") + f" {'seconds':>8} {'steps/s':>8}")
    for r in results:
        acc = r.final.get("accuracy")
        acc = f"{acc:9.3f}" if acc is not None else f"{'-':>9}"
        if exact:
            acc += f" {r.final['exact_match']:6.3f}"
        rate = r.steps_run / r.seconds if r.seconds else 0.0
        typer.echo(f"  {r.config.describe().split(';')[0]:<18} {r.final['loss']:10.5f} {acc} "
                   f"{r.seconds:8.1f} {rate:8.1f}")


@contextmanager
def _tensorboard_logged(show, logdir, n: int, label: str):
    """`show`, also writing each log record's numbers as scalars to an event file of run `n`
    in `logdir` (a folder named after the run: its number and its label's safe characters)."""
    if logdir is None:
        yield show
        return
    from rnndsl.training.tensorboard import EventWriter

    name = f"{n}-{re.sub(r'[^A-Za-z0-9_.-]+', '_', label).strip('._')[:60]}"
    with EventWriter(Path(logdir) / name) as writer:
        def logged(step, rec):
            if rec is not None:
                writer.scalars(step, {k: v for k, v in rec.items()
                                      if k != "step" and isinstance(v, (int, float))})
            show(step, rec)
        yield logged


def _finish(configs, json_out, plot, **train_options):
    if not json_out and len(configs) == 1:
        typer.echo(configs[0].describe())
    results = _run(configs, json_out, **train_options)
    if not json_out:
        _summary(results)
    if plot:
        from rnndsl.training.train import plot_curves
        plot_curves(results, plot)


def _plain(options: dict) -> dict:
    """Enum choices as their strings; `--clip 0` as no clipping; `--size` as a dict."""
    out = {k: v.value if isinstance(v, Enum) else v for k, v in options.items()}
    if "clip" in out:
        out["clip"] = out["clip"] or None
    if "sizes" in out:
        out["sizes"] = _named_sizes(out["sizes"] or [])
    return out


def _named_sizes(items: list[str]) -> dict[str, int] | None:
    """`--size slots=128 --size width=20` as {'slots': 128, 'width': 20} (None if none)."""
    out = {}
    for item in items:
        name, _, value = item.partition("=")
        if not (name.strip().isidentifier() and value.strip().isdigit() and int(value) >= 1):
            raise UserError(f"--size {printable(item)}: expected NAME=N with N a whole number of "
                            "at least 1, e.g. --size slots=128")
        out[name.strip()] = int(value)
    return out or None


def _resumed_config(ctx: typer.Context, resume: str, options: dict):
    """The checkpoint's settings, with `--steps` if given; any other option given on the
    command line must agree with the checkpoint (an error names each that does not)."""
    from dataclasses import fields, replace

    from rnndsl.training.train import TrainConfig, read_checkpoint

    saved = read_checkpoint(resume)["config"]
    given = {k: v for k, v in options.items() if k in {f.name for f in fields(TrainConfig)}
             and ctx.get_parameter_source(k).name not in ("DEFAULT", "DEFAULT_MAP")}
    clash = [f"{'' if k == 'spec' else '--' + k.replace('_', '-') + ' '}{printable(v)} "
             f"(the checkpoint has {printable(getattr(saved, k))})"
             for k, v in given.items() if k != "steps" and v != getattr(saved, k)]
    if clash:
        raise UserError(f"{printable(resume)} was made with other settings: {'; '.join(clash)}. "
                        "Leave these options out to continue it as it was.")
    return replace(saved, steps=given.get("steps", saved.steps))


@app.command("train")
@reports_input_errors
def train_(ctx: typer.Context,
           spec: str = typer.Argument("lstm", help="A spec file or a built-in spec name."),
           task: Task = TASK, length: int = LENGTH, text: str = TEXT, hidden: int = HIDDEN,
           sizes: list[str] = SIZES, steps: int = STEPS, layers: int = LAYERS,
           bidirectional: Bidirectional = BIDIRECTIONAL,
           residual: bool = RESIDUAL, dense: Dense = DENSE, orthogonal: bool = ORTHOGONAL,
           optimizer: Optimizer = OPTIMIZER, lr: float = LR, momentum: float = MOMENTUM,
           weight_decay: float = WEIGHT_DECAY, schedule: Schedule = SCHEDULE,
           warmup: int = WARMUP, clip: float = CLIP, clip_value: float = CLIP_VALUE, batch: int = BATCH,
           seed: int = SEED, dtype: Dtype = DTYPE, json_out: bool = JSON, plot: str = PLOT,
           tensorboard: str = TENSORBOARD, decoder: str = DECODER,
           condition: Condition = CONDITION, threads: int = THREADS,
           save: str = typer.Option(None, help="Write a checkpoint (.npz) to this file every "
                                               "--save-every steps and at the end."),
           save_every: int = typer.Option(SAVE_EVERY, min=0, help="Steps between checkpoints "
                                                                  "(0: only at the end)."),
           resume: str = typer.Option(None, help="Continue from a checkpoint, with its settings "
                                                 "(give --steps to train longer).")):
    """Train a network of SPEC cells on a generated task with BPTT."""
    options = dict(locals())
    del options["ctx"]
    options = _plain(options)
    if options["task"] == EXPR:
        _train_expr(ctx, [options["spec"]], options)
        return
    json_out, plot = options.pop("json_out"), options.pop("plot")
    _check_plot(plot)
    run = {k: options.pop(k) for k in ("save", "save_every", "resume", "threads", "tensorboard")}
    if run["resume"] is not None:
        configs = [_resumed_config(ctx, run["resume"], options)]
    else:
        configs = _configs([options.pop("spec")], **options)
    _finish(configs, json_out, plot, **run)


@app.command()
@reports_input_errors
def compare(ctx: typer.Context,
            specs: list[str] = typer.Argument(..., help="Spec files or built-in names."),
            task: Task = TASK, length: int = LENGTH, text: str = TEXT, hidden: int = HIDDEN,
            sizes: list[str] = SIZES, steps: int = STEPS, layers: int = LAYERS,
            bidirectional: Bidirectional = BIDIRECTIONAL,
            residual: bool = RESIDUAL, dense: Dense = DENSE, orthogonal: bool = ORTHOGONAL,
            optimizer: Optimizer = OPTIMIZER, lr: float = LR, momentum: float = MOMENTUM,
            weight_decay: float = WEIGHT_DECAY, schedule: Schedule = SCHEDULE,
            warmup: int = WARMUP, clip: float = CLIP, clip_value: float = CLIP_VALUE, batch: int = BATCH,
            seed: int = SEED, dtype: Dtype = DTYPE, json_out: bool = JSON, plot: str = PLOT,
            tensorboard: str = TENSORBOARD, decoder: str = DECODER,
            condition: Condition = CONDITION, threads: int = THREADS):
    """Train several cells on the same task, data and seeds; print a table."""
    options = dict(locals())
    del options["ctx"]
    options = _plain(options)
    if options["task"] == EXPR:
        _train_expr(ctx, options["specs"], options)
        return
    json_out, plot, tensorboard = (options.pop(k) for k in ("json_out", "plot", "tensorboard"))
    _check_plot(plot)
    threads = options.pop("threads")
    _finish(_configs(options.pop("specs"), **options), json_out, plot, threads=threads,
            tensorboard=tensorboard)


EXPR_OPTIONS = ("task", "steps", "hidden", "batch", "lr", "clip", "seed", "dtype", "json_out",
                "plot")


def _train_expr(ctx: typer.Context, specs: list[str], options: dict):
    """--task expr: each cell reads arithmetic expressions as trees (a tree cell) or as token
    sequences (a sequence cell); a table of held-out accuracy by depth."""
    import json
    from dataclasses import asdict

    from rich.progress import Progress

    from rnndsl.training.expr import plot, table, train_expr

    unused = [k for k in ctx.params if k not in (*EXPR_OPTIONS, "spec", "specs") and
              ctx.get_parameter_source(k).name not in ("DEFAULT", "DEFAULT_MAP")]
    if unused:
        raise UserError(f"--task expr does not take --{unused[0].replace('_', '-')}; it takes "
                        f"{', '.join('--' + k.replace('_', '-') for k in EXPR_OPTIONS[1:-2])}, "
                        "--json and --plot")
    _check_plot(options["plot"])
    steps = options["steps"] or 2000
    results = []
    with Progress(transient=True, disable=options["json_out"]) as bar:
        for spec in specs:
            cell = compiler.compile(spec)
            task = bar.add_task(f"expr {cell.name}", total=steps)
            results.append(train_expr(cell, steps=steps, hidden=options["hidden"],
                                      batch=options["batch"], lr=options["lr"] or 3e-3,
                                      seed=options["seed"], clip=options["clip"] or float("inf"),
                                      dtype=options["dtype"],
                                      progress=lambda _k, task=task: bar.advance(task)))
    if options["json_out"]:
        for r in results:
            typer.echo(json.dumps(asdict(r)))
    else:
        typer.echo(table(results))
    if options["plot"] is not None:
        plot(results, options["plot"])


TrialScheduler = _choices("TrialScheduler", ("fifo", "asha"))


@app.command()
@reports_input_errors
def sweep(ctx: typer.Context,
          specs: list[str] = typer.Argument(..., help="Spec files, built-in names or folders "
                                                      "(every .yaml in them)."),
          task: Task = typer.Option(..., help="The task every trial trains on."),
          grid: list[str] = typer.Option([], metavar="NAME=V1,V2", help="Try every value "
                                         "(repeatable; e.g. lr=1e-3,1e-2)."),
          search: list[str] = typer.Option([], metavar="NAME=RANGE", help="Draw from a range "
                                           "(repeatable): uniform(a,b), loguniform(a,b), "
                                           "randint(a,b) or choice(v1,v2,...)."),
          samples: int = typer.Option(1, min=1, help="Points drawn from the --search ranges "
                                                     "(each with every grid value)."),
          seeds: int = typer.Option(1, min=1, help="Seeds per point: 0, 1, ..."),
          search_seed: int = typer.Option(0, min=0, help="Seed of the draws."),
          out: str = typer.Option("sweep", help="Results folder: trials.jsonl and trials.csv."),
          resume: bool = typer.Option(False, "--resume", help="Keep the finished trials in "
                                      "--out and run the others."),
          address: str = typer.Option(None, help="A running Ray cluster (HOST:PORT of its "
                                                 "head); default: a Ray started for the run."),
          cpus: int = typer.Option(None, min=1, help="CPUs of the Ray started here (default: "
                                                     "all of this machine's)."),
          cpus_per_trial: int = typer.Option(1, min=1, help="CPUs each trial holds."),
          scheduler: TrialScheduler = typer.Option("fifo", help="asha: stop trials whose "
                                                   "held-out loss falls behind (Ray Tune's "
                                                   "ASHA)."),
          grace: int = typer.Option(None, min=1, help="asha: steps before a trial can be "
                                                      "stopped (default: a tenth of --steps)."),
          plot: str = typer.Option(None, help="Write a box plot of the best held-out loss per "
                                              "spec to this image (needs matplotlib)."),
          steps: int = typer.Option(1000, min=1, help="Optimizer steps of every trial."),
          length: int = LENGTH, text: str = TEXT, hidden: int = HIDDEN, layers: int = LAYERS,
          bidirectional: Bidirectional = BIDIRECTIONAL, residual: bool = RESIDUAL,
          dense: Dense = DENSE, orthogonal: bool = ORTHOGONAL, optimizer: Optimizer = OPTIMIZER,
          lr: float = LR, momentum: float = MOMENTUM, weight_decay: float = WEIGHT_DECAY,
          schedule: Schedule = SCHEDULE, warmup: int = WARMUP, clip: float = CLIP,
          clip_value: float = CLIP_VALUE, batch: int = BATCH, dtype: Dtype = DTYPE,
          decoder: str = DECODER, condition: Condition = CONDITION):
    """Train every combination of SPECS, hyperparameter points and seeds as Ray Tune trials;
    write a row per trial as it ends and print the best held-out loss per spec."""
    import time

    from rnndsl.training import sweep as sweeping

    fixed = _plain({k: v for k, v in locals().items() if k in (
        "task", "length", "text", "hidden", "steps", "layers", "bidirectional", "residual",
        "dense", "orthogonal", "optimizer", "lr", "momentum", "weight_decay", "schedule",
        "warmup", "clip", "clip_value", "batch", "dtype", "decoder", "condition")})
    if fixed["text"]:  # trials run in folders of their own
        fixed["text"] = str(Path(fixed["text"]).resolve())
    varied = [item.partition("=")[0].strip() for item in (*grid, *search)]
    clash = [n for n in varied if n in fixed and
             ctx.get_parameter_source(n).name not in ("DEFAULT", "DEFAULT_MAP")]
    if clash:
        raise UserError(f"{', '.join(clash)}: given as an option and in --grid/--search; "
                        "give each one way")
    _check_plot(plot)
    study = sweeping.plan(specs, fixed, grid, search, samples, seeds, search_seed)
    config = study.config

    def start(finished):
        typer.echo(f"{len(study.trials)} trials: {len(study.specs)} spec(s) x {study.points} "
                   f"point(s) x {study.seeds} seed(s); task {config.task}" +
                   (f" length {config.length}" if config.length else "") + f", {config.steps}"
                   f" steps, batch {config.batch}; results in {printable(out)}" +
                   (f" ({finished} finished before)" if finished else ""))

    def show(row, done, total):
        point = " ".join(f"{k}={sweeping.shown(v)}" for k, v in row["hyperparameters"].items())
        what = f"best held-out loss {row['best_loss']:.4g} at step {row['best_step']}" \
            if row["best_loss"] is not None else printable(row["reason"] or "")
        typer.echo(f"[{done}/{total}] {printable(row['spec'])} {point} seed {row['seed']}: "
                   f"{row['status']}, {what}")

    t0 = time.perf_counter()
    rows = sweeping.run(study, out, address=address, cpus=cpus, cpus_per_trial=cpus_per_trial,
                        scheduler=scheduler.value, grace=grace, resume=resume,
                        on_start=start, on_row=show)
    seconds = time.perf_counter() - t0
    typer.echo(f"{len(rows)} trials in {printable(out)}, {seconds:.0f} s; best held-out loss "
               f"per spec (median, inter-quartile range) of the trials that ran or were "
               f"stopped; seconds waiting for kernels:")
    for line in sweeping.format_summary(rows):
        typer.echo(line)
    if plot:
        sweeping.plot(rows, plot, f"{config.task}, {config.steps} steps")
    if len(rows) < len(study.trials):  # interrupted (Ctrl-C stops Tune, which returns)
        typer.echo(f"{len(study.trials) - len(rows)} of {len(study.trials)} trials did not end; "
                   "the same command with --resume runs them", err=True)
        raise typer.Exit(1)


# -- generation ---------------------------------------------------------------------------------
@app.command()
@reports_input_errors
def evaluate(checkpoints: list[str] = typer.Argument(..., help="Checkpoints of `rnndsl train "
                                                                "--save`."),
             length: list[int] = typer.Option(..., "--length", min=1,
                                              help="Evaluate on sequences of exactly this "
                                                   "length (repeatable), e.g. longer than "
                                                   "in training."),
             batch: int = typer.Option(256, min=1, help="Sequences per length."),
             seed: int = typer.Option(0, min=0, help="Seed of the evaluation batches (the "
                                                     "same for every checkpoint)."),
             json_out: bool = JSON,
             plot: str = typer.Option(None, help="Also draw the checkpoints' learning curves "
                                                 "(training loss, from their logs) in this "
                                                 "image.")):
    """Evaluate trained models on fixed sequence lengths: how far they generalise beyond the
    lengths they were trained on (copy, repeat_copy, recall: the bits wrong per sequence)."""
    import json

    from rnndsl.training.train import TrainResult, evaluate_lengths, plot_curves

    _check_plot(plot)
    results = []
    for path in checkpoints:
        ckpt, rows = evaluate_lengths(path, length, batch=batch, seed=seed)
        config = ckpt["config"]
        results.append((path, ckpt, rows))
        if json_out:
            for row in rows:
                typer.echo(json.dumps({"checkpoint": printable(Path(path).name),
                                       "spec": config.label, **row}))
    if not json_out:
        keys = [k for k in ("loss", "accuracy", "bits_wrong_per_seq", "cost_per_seq")
                if any(k in row for _, _, rows in results for row in rows)]
        typer.echo(f"  {'checkpoint':<24} {'length':>6} " + " ".join(f"{k:>18}" for k in keys))
        for path, _, rows in results:
            for row in rows:
                values = " ".join(f"{row[k]:18.4f}" if k in row else f"{'-':>18}" for k in keys)
                typer.echo(f"  {printable(Path(path).name)[:24]:<24} {row['length']:6d} {values}")
    if plot:
        plot_curves([TrainResult(ckpt["config"], ckpt["log"], {}, 0.0, 0)
                     for _, ckpt, _ in results], plot)


@app.command()
@reports_input_errors
def sample(ctx: typer.Context,
           checkpoint: str = typer.Argument(..., help="A checkpoint of `rnndsl train --save FILE` "
                                                      "with --task charlm, reverse or expand."),
           length: int = typer.Option(200, min=1, help="Characters to generate (reverse, "
                                                       "expand: the most target tokens)."),
           prompt: str = typer.Option("", help="charlm: text to continue (printed first); "
                                               "reverse, dates, expand: the input to answer."),
           temperature: float = typer.Option(1.0, help="charlm, > 0: below 1 sharpens the "
                                                       "model's distribution, above 1 "
                                                       "flattens it."),
           top_k: int = typer.Option(None, min=1, help="charlm: draw only among the k most "
                                                       "likely characters."),
           seed: int = typer.Option(0, min=0, help="charlm: seed of the draws (same seed, same "
                                                   "text)."),
           beam: int = typer.Option(None, min=1, help="reverse, dates, expand: beam search of "
                                                      "this width (default: greedy).")):
    """Generate from a trained model: text from a character-level language model, streamed as
    it comes, or a sequence task's answer to --prompt."""
    from rnndsl.training.sample import (Generator, charlm_text, check_sampling, decode_prompt,
                                        load_generator, terminal_text)

    given = {k for k in ("temperature", "top_k", "seed", "beam")
             if ctx.get_parameter_source(k).name not in ("DEFAULT", "DEFAULT_MAP")}
    check_sampling(temperature, top_k)
    config, model, params = load_generator(checkpoint)
    wrong = given - ({"temperature", "top_k", "seed"} if config.task == "charlm" else {"beam"})
    if wrong:
        names = ", ".join("--" + k.replace("_", "-") for k in sorted(wrong))
        raise UserError(f"{names} {'does' if len(wrong) == 1 else 'do'} not apply to a model "
                        f"of the task {config.task}")
    if config.task != "charlm":
        typer.echo(terminal_text(decode_prompt(model, params, prompt, length, beam)))
        return
    generator = Generator(model.network, model.head, params)
    chars = charlm_text(model.task, generator, length, prompt, temperature, top_k, seed)
    first = next(chars)  # a bad prompt is refused before anything is printed
    typer.echo(terminal_text(prompt + first), nl=False)
    for c in chars:
        typer.echo(terminal_text(c), nl=False)
        sys.stdout.flush()
    typer.echo("")


@app.command()
@reports_input_errors
def info(json_out: bool = typer.Option(False, "--json", help="The report as one JSON object.")):
    """Print versions, the CPU kernels' BLAS, the kernel cache, and the CUDA target: whether it
    imports, the GPU, who does its GEMMs and which time loop each pass would take."""
    from rnndsl.environment import lines, report

    found = report()
    if json_out:
        import json
        typer.echo(json.dumps(found))
        return
    for line in lines(found):
        typer.echo(printable(line))


# -- the kernel cache ----------------------------------------------------------------------------
@cache_app.command("path")
@reports_input_errors
def cache_path():
    """Print the cache folder ($RNNDSL_CACHE_DIR, else $XDG_CACHE_HOME/rnndsl, else
    ~/.cache/rnndsl)."""
    from rnndsl.backend.loader import cache_root
    typer.echo(printable(cache_root()))


@cache_app.command("clear")
@reports_input_errors
def cache_clear():
    """Delete the generated kernels (only rnndsl's files); they are made again when needed."""
    from rnndsl.backend.loader import cache_root, clear_cache

    try:
        count = clear_cache()
    except OSError as exc:
        raise UserError(f"cannot clear the kernel cache {printable(cache_root())}: "
                        f"{exc.strerror or exc}") from None
    typer.echo(f"removed {count} file(s) from {printable(cache_root())}")


def main():
    app(prog_name="rnndsl")


if __name__ == "__main__":
    main()
