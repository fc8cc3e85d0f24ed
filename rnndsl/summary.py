"""What `rnndsl compile` tells about a cell: its interface, parameters, GEMM groups and cost."""
from __future__ import annotations

from collections import Counter
from fractions import Fraction

from rnndsl.symbolic import ir
from rnndsl.language.errors import printable
from rnndsl.language.spec import state_shape
from rnndsl.symbolic.ir import Node, StepIR
from rnndsl.engines.cell import Cell
from rnndsl.engines.tree import TreeCell

_FREE = ("input", "prev", "param", "const", "size", "adj", "bcast", "spread")


def flops_per_step(roots: list[Node]) -> Counter:
    """Floating-point operations per batch row and time step, as {monomial: coefficient}, a
    monomial being a sorted tuple of size names (2 per multiply-add in matrix products, of a
    block-diagonal matrix its blocks' alone, 1 per element for everything else)."""
    cost: Counter = Counter()
    for n in ir.topo_order(roots):
        if n.op in _FREE:
            continue
        if n.op in ("matvec", "matvec_t"):  # attr: the number of diagonal blocks, if any
            cost[tuple(sorted(n.args[0].shape))] += Fraction(2, n.attr or 1)
        elif n.op in ("mv", "mtv"):
            cost[tuple(sorted(n.args[0].shape))] += 2
        elif n.op in ("rsum", "rmean", "rmax", "axis_sum"):
            cost[tuple(sorted(n.args[0].shape))] += 1
        elif n.op == "softmax":
            cost[n.shape] += 4
        else:
            cost[tuple(sorted(n.shape))] += 1
    return cost


def format_poly(poly: Counter) -> str:
    terms = []
    for mono, k in sorted(poly.items(), key=lambda kv: (-len(kv[0]), kv[0])):
        powers = Counter(mono)
        factors = [s if p == 1 else f"{s}^{p}" for s, p in sorted(powers.items())]
        text = "·".join(factors) or "1"
        terms.append(text if k == 1 else f"{k}·{text}" if factors else str(k))
    return " + ".join(terms) or "0"


def evaluate_poly(poly: Counter, sizes: dict[str, int]) -> int:
    total = 0
    for mono, k in poly.items():
        v = k
        for s in mono:
            v *= sizes[s]
        total += v
    return int(total)


def describe(cell: Cell | TreeCell) -> str:
    if isinstance(cell, TreeCell):
        return _describe_tree(cell)
    step: StepIR = cell.step
    lines = [f"{step.name}: {printable(step.summary)}" if step.summary else step.name]
    lines.append(f"  sizes    {', '.join(step.sizes)}")
    lines.append(f"  inputs   {_sized(step.inputs)}")
    lines.append(f"  states   {_sized(step.states)}")
    lines.append(f"  outputs  {', '.join(f'{o} {_shape(step.shape_of(o))}' for o in step.outputs)}")
    lines.append(f"  params   {len(cell.params)}")
    for p, info in cell.params.items():
        how = "declared" if info.declared else "inferred"
        init = info.init if info.init != "constant" else f"constant {info.value:g}"
        lines.append(f"    {p:<12} {_shape(info.shape):<18} {init:<12} {how} at "
                     f"line {info.pos.line}, column {info.pos.column}")
    if cell.plan is not None:
        lines.append("  GEMM groups")
        lines += [f"    {g}" for g in cell.plan.describe_groups()]
    lines += getattr(cell.engine, "describe", lambda: [])()  # e.g. the CUDA persistent kernel
    fwd = flops_per_step(step.roots())
    bwd = flops_per_step(cell.backward_ir.roots())
    for w, terms in cell.backward_ir.d_matrices.items():  # dW += g v^T, per row
        for g, v in terms:  # (of a block-diagonal W, its blocks)
            bwd[tuple(sorted(g.shape + v.shape))] += Fraction(2, step.params[w].blocks)
    lines.append(f"  FLOPs per step and batch row: forward {format_poly(fwd)}")
    lines.append(f"                                backward {format_poly(bwd)}")
    return "\n".join(lines)


def _describe_tree(cell: TreeCell) -> str:
    """A tree cell: how it runs over trees, then each of its steps as a cell."""
    spec = cell.spec
    lines = [f"{spec.name}: {printable(spec.summary)}" if spec.summary else spec.name]
    children = f"at most {cell.arity} ordered" if cell.arity else "any number of"
    calls = "one kernel call" if cell.edge is None else \
        "two kernel calls (per-child step, node step)"
    lines.append(f"  runs over trees: {children} children per node; {calls} per level of the "
                 "trees")
    steps = [("per-child step (one row per child of a node)", cell.edge),
             ("node step (the children's states as inputs)" if cell.edge is None else
              "node step (the sums over the children as inputs)", cell.node)]
    for title, step in steps:
        if step is not None:
            lines.append(f"  {title}")
            lines += [f"  {line}" for line in describe(step).splitlines()[1:]]
    return "\n".join(lines)


def _shape(shape: tuple[str, ...]) -> str:
    return "scalar" if not shape else f"({', '.join(shape)})"


def _sized(d: dict) -> str:
    return ", ".join(f"{k} {_shape(state_shape(v))}" for k, v in d.items()) or "none"
