"""The pipeline end to end: spec -> checked AST -> step IR -> backward IR -> engine -> Cell."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from rnndsl.symbolic import ir, rank2
from rnndsl.language.check import Checked, check
from rnndsl.language.tree import check_tree
from rnndsl.language.errors import SpecError
from rnndsl.symbolic.grad import Backward, grad
from rnndsl.symbolic.ir import StepIR
from rnndsl.symbolic.lower import lower
from rnndsl.resources import specs_dir
from rnndsl.engines.cell import Cell, CpuEngine, ReferenceEngine
from rnndsl.engines.tree import TreeCell
from rnndsl.backend.emit_rows import row_plan
from rnndsl.backend.schedule import plan
from rnndsl.language.spec import Spec, load_spec, with_constants

TARGETS = ("cpu", "reference", "cuda")


def builtin_specs() -> dict[str, Path]:
    """Built-in sequence cells: name -> file."""
    return {p.stem: p for p in sorted(specs_dir().glob("*.yaml"))}


def builtin_tree_specs() -> dict[str, Path]:
    """Built-in tree cells (specs/trees): name -> file."""
    return {p.stem: p for p in sorted((specs_dir() / "trees").glob("*.yaml"))}


@lru_cache(maxsize=2)
def kernel_specs(target: str = "cpu") -> tuple[str, ...]:
    """The built-in specs a compiled target ("cpu", "cuda") runs: those it does not refuse
    (`refusal`)."""
    return tuple(name for name, path in builtin_specs().items()
                 if refusal(analyse(path)[0], target) is None)


@lru_cache(maxsize=1)
def matrix_specs() -> tuple[str, ...]:
    """The built-in specs with values of rank 2 (the cpu and cuda targets run them one batch
    row at a time; ONNX export does not take them)."""
    return tuple(name for name, path in builtin_specs().items()
                 if rank2.matrix_value(analyse(path)[0]))


def resolve(source: str | Path) -> tuple[str, str | None]:
    """A path, a built-in spec's name, or YAML text -> (source name, text or None to read).
    An existing file is always read as a file, whatever its name contains."""
    text = str(source)
    if _is_file(text):
        return text, None
    if "\n" in text:
        return "<string>", text
    builtins = {**builtin_specs(), **builtin_tree_specs()}
    if text in builtins:
        return str(builtins[text]), None
    if "equations" in text and ":" in text:  # one-line YAML, e.g. a flow mapping
        return "<string>", text
    return text, None


def _is_file(text: str) -> bool:
    try:
        return Path(text).is_file()
    except (OSError, ValueError):  # a name too long for the system, a NUL byte
        return False


def load(source: str | Path) -> Spec:
    name, text = resolve(source)
    return load_spec(name, text)


def analyse(source: str | Path, constants: dict | None = None) -> tuple[StepIR, Backward]:
    """Load, parse, check, lower and differentiate a spec."""
    with ir.scope():
        return _analyse(load(source), constants)


def _analyse(spec: Spec, constants: dict | None) -> tuple[StepIR, Backward]:
    spec = with_constants(spec, constants)
    if spec.structure == "tree":
        raise SpecError(f"'{spec.name}' is a tree cell ('structure: tree'); this needs a "
                        "sequence cell (rnndsl.compile makes a TreeCell of it)",
                        spec.where(f"states.{next(iter(spec.states))}"))
    step = lower(check(spec))
    return step, grad(step)


def compile(source: str | Path, target: str = "cpu", persistent: bool | str | None = None,
            constants: dict | None = None, tape_budget: int | None = None) -> Cell | TreeCell:
    """Compile a spec (a path, a built-in name such as 'lstm', or YAML text) into a Cell, or a
    TreeCell for a spec with `structure: tree`.
    `persistent` (target "cuda" only): None picks each pass's time loop by a cost model, True
    insists on a persistent kernel, False never uses one, 'single-block' or 'multi-block'
    insists on that persistent kernel. `constants` gives some of the spec's `constants:`
    other values ({"lam": 0.9}); they are folded into the generated code. `tape_budget`
    (targets "cpu" and "cuda", cells with matrix-valued states): the bytes of matrix states a
    forward pass may keep for backward, past which backward recomputes them from fewer kept
    copies (backend/emit_rows.py; default $RNNDSL_TAPE_BUDGET, else 1 GiB)."""
    if target not in TARGETS:
        raise SpecError(f"unknown target '{target}'; choose one of {', '.join(TARGETS)}")
    spec = load(source)
    if spec.structure == "tree":
        checked = check_tree(with_constants(spec, constants))
        edge = None if checked.edge is None else _cell(checked.edge, target, persistent)
        return TreeCell(checked, _cell(checked.node, target, persistent), edge)
    with ir.scope():  # the plan's nodes must be the IR's own
        step, bwd = _analyse(spec, constants)
        return _planned_cell(step, bwd, target, persistent, tape_budget)


def _cell(checked: Checked, target: str, persistent: bool | str | None) -> Cell:
    """A checked step (one of a tree cell's) made into a Cell."""
    with ir.scope():
        step = lower(checked)
        return _planned_cell(step, grad(step), target, persistent)


def _planned_cell(step: StepIR, bwd: Backward, target: str, persistent: bool | str | None,
                  tape_budget: int | None = None) -> Cell:
    _refuse_what_has_no_kernels(step, target)
    if rank2.row_value(step):  # one kernel per batch row (or the reference only)
        kernel_plan = row_plan(step, bwd) if target in ("cpu", "cuda") else None
    else:
        kernel_plan = plan(step, bwd)
    engine = _engine(step, bwd, kernel_plan, target, persistent, tape_budget)
    return Cell(step, bwd, engine, kernel_plan)


def retarget(cell: Cell, target: str, persistent: bool | str | None = None) -> Cell:
    """The same cell (its step, backward and kernel plan) on another target: what the
    PyTorch bridge runs when a module's tensors move to another device."""
    if target not in TARGETS:
        raise SpecError(f"unknown target '{target}'; choose one of {', '.join(TARGETS)}")
    _refuse_what_has_no_kernels(cell.step, target)
    kernel_plan = cell.plan
    if kernel_plan is None and target in ("cpu", "cuda") and rank2.row_value(cell.step):
        kernel_plan = row_plan(cell.step, cell.backward_ir)
    engine = _engine(cell.step, cell.backward_ir, kernel_plan, target, persistent,
                     getattr(cell.engine, "tape_budget", None))
    return Cell(cell.step, cell.backward_ir, engine, kernel_plan)


def refusal(step: StepIR, target: str) -> str | None:
    """Why `target` cannot run a step, for a message; None if it can. Values of rank 2, the
    shift and scalar states (`rank2.row_value`) run on the cpu and cuda targets (one batch row
    at a time) and the reference engine; block-diagonal parameters on the cpu and cuda
    targets' vector kernels (by their diagonal blocks; on cuda per step, without persistent
    kernels) and the reference engine, but not in a cell run one batch row at a time."""
    if target == "reference":
        return None
    rows, blocks = rank2.row_value(step), rank2.block_diagonal(step)
    if rows and blocks:
        return (f"the {target} target cannot run this cell yet: {blocks} and {rows}; the "
                "kernels that run a cell one batch row at a time take no block-diagonal "
                "parameters; use the reference target (target='reference', --target reference)")
    return None


def _refuse_what_has_no_kernels(step: StepIR, target: str):
    found = refusal(step, target)
    if found:
        raise SpecError(f"{step.file}: {found}")


def _engine(step, bwd, kernel_plan, target: str, persistent: bool | str | None,
            tape_budget: int | None = None):
    if target == "cuda":
        from rnndsl.engines.cuda_engine import CudaEngine  # imports Numba's CUDA support only when asked

        return CudaEngine(step, bwd, kernel_plan, persistent, tape_budget)
    if target == "cpu":
        return CpuEngine(step, bwd, kernel_plan, tape_budget)
    return ReferenceEngine(step, bwd)
