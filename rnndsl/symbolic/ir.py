"""The step IR: an immutable, hash-consed DAG of shaped nodes for one time step.

Every node is built through `node()`, which returns the existing node when an equal one
exists (same op, same argument nodes, same attribute), so common subexpressions are shared by
construction and nodes compare by identity. Shapes are tuples of size names:
`()` a scalar (per batch row if batched), `(n,)` a vector, `(m, n)` a matrix parameter.
The constructors below simplify as they build (`x * 1`, `x + 0`, constant folding), which
keeps the derived backward pass as short as a hand derivation.

Leaf ops: input, prev (a state's previous value), param, const, size (a size as a number),
adj (an adjoint arriving at a backward step). Everything else is listed in `ops.py`.
Values of rank 2 (matrix-valued states and what is computed from them) have shapes of two
sizes; their own ops are built in `rank2.py`. Nothing below assumes vectors beyond the shape
checks in the constructors.
"""
from __future__ import annotations

import contextvars
import itertools
from contextlib import contextmanager
from dataclasses import dataclass, field

LEAVES = ("input", "prev", "param", "const", "size", "adj")


@dataclass(frozen=True, eq=False)
class Node:
    op: str
    args: tuple["Node", ...]
    attr: object  # leaf name, constant value, or None
    shape: tuple[str, ...]
    batched: bool  # depends on per-sequence data (inputs, previous states, adjoints)
    uid: int = field(repr=False)

    def __repr__(self) -> str:
        return f"Node({render(self)})"

    @property
    def is_leaf(self) -> bool:
        return self.op in LEAVES

    def is_const(self, value: float | None = None) -> bool:
        return self.op == "const" and (value is None or self.attr == value)


# Hash-consing tables: one per compilation (`scope`), dropped when it ends, so a process that
# compiles thousands of specs does not keep every node it ever made. Uids come from one
# counter and are never reused, so nodes of different tables never collide; within a
# compilation they increase in order of creation, which depends on the spec alone.
_TABLES: list[dict[tuple, Node]] = [{}]
_UIDS = itertools.count()


@contextmanager
def scope():
    """Nodes made inside share one hash-consing table of their own."""
    _TABLES.append({})
    try:
        yield
    finally:
        _TABLES.pop()


def node(op: str, args: tuple[Node, ...], attr, shape: tuple[str, ...]) -> Node:
    table = _TABLES[-1]
    key = (op, tuple(a.uid for a in args), attr, shape)
    found = table.get(key)
    if found is None:
        batched = op in ("input", "prev", "adj") or any(a.batched for a in args)
        found = Node(op, args, attr, shape, batched, next(_UIDS))
        table[key] = found
    return found


# -- leaves ---------------------------------------------------------------------------------
def const(value: float) -> Node:
    return node("const", (), float(value), ())


def leaf(op: str, name: str, shape: tuple[str, ...]) -> Node:
    return node(op, (), name, shape)


def size(name: str) -> Node:
    return node("size", (), name, ())


# -- shapes ---------------------------------------------------------------------------------
def broadcast(a: tuple, b: tuple) -> tuple:
    if a == b or not b:
        return a
    if not a:
        return b
    raise ValueError(f"shapes {a} and {b} do not match")


# -- elementwise, with simplification ---------------------------------------------------------
def add(a: Node, b: Node) -> Node:
    if a.is_const() and b.is_const():
        return const(a.attr + b.attr)
    if a.is_const(0.0) and b.shape == broadcast(a.shape, b.shape):
        return b
    if b.is_const(0.0) and a.shape == broadcast(a.shape, b.shape):
        return a
    if b.op == "neg":
        return sub(a, b.args[0])
    return node("add", (a, b), None, broadcast(a.shape, b.shape))


def sub(a: Node, b: Node) -> Node:
    if a.is_const() and b.is_const():
        return const(a.attr - b.attr)
    if b.is_const(0.0) and a.shape == broadcast(a.shape, b.shape):
        return a
    if a.is_const(0.0) and b.shape == broadcast(a.shape, b.shape):
        return neg(b)
    if b.op == "neg":
        return add(a, b.args[0])
    return node("sub", (a, b), None, broadcast(a.shape, b.shape))


