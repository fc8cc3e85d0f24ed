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
             target: str = typer.Option("reference",
                                        help=f"One of: {', '.join(compiler.TARGETS)}."),
             ):
    """Check, differentiate and emit kernels; print a summary of the cell."""
    from .summary import describe

    cell = compiler.compile(spec, target=target)
    typer.echo(describe(cell))
    for what in show:
        typer.echo("")
        if what is Show.ir:
            typer.echo("# forward step\n" + cell.step.equations())
        elif what is Show.backward:
            typer.echo("# backward step (d_<s>_next: adjoint arriving from step t+1 and the "
                       "loss)\n" + cell.backward_ir.equations())
        elif what is Show.code:
            typer.echo(cell.engine.source_code())


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


def main():
    app(prog_name="rnndsl")


if __name__ == "__main__":
    main()
