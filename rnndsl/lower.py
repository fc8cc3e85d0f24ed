"""Stage 4, lower: the checked AST becomes step IR (hash-consed nodes with concrete shapes)."""
from __future__ import annotations

from . import ir
from .check import FUNCTIONS, PREV, Checked
from .parse import Binary, Call, Concat, Name, Neg, Num

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
        if n in spec.constants:
            return ir.const(spec.constants[n].value)
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
                return product(e.left.id, e.right)
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
        return ir.apply(op, *args)

    def product(matrix: str, v) -> ir.Node:
        """W @ v; W @ [a, b] as W[:, :|a|] @ a + W[:, |a|:] @ b, the form the scheduler knows."""
        if isinstance(v, Concat) and len(v.items) == 1:
            v = v.items[0]
        if not isinstance(v, Concat):
            return ir.matvec(ir.leaf("param", matrix, checked.params[matrix].shape), expr(v))
        blocks = checked.layout.blocks[matrix]
        return ir.add_all([ir.matvec(ir.leaf("param", k, checked.params[k].shape), expr(part))
                           for k, part in zip(blocks, v.items)])

    for a in checked.order:
        value = expr(a.expr)
        if a.target in spec.states:
            value = ir.bcast(value, (spec.states[a.target],))
        values[a.target] = value
    return ir.StepIR(spec.name, spec.summary, spec.sizes, dict(spec.inputs), dict(spec.states),
                     spec.outputs, dict(checked.params), values, spec.file, checked.layout)
