"""Step IR for values of rank 2: matrix-valued states (fast weights, the delta rule's W) and the
products, outer products, spreads and axis sums between them and vectors.

A matrix value has the shape (rows, cols) of two size names and, per batch row, is a
rows x cols array (the reference engine holds (B, rows, cols)). A matrix *parameter* times a
vector stays `ir.matvec`, which the schedule stacks into GEMMs; the products here have a
matrix that is computed inside the step (a state, an outer product), one per batch row.

Ops (derivative rules in ops.py, beside their NumPy rules):
* `mv(M, v)`      M @ v, (r, c) x (c,) -> (r,)
* `mtv(M, u)`     M.T @ u, (r, c) x (r,) -> (c,)
* `outer(a, b)`   a b^T, (r,) x (c,) -> (r, c)
* `spread(v, shape, along)`  a vector repeated across a matrix: element (i, j) is v[i] when
  `along` is 0 (v runs down the rows), v[j] when it is 1
* `axis_sum(M, over)`  the sum over axis `over` (0: down the rows, 1: along each row); the
  result runs along the other axis
* `axis_softmax(M, over)`  softmax over axis `over`: each column (0) or row (1) sums to 1
Axes are numbers in the IR (attr), so a square matrix (hidden, hidden) is never ambiguous.

The Neural Turing Machine's location addressing works on a weighting vector over the memory's
slots, beside these:
* `shift(w, s_0, ..., s_{n-1})`  the circular convolution of w by a distribution over the n
  (odd) shifts -(n-1)/2 .. (n-1)/2, each s_k a per-row scalar (Graves et al. 2014, eq. 8):
  the sum over k of s_k roll(w, k - (n-1)/2)
* `roll(w, offset)`  w rotated by a fixed number of places: element i is w[i - offset], with
  the index taken modulo the size (NumPy's np.roll); what shift's derivative is made of
"""
from __future__ import annotations

from rnndsl.symbolic import ir
from rnndsl.symbolic.ir import Node, node

# the primitives of this module (the cpu target runs them one batch row at a time, the cuda
# target not yet)
OPS = ("mv", "mtv", "outer", "spread", "axis_sum", "axis_softmax", "shift", "roll")


def is_matrix(n: Node) -> bool:
    return len(n.shape) == 2


def mv(m: Node, v: Node) -> Node:
    assert is_matrix(m) and v.shape == m.shape[1:], (m, v)
    return node("mv", (m, v), None, m.shape[:1])


def mtv(m: Node, u: Node) -> Node:
    assert is_matrix(m) and u.shape == m.shape[:1], (m, u)
    return node("mtv", (m, u), None, m.shape[1:])


def outer(a: Node, b: Node) -> Node:
    assert len(a.shape) == 1 and len(b.shape) == 1, (a, b)
    if a.is_const(0.0) or b.is_const(0.0):
        return ir.const(0.0)
    return node("outer", (a, b), None, a.shape + b.shape)


def spread(v: Node, shape: tuple[str, str], along: int) -> Node:
    assert len(v.shape) == 1 and v.shape[0] == shape[along], (v, shape, along)
    return node("spread", (v,), along, shape)


def axis_sum(m: Node, over: int) -> Node:
    assert is_matrix(m) and over in (0, 1), (m, over)
    return node("axis_sum", (m,), over, m.shape[1 - over:2 - over])


def axis_softmax(m: Node, over: int) -> Node:
    assert is_matrix(m) and over in (0, 1), (m, over)
    return node("axis_softmax", (m,), over, m.shape)


def shift(w: Node, s: list[Node]) -> Node:
    assert len(w.shape) == 1 and len(s) % 2 == 1 and all(k.shape == () for k in s), (w, s)
    return node("shift", (w, *s), None, w.shape)


def roll(w: Node, offset: int) -> Node:
    assert len(w.shape) == 1, w
    if offset == 0 or w.is_const(0.0):
        return w
    return node("roll", (w,), offset, w.shape)


def shift_offsets(n: int) -> range:
    """The shifts that the n weights of a shift distribution stand for: -1, 0, 1 for n = 3."""
    return range(-(n // 2), n // 2 + 1)


def total(x: Node) -> Node:
    """The sum of all of a value's features: a per-row scalar."""
    if is_matrix(x):
        x = axis_sum(x, 1)
    return ir.reduce("rsum", x)


def align(a: Node, b: Node) -> tuple[Node, Node]:
    """Operands of an elementwise op, a vector spread along the matrix axis of its size (the
    checker has made sure that there is exactly one such axis)."""
    if is_matrix(a) and len(b.shape) == 1:
        return a, spread(b, a.shape, a.shape.index(b.shape[0]))
    if is_matrix(b) and len(a.shape) == 1:
        return spread(a, b.shape, b.shape.index(a.shape[0])), b
    return a, b


def block_diagonal(step: ir.StepIR) -> str | None:
    """The first block-diagonal parameter of a step, described for a message; None if there is
    none. The cpu and cuda targets' vector kernels multiply by its diagonal blocks alone; the
    row kernels (`row_value`) have no code for it yet."""
    for name, info in step.params.items():
        if info.blocks > 1:
            return f"parameter '{name}' is block-diagonal ({info.blocks} blocks)"
    return None


def matrix_value(step: ir.StepIR) -> str | None:
    """The first value of rank 2 in a step, described for a message (a named one if there is
    one); None if there is none. The cuda target has no kernels for such values yet."""
    for name, n in step.values.items():
        if is_matrix(n):
            kind = "state" if name in step.states else "value"
            return f"{kind} '{name}' is a matrix of shape ({', '.join(n.shape)})"
    for name, n in step.values.items():
        inner = next((m for m in ir.topo_order([n]) if is_matrix(m) and m.op != "param"),
                     None)
        if inner is not None:
            return f"the equation of '{name}' computes a matrix of shape " \
                   f"({', '.join(inner.shape)})"
    return None


def circular_shift(step: ir.StepIR) -> str | None:
    """The first equation that uses the NTM's circular shift, described for a message."""
    for name, n in step.values.items():
        if any(m.op in ("shift", "roll") for m in ir.topo_order([n])):
            return f"the equation of '{name}' uses shift(w, s), the circular shift"
    return None


def scalar_state(step: ir.StepIR) -> str | None:
    """The first state that is one number per sequence (`m: []`), described for a message."""
    return next((f"state '{name}' is one number per sequence"
                 for name, size in step.states.items() if size == ()), None)


def row_value(step: ir.StepIR) -> str | None:
    """What makes the cpu target run a step one batch row at a time (emit_rows.py), and the
    cuda target refuse it: a value of rank 2 (`matrix_value`), the circular shift or a
    per-sequence scalar state, which the batched vector kernels have no code for; None if
    none of these."""
    return matrix_value(step) or circular_shift(step) or scalar_state(step)
