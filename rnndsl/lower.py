"""Stage 4, lower: the checked AST becomes step IR (hash-consed nodes with concrete shapes)."""
from __future__ import annotations

from . import ir
from .check import FUNCTIONS, PREV, Checked
from .ops import MACROS
from .parse import Binary, Call, Name, Neg, Num

_BINARY = {"+": ir.add, "-": ir.sub, "*": ir.mul, "/": ir.div, "**": ir.power}


def lower(checked: Checked) -> ir.StepIR:
    spec = checked.spec
    values: dict[str, ir.Node] = {}

    def name(e: Name) -> ir.Node:
        n = e.id
        if n in spec.inputs:
            return ir.leaf("input", n, (spec.inputs[n],))
        if n in values:
            return values[n]
        if n.endswith(PREV) and n[:-len(PREV)] in spec.states:
            s = n[:-len(PREV)]
            return ir.leaf("prev", s, (spec.states[s],))
        return ir.leaf("param", n, checked.params[n].shape)

    def expr(e) -> ir.Node:
        if isinstance(e, Num):
            return ir.const(e.value)
        if isinstance(e, Name):
            return name(e)
        if isinstance(e, Neg):
            return ir.neg(expr(e.operand))
        if isinstance(e, Binary):
            if e.op == "@":
                return ir.matvec(name(e.left), expr(e.right))
            return _BINARY[e.op](expr(e.left), expr(e.right))
        assert isinstance(e, Call)
        op, kind = FUNCTIONS[e.func][len(e.args)]
        args = [expr(a) for a in e.args]
        if op == "rmin":  # min over a row is minus the max of minus the row
            return ir.neg(ir.reduce("rmax", ir.neg(args[0])))
        if kind == "reduce":
            return ir.reduce(op, args[0])
        if kind == "row":
            return ir.softmax(args[0])
        if op in MACROS:
            return MACROS[op].expand(*args)
        return ir.apply(op, *args)

    for a in checked.order:
        value = expr(a.expr)
        if a.target in spec.states:
            value = ir.bcast(value, (spec.states[a.target],))
        values[a.target] = value
    return ir.StepIR(spec.name, spec.summary, spec.sizes, dict(spec.inputs), dict(spec.states),
                     spec.outputs, dict(checked.params), values, spec.file)
