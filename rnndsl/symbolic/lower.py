"""Stage 4, lower: the checked AST becomes step IR (hash-consed nodes with concrete shapes).

Constants become numbers. Parameters that the layout cuts (check.ParamLayout) are used as
their blocks, so nothing after this stage knows of concatenations, parts or sizes that are
numbers:
* `W @ [a, b]` is `W[:, :|a|] @ a + W[:, |a|:] @ b`;
* `[i, f] = W @ x + b` gives i = `W[:hidden, :] @ x + b[:hidden]` and f the rest;
* a vector whose size is a number is a list of per-row scalars (one per element): `s[k]` is
  the k-th, elementwise work is done element by element, `sum`, `max` and `softmax` are
  written out, and a product with such a vector is a sum of columns times scalars.
"""
from __future__ import annotations

from functools import reduce

from rnndsl.symbolic import ir, rank2
from rnndsl.language.check import FUNCTIONS, PREV, Checked
from rnndsl.language.spec import state_shape
from rnndsl.symbolic.ops import MACROS
from rnndsl.language.parse import Binary, Call, Concat, Index, Name, Neg, Num, Transpose

_BINARY = {"+": ir.add, "-": ir.sub, "*": ir.mul, "/": ir.div, "**": ir.power}
_FOLD = {"rmax": "maximum", "rmin": "minimum"}


def lower(checked: Checked) -> ir.StepIR:
    spec, cuts = checked.spec, checked.layout.cuts
    env: dict[str, ir.Node | list] = {}  # each equation's value; a list of per-row scalars
    values: dict[str, ir.Node] = {}  # the same, each element of a list named s[k]
    splits: dict[int, list[ir.Node]] = {}  # `[a, b] = e`: id(e) -> its parts

    def param(n: str) -> ir.Node:
        return ir.leaf("param", n, checked.params[n].shape)

    def name(e: Name) -> ir.Node | list:
        n = e.id
        if n in spec.inputs:
            return ir.leaf("input", n, (spec.inputs[n],))
        if n in env:
            return env[n]
        if n in spec.constants:
            return ir.const(spec.constants[n].value)
        if n in spec.sizes and n not in spec.params:
            return ir.size(n)
        if n.endswith(PREV) and n[:-len(PREV)] in spec.states:
            s = n[:-len(PREV)]
            return ir.leaf("prev", s, state_shape(spec.states[s]))
        if n in cuts:  # a vector parameter in parts, or of a size that is a number
            return [param(k) for k in cuts[n].names]
        return param(n)

    def expr(e) -> ir.Node | list:
        if isinstance(e, Num):
            return ir.const(e.value)
        if isinstance(e, Name):
            return name(e)
        if isinstance(e, Neg):
            return each(ir.neg, expr(e.operand))
        if isinstance(e, Index):
            return expr(e.operand)[e.index]
        if isinstance(e, Binary):
            if e.op == "@" and isinstance(e.left, Transpose):
                return rank2.mtv(expr(e.left.operand), expr(e.right))
            if e.op == "@" and isinstance(e.left, Name) and e.left.id in checked.layout.params:
                return product(e.left.id, e.right)
            if e.op == "@":  # a matrix computed in the step
                return rank2.mv(expr(e.left), expr(e.right))
            return each(lambda a, b: _BINARY[e.op](*rank2.align(a, b)), expr(e.left),
                        expr(e.right))
        assert isinstance(e, Call)
        op, kind = FUNCTIONS[e.func][len(e.args)]
        if kind == "axis":
            return axis_reduce(op, expr(e.args[0]), e.args[1])
        args = [expr(a) for a in e.args]
        if kind == "reduce":
            return row_reduce(op, args[0])
        if kind == "row":
            return softmax(args[0])
        if kind == "matrix":
            return rank2.outer(*args)
        if kind == "shift":  # the distribution is a list of per-row scalars: its size is a number
            return rank2.shift(args[0], as_list(args[1]))
        return each(lambda *a: elementwise(op, *a), *args)

    def product(matrix: str, v) -> ir.Node | list:
        """W @ v, block by block where W is cut; a list when W's rows are cut."""
        items = v.items if isinstance(v, Concat) else [v]
        parts = [p for item in items for p in as_list(expr(item))]
        cut = cuts.get(matrix)
        if cut is None:
            return ir.matvec(param(matrix), parts[0], checked.params[matrix].blocks)
        blocks = iter(cut.names)
        rows = [ir.add_all([block_product(param(next(blocks)), c, part)
                            for c, part in zip(cut.cols or [None], parts)])
                for _ in cut.rows or [None]]
        return rows if cut.rows else rows[0]

    def split(e, n: int) -> list[ir.Node]:
        """The n parts of `e` in `[a, b, ...] = e` (the checker allows only these forms)."""
        if isinstance(e, Binary) and e.op == "@":
            return product(e.left.id, e.right)
        if isinstance(e, Binary):
            return list(map(_BINARY[e.op], split(e.left, n), split(e.right, n)))
        if isinstance(e, Neg):
            return [ir.neg(p) for p in split(e.operand, n)]
        if isinstance(e, Call):
            op, _ = FUNCTIONS[e.func][len(e.args)]
            return [elementwise(op, *ps) for ps in zip(*(split(a, n) for a in e.args))]
        whole = expr(e)  # a parameter in parts, or a scalar the same for every part
        return whole if isinstance(whole, list) else [whole] * n

    for a in checked.order:
        if a.part is None:
            value = expr(a.expr)
        else:
            k, n = a.part
            if id(a.expr) not in splits:
                splits[id(a.expr)] = split(a.expr, n)
            value = splits[id(a.expr)][k]
        if a.target in spec.states:
            value = ir.bcast(value, state_shape(spec.states[a.target]))
        env[a.target] = value
        if isinstance(value, list):
            values.update((f"{a.target}[{k}]", v) for k, v in enumerate(value))
        else:
            values[a.target] = value
    return ir.StepIR(spec.name, spec.summary, spec.sizes, dict(spec.inputs), dict(spec.states),
                     spec.outputs, dict(checked.params), values, spec.file, checked.layout)