def mul(a: Node, b: Node) -> Node:
    if a.is_const() and b.is_const():
        return const(a.attr * b.attr)
    if a.is_const(0.0) or b.is_const(0.0):
        return const(0.0)
    if a.is_const(1.0) and b.shape == broadcast(a.shape, b.shape):
        return b
    if b.is_const(1.0) and a.shape == broadcast(a.shape, b.shape):
        return a
    if a.is_const(-1.0):
        return neg(b)
    if b.is_const(-1.0):
        return neg(a)
    if a.op == "neg":
        return neg(mul(a.args[0], b))
    if b.op == "neg":
        return neg(mul(a, b.args[0]))
    return node("mul", (a, b), None, broadcast(a.shape, b.shape))


def div(a: Node, b: Node) -> Node:
    if a.is_const() and b.is_const() and b.attr != 0.0:
        return const(a.attr / b.attr)
    if a.is_const(0.0):
        return const(0.0)
    if b.is_const(1.0) and a.shape == broadcast(a.shape, b.shape):
        return a
    return node("div", (a, b), None, broadcast(a.shape, b.shape))


def neg(a: Node) -> Node:
    if a.is_const():
        return const(-a.attr)
    if a.op == "neg":
        return a.args[0]
    return node("neg", (a,), None, a.shape)


def power(a: Node, b: Node) -> Node:
    if b.is_const(1.0):
        return a
    if a.is_const() and b.is_const():
        try:
            value = a.attr ** b.attr
        except (ZeroDivisionError, OverflowError):  # 0 ** -1, 10 ** 400: NumPy's inf at run time
            value = None
        if isinstance(value, float):  # (-8) ** 0.5 is complex in Python: leave it unfolded
            return const(value)
    return node("pow", (a, b), None, broadcast(a.shape, b.shape))


def apply(op: str, *args: Node) -> Node:
    """Any other elementwise function (sigmoid, tanh, min, max, step, ...)."""
    shape = args[0].shape
    for a in args[1:]:
        shape = broadcast(shape, a.shape)
    return node(op, tuple(args), None, shape)


# -- rows and matrices ----------------------------------------------------------------------
def reduce(op: str, x: Node) -> Node:
    """Row reductions over the feature axis: rsum, rmean, rmax -> a per-row scalar."""
    assert len(x.shape) == 1, x.shape
    return node(op, (x,), None, ())


def softmax(x: Node) -> Node:
    assert len(x.shape) == 1, x.shape
    return node("softmax", (x,), None, x.shape)


def bcast(x: Node, shape: tuple[str, ...]) -> Node:
    """A per-row scalar spread over a vector's features (explicit only where a shape must be)."""
    if x.shape == shape:
        return x
    return node("bcast", (x,), None, shape)


def matvec(w: Node, v: Node, blocks: int = 1) -> Node:
    """W @ v for a matrix parameter W of shape (rows, cols) and a vector v of size cols. With
    `blocks` > 1, W is square and block-diagonal (the attr): only its diagonal blocks count."""
    assert w.op == "param" and len(w.shape) == 2 and v.shape == (w.shape[1],), (w, v)
    return node("matvec", (w, v), blocks if blocks > 1 else None, (w.shape[0],))


def matvec_t(w: Node, v: Node, blocks: int = 1) -> Node:
    """W.T @ v: how an adjoint flows back through W @ x."""
    assert w.op == "param" and len(w.shape) == 2 and v.shape == (w.shape[0],), (w, v)
    return node("matvec_t", (w, v), blocks if blocks > 1 else None, (w.shape[1],))


def add_all(terms: list[Node]) -> Node:
    terms = [t for t in terms if not t.is_const(0.0)]
    if not terms:
        return const(0.0)
    total = terms[0]
    for t in terms[1:]:
        total = add(total, t)
    return total


# -- traversal ------------------------------------------------------------------------------
def topo_order(roots) -> list[Node]:
    """Every node reachable from `roots`, each after its arguments."""
    return topo_order_until(roots, lambda n: False)


def topo_order_until(roots, stop) -> list[Node]:
    """Every node reachable from `roots` without looking past nodes for which stop(node) is
    true, each after its arguments."""
    seen: set[int] = set()
    order: list[Node] = []
    stack = [(r, False) for r in reversed(list(roots))]
    while stack:
        n, done = stack.pop()
        if done:
            order.append(n)
            continue
        if n.uid in seen:
            continue
        seen.add(n.uid)
        stack.append((n, True))
        if not stop(n):
            stack.extend((a, False) for a in reversed(n.args) if a.uid not in seen)
    return order


# -- printing -------------------------------------------------------------------------------
# How an adjoint arriving at a step prints: `d_h_next` in a sequence (from step t+1 and the
# loss); a tree cell's steps print theirs as coming from the parent (see `seeds_named`).
_SEED_NAME = contextvars.ContextVar("seed_name", default="d_{}_next")


