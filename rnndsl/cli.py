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


def main():
    app(prog_name="rnndsl")


if __name__ == "__main__":
    main()