def elementwise(op: str, *args: ir.Node) -> ir.Node:
    """A function of the table in ops.py; a composite one (gelu, ...) built from others."""
    if len(args) == 2:
        args = rank2.align(*args)
    return MACROS[op].expand(*args) if op in MACROS else ir.apply(op, *args)


def block_product(w: ir.Node, col: str | None, v: ir.Node) -> ir.Node:
    """One block of W times its part of the vector. A block of one row is a vector (or a
    scalar, for one column too); a block of one column is a vector times a scalar."""
    if len(w.shape) == 2:
        return ir.matvec(w, v)
    if col == "1":
        return ir.mul(w, v)
    return ir.reduce("rsum", ir.mul(w, v))


def each(fn, *args):
    """fn elementwise; over the elements of lists (a scalar argument goes to each)."""
    lists = [a for a in args if isinstance(a, list)]
    if not lists:
        return fn(*args)
    return [fn(*(a[k] if isinstance(a, list) else a for a in args))
            for k in range(len(lists[0]))]


def as_list(v) -> list:
    return v if isinstance(v, list) else [v]


def row_reduce(op: str, x) -> ir.Node:
    if isinstance(x, list):  # per-row scalars: written out
        if op in _FOLD:
            return reduce(lambda a, b: ir.apply(_FOLD[op], a, b), x)
        total = ir.add_all(x)
        return total if op == "rsum" else ir.div(total, ir.const(len(x)))
    if op == "rmin":  # min over a row is minus the max of minus the row
        return ir.neg(ir.reduce("rmax", ir.neg(x)))
    if op == "norm":
        return ir.apply("sqrt", row_reduce("rsum", each(lambda v: ir.power(v, ir.const(2.0)), x)))
    return ir.reduce(op, x)


def axis_reduce(op: str, m: ir.Node, axis) -> ir.Node:
    """sum, mean, norm or softmax of a matrix over the axis the checker allowed: a size name or
    0, 1."""
    over = int(axis.value) if isinstance(axis, Num) else m.shape.index(axis.id)
    if op == "axis_softmax":
        return rank2.axis_softmax(m, over)
    if op == "axis_norm":
        return ir.apply("sqrt", rank2.axis_sum(ir.power(m, ir.const(2.0)), over))
    total = rank2.axis_sum(m, over)
    return ir.div(total, ir.size(m.shape[over])) if op == "axis_mean" else total


def softmax(x):
    if not isinstance(x, list):
        return ir.softmax(x)
    top = row_reduce("rmax", x)
    exps = [ir.apply("exp", ir.sub(v, top)) for v in x]
    total = ir.add_all(exps)
    return [ir.div(e, total) for e in exps]