@contextmanager
def seeds_named(pattern: str):
    """Within the block, an arriving adjoint of `s` prints as pattern.format(s)."""
    token = _SEED_NAME.set(pattern)
    try:
        yield
    finally:
        _SEED_NAME.reset(token)


_INFIX = {"add": ("+", 1), "sub": ("-", 1), "mul": ("*", 2), "div": ("/", 2),
          "matvec": ("@", 3), "matvec_t": ("@", 3), "mv": ("@", 3), "mtv": ("@", 3),
          "pow": ("**", 5)}
_FUNC_NAMES = {"minimum": "min", "maximum": "max", "rsum": "sum", "rmean": "mean", "rmax": "max",
               "axis_sum": "sum", "axis_softmax": "softmax"}


def render(n: Node, names: dict[int, str] | None = None, top: bool = True) -> str:
    """An expression as text; nodes in `names` print as their name."""
    text, _ = _render(n, names or {}, top)
    return text


def _render(n: Node, names: dict[int, str], top: bool) -> tuple[str, int]:
    if not top and n.uid in names:
        return names[n.uid], 9
    if n.op in ("input", "param", "size"):
        return str(n.attr), 9
    if n.op == "prev":
        return f"{n.attr}_prev", 9
    if n.op == "adj":
        return _SEED_NAME.get().format(n.attr), 9
    if n.op == "const":
        v = n.attr
        text = str(int(v)) if abs(v) < 1e15 and v == int(v) else repr(v)  # inf, nan: repr
        return text, (9 if v >= 0 else 4)
    if n.op in ("bcast", "spread"):
        return _render(n.args[0], names, False)
    if n.op in ("axis_sum", "axis_softmax"):  # sum(M, key): the axis, a number if both alike
        rows, cols = n.args[0].shape
        axis = str(n.attr) if rows == cols else (rows, cols)[n.attr]
        return f"{_FUNC_NAMES[n.op]}({_render(n.args[0], names, False)[0]}, {axis})", 9
    if n.op == "roll":
        return f"roll({_render(n.args[0], names, False)[0]}, {n.attr})", 9
    if n.op == "neg":
        inner, p = _render(n.args[0], names, False)
        return f"-{inner if p >= 4 else f'({inner})'}", 4
    if n.op in _INFIX:
        sym, prec = _INFIX[n.op]
        a, pa = _render(n.args[0], names, False)
        b, pb = _render(n.args[1], names, False)
        if pa < prec or (n.op == "pow" and pa <= prec):
            a = f"({a})"
        if n.op in ("matvec_t", "mtv"):
            a = f"{a}.T"
        if pb < prec or (pb == prec and n.op in ("sub", "div", "matvec", "matvec_t", "mv", "mtv")):
            b = f"({b})"
        return f"{a} {sym} {b}", prec
    fname = _FUNC_NAMES.get(n.op, n.op)
    args = ", ".join(_render(a, names, False)[0] for a in n.args)
    return f"{fname}({args})", 9


# -- a whole step ---------------------------------------------------------------------------
@dataclass(frozen=True)
class StepIR:
    """One forward time step: what comes in, the named values it computes, what goes out."""

    name: str
    summary: str
    sizes: tuple[str, ...]
    inputs: dict[str, str]  # name -> size
    states: dict[str, str]  # name -> size
    outputs: tuple[str, ...]
    params: dict  # name -> check.ParamInfo
    values: dict[str, Node]  # every equation's target, in an order that respects use
    file: str = ""
    layout: object = None  # check.ParamLayout: the parameters as the user sees them

    @property
    def names(self) -> dict[int, str]:
        """Computed node -> the first equation that names it (a leaf keeps its own name, even
        where an equation only renames it)."""
        out: dict[int, str] = {}
        for name, n in self.values.items():
            if not n.is_leaf:
                out.setdefault(n.uid, name)
        return out

    def roots(self) -> list[Node]:
        return [self.values[s] for s in self.states] + [self.values[o] for o in self.outputs]

    def shape_of(self, name: str) -> tuple[str, ...]:
        return self.values[name].shape

    def equations(self) -> str:
        """One line per equation; one that only renames an earlier value prints as its name."""
        names = self.names
        return "\n".join(f"{t} = {names[n.uid] if names.get(n.uid, t) != t else render(n, names)}"
                         for t, n in self.values.items())
