"""The operators of the language: one record per operator, everything about it in one place.

A primitive (`Op`) carries its spelling for users (if they may call it) and arity, its NumPy
rule (the reference engine), its derivative rule (`grad.py`) and its scalar body for the
generated kernels (`kernel_lib.py` writes it as a function of every target's module). A
composite (`Macro`) is a function of other operators, expanded when the spec is lowered: it
needs no derivative and no kernel code. Adding an operator means adding one record here and
its line in the README's function list; `kernel_lib` checks at import that every primitive
has kernel code for every target, and the table-driven test (tests/test_ops.py) runs every
record through the reference, the CPU and CUDA kernels and finite differences.

A derivative rule gets the node `y = op(*args)` and the adjoint `g` of y, and returns one
contribution per argument (None where no gradient flows). Rules reuse forward values:
sigmoid' is written with y itself, tanh' as 1 - y**2.

Kernel bodies are Python expressions of the arguments (`x`; or `a`, `b`) in the generated
module's dtype: `C0`, `C1`, `C05` are 0, 1, 0.5 of that dtype, and other library functions
(exp, tanh, maximum, ...) may be called. NaN must propagate as in NumPy.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
from scipy import special

from rnndsl.symbolic import ir, rank2
from rnndsl.symbolic.ir import Node, add, const, div, mul, neg, power, sub

HARD_SLOPE = 0.2  # hard_sigmoid(x) = clip(HARD_SLOPE x + 0.5, 0, 1)
HARD_EDGE = 0.5 / HARD_SLOPE  # ... flat beyond |x| = HARD_EDGE
ONE, TWO, HALF = const(1.0), const(2.0), const(0.5)


@dataclass(frozen=True)
class Op:
    """A primitive of the step IR."""

    numpy: Callable  # forward rule on NumPy arrays
    grad: Callable[[Node, Node], tuple]  # (y, g) -> one contribution per argument
    inline: str = ""  # code written inline (arithmetic, builtins): a format of the arguments
    body: str = ""  # the kernel function's return expression (see the module docstring)
    library: bool = False  # kernel code per dtype and target in kernel_lib (exp, tanh)
    spelling: str = ""  # the name users call it by; "" if they cannot
    arity: int = 1
    structural: bool = False  # reductions, softmax, products: the emitters' own loops
    kind: str = ""  # how users call it when not by a kind user_functions derives ("matrix")

    def code(self, name: str) -> str:
        """How a kernel computes one element: a format string of the argument expressions."""
        if self.inline:
            return self.inline
        return f"{name}({', '.join('{%d}' % k for k in range(self.arity))})"


@dataclass(frozen=True)
class Macro:
    """A composite function: `expand(*args)` builds it from other operators at lowering."""

    expand: Callable[..., Node]
    arities: tuple[int, ...] = (1,)


def _sigmoid(x):
    # exp of -|x| only, so neither branch overflows.
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e)).astype(x.dtype, copy=False)


def _softplus(x):
    return np.maximum(x, 0) + np.log1p(np.exp(-np.abs(x)))


def _softmax(x, axis=-1):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _axis_softmax_grad(y: Node, g: Node):
    """softmax' over one axis: y * (g - the sum of g * y over that axis, spread back)."""
    over = y.attr
    return (mul(y, sub(g, rank2.spread(rank2.axis_sum(mul(g, y), over), y.shape, 1 - over))),)


def block_diagonal(w: np.ndarray, blocks: int) -> np.ndarray:
    """A square matrix with everything off its `blocks` diagonal blocks zero: what the
    reference engine multiplies by, and keeps the gradient of (kernels that exploit the blocks
    are to read the diagonal blocks alone). Selected, not multiplied by a 0/1 mask: an inf or
    NaN off the blocks is not part of the parameter, and 0 * inf would make it NaN."""
    if blocks == 1:
        return w
    size = w.shape[-1] // blocks
    on_blocks = np.kron(np.eye(blocks, dtype=bool), np.ones((size, size), dtype=bool))
    return np.where(on_blocks, w, np.zeros((), w.dtype))


def _to_the_maxima(y: Node, g: Node) -> Node:
    """The gradient of a row's max: g shared equally by the elements equal to it (as
    torch.amax and JAX's max share it), a subgradient summing to g. Giving each of k tied
    elements all of g made it k times too large, and made the engines disagree where rounding
    left k elements exactly tied in one and one on top in the other (the differential fuzzer,
    seed 30283: a row of states converging to one value)."""
    top = ir.apply("eq", _x(y), y)
    return mul(g, div(top, ir.reduce("rsum", top)))


def _step(x):
    return (x > 0).astype(x.dtype) if isinstance(x, np.ndarray) else float(x > 0)


def _hard_sigmoid(x):
    return np.clip(HARD_SLOPE * x + 0.5, 0.0, 1.0)


def _x(y: Node) -> Node:
    return y.args[0]


def _pick(g: Node, first: Node) -> tuple[Node, Node]:
    """min/max: the gradient goes to the argument that was chosen (ties go to the second)."""
    return mul(g, first), mul(g, sub(ONE, first))


def _pow_grad(y: Node, g: Node):
    base, exponent = y.args
    d_base = mul(g, mul(exponent, power(base, sub(exponent, ONE))))
    if exponent.op in ("const", "size"):
        return d_base, None
    # d/de b**e = log(b) b**e. Where b is 0 (a weighting sharpened by w ** gamma whose small
    # entries underflowed) b**e is 0 too for e > 0, and the term is 0, not 0 * -inf: log is
    # taken of b + (b == 0), as PyTorch does.
    safe_base = add(base, ir.apply("eq", base, const(0.0)))
    return d_base, mul(g, mul(ir.apply("log", safe_base), y))


def _shift(w, *s):
    return sum(sk * np.roll(w, offset, axis=-1)
               for sk, offset in zip(s, rank2.shift_offsets(len(s))))


def _shift_grad(y: Node, g: Node):
    """y = sum_k s_k roll(w, o_k): w's adjoint is g shifted the other way (the shift by the
    reversed distribution), and s_k's the sum of g times w rolled by o_k."""
    w, *s = y.args
    return (rank2.shift(g, s[::-1]), *(ir.reduce("rsum", mul(g, rank2.roll(w, offset)))
                                       for offset in rank2.shift_offsets(len(s))))


def _unary(spelling: str, numpy, grad, body: str = "", library: bool = False,
           inline: str = "") -> Op:
    return Op(numpy, grad, inline=inline, body=body, library=library, spelling=spelling)


OPS: dict[str, Op] = {
    # arithmetic (the grammar's operators)
    "add": Op(np.add, lambda y, g: (g, g), inline="({0} + {1})", arity=2),
    "sub": Op(np.subtract, lambda y, g: (g, neg(g)), inline="({0} - {1})", arity=2),
    "mul": Op(np.multiply, lambda y, g: (mul(g, y.args[1]), mul(g, y.args[0])),
              inline="({0} * {1})", arity=2),
    "div": Op(np.divide, lambda y, g: (div(g, y.args[1]), neg(div(mul(g, y), y.args[1]))),
              inline="({0} / {1})", arity=2),
    "neg": Op(np.negative, lambda y, g: (neg(g),), inline="(-{0})"),
    "pow": Op(np.power, _pow_grad, inline="({0} ** {1})", arity=2),
    # elementwise functions
    "sigmoid": _unary("sigmoid", _sigmoid, lambda y, g: (mul(g, mul(y, sub(ONE, y))),),
                      body="C1 / (C1 + exp(-x))"),
    "tanh": _unary("tanh", np.tanh, lambda y, g: (mul(g, sub(ONE, power(y, TWO))),),
                   library=True),
    "exp": _unary("exp", np.exp, lambda y, g: (mul(g, y),), library=True),
    "log": _unary("log", np.log, lambda y, g: (div(g, _x(y)),), inline="math.log({0})"),
    "relu": _unary("relu", lambda x: np.maximum(x, 0),
                   lambda y, g: (mul(g, ir.apply("step", _x(y))),), body="C0 if x < C0 else x"),
    "softplus": _unary("softplus", _softplus,
                       lambda y, g: (mul(g, ir.apply("sigmoid", _x(y))),),
                       body="maximum(x, C0) + log1p_unit(exp(-abs(x)))"),
    "hard_sigmoid": _unary("hard_sigmoid", _hard_sigmoid, lambda y, g: (mul(g, mul(
        const(HARD_SLOPE), ir.apply("step", sub(const(HARD_EDGE), ir.apply("abs", _x(y)))))),),
        body="minimum(maximum(HARD_SLOPE * x + C05, C0), C1)"),
    "abs": _unary("abs", np.abs, lambda y, g: (mul(g, ir.apply("sign", _x(y))),),
                  inline="abs({0})"),
    "sqrt": _unary("sqrt", np.sqrt, lambda y, g: (div(mul(HALF, g), y),), inline="math.sqrt({0})"),
    "erf": _unary("erf", special.erf, lambda y, g: (mul(g, mul(
        const(2.0 / math.sqrt(math.pi)), ir.apply("exp", neg(power(_x(y), TWO))))),),
        inline="math.erf({0})"),
    "minimum": Op(np.minimum, lambda y, g: _pick(g, ir.apply("step", sub(y.args[1], y.args[0]))),
                  body="a if (a < b or a != a) else b", spelling="min", arity=2),
    "maximum": Op(np.maximum, lambda y, g: _pick(g, ir.apply("step", sub(y.args[0], y.args[1]))),
                  body="a if (a > b or a != a) else b", spelling="max", arity=2),
    # derivative helpers: piecewise constant, so no gradient of their own
    "step": Op(_step, lambda y, g: (None,), body="C1 if x > C0 else C0"),
    "sign": Op(np.sign, lambda y, g: (None,), body="C1 if x > C0 else (-C1 if x < C0 else x)"),
    "eq": Op(lambda a, b: (a == b).astype(np.result_type(a, b)), lambda y, g: (None, None),
             body="C1 if a == b else C0", arity=2),
    # rows: reductions over the feature axis give one value per batch row
    "rsum": Op(lambda x: x.sum(axis=-1, keepdims=True), lambda y, g: (g,), spelling="sum",
               structural=True),
    "rmean": Op(lambda x: x.mean(axis=-1, keepdims=True),
                lambda y, g: (div(g, ir.size(_x(y).shape[0])),), spelling="mean",
                structural=True),
    "rmax": Op(lambda x: x.max(axis=-1, keepdims=True), lambda y, g: (_to_the_maxima(y, g),),
               spelling="max", structural=True),
    "softmax": Op(_softmax, lambda y, g: (mul(y, sub(g, ir.reduce("rsum", mul(g, y)))),),
                  spelling="softmax", structural=True),
    "bcast": Op(lambda x: x, lambda y, g: (rank2.total(g),), structural=True),
    # matrix times vector; the matrix's own gradient (an outer product) is kept by grad.py.
    # The attr, when set, is the number of diagonal blocks of a block-diagonal W.
    "matvec": Op(lambda w, v, blocks=1: v @ block_diagonal(w, blocks).T, lambda y, g: (
        None, ir.matvec_t(y.args[0], g, y.attr or 1)), arity=2, structural=True),
    "matvec_t": Op(lambda w, v, blocks=1: v @ block_diagonal(w, blocks), lambda y, g: (None, None),
                   arity=2, structural=True),
    # values of rank 2 (rank2.py): a matrix computed in the step, one per batch row
    "mv": Op(lambda m, v: np.einsum("...ij,...j->...i", m, v), lambda y, g: (
        rank2.outer(g, y.args[1]), rank2.mtv(y.args[0], g)), arity=2, structural=True),
    "mtv": Op(lambda m, u: np.einsum("...ij,...i->...j", m, u), lambda y, g: (
        rank2.outer(y.args[1], g), rank2.mv(y.args[0], g)), arity=2, structural=True),
    "outer": Op(lambda a, b: a[..., :, None] * b[..., None, :], lambda y, g: (
        rank2.mv(g, y.args[1]), rank2.mtv(g, y.args[0])), spelling="outer", arity=2,
        structural=True, kind="matrix"),
    # `along` and `over` (the node's attr) come last: the vector's axis, the summed axis
    "spread": Op(lambda v, along: v[..., :, None] if along == 0 else v[..., None, :],
                 lambda y, g: (rank2.axis_sum(g, 1 - y.attr),), structural=True),
    "axis_sum": Op(lambda m, over: m.sum(axis=over - 2), lambda y, g: (
        rank2.spread(g, _x(y).shape, 1 - y.attr),), spelling="sum", arity=2, structural=True,
        kind="axis"),
    "axis_softmax": Op(lambda m, over: _softmax(m, over - 2), _axis_softmax_grad,
                       spelling="softmax", arity=2, structural=True, kind="axis"),
    # the NTM's location addressing (rank2.py): `shift(w, s)` takes a weighting over named
    # slots and a shift distribution whose size is an odd number, lowered as its weights
    "shift": Op(_shift, _shift_grad, spelling="shift", arity=2, structural=True, kind="shift"),
    "roll": Op(lambda w, offset: np.roll(w, offset, axis=-1),
               lambda y, g: (rank2.roll(g, -y.attr),), structural=True),
}


def _arg(args: tuple[Node, ...], k: int, default: float) -> Node:
    return args[k] if len(args) > k else const(default)


def _clip(x: Node, lo: Node, hi: Node) -> Node:
    return ir.apply("minimum", ir.apply("maximum", x, lo), hi)


SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
MACROS: dict[str, Macro] = {
    "gelu": Macro(lambda x: mul(mul(HALF, x), add(ONE, ir.apply(
        "erf", div(x, const(math.sqrt(2.0))))))),
    "gelu_tanh": Macro(lambda x: mul(mul(HALF, x), add(ONE, ir.apply("tanh", mul(
        const(SQRT_2_OVER_PI), add(x, mul(const(0.044715), power(x, const(3.0))))))))),
    "silu": Macro(lambda x: mul(x, ir.apply("sigmoid", x))),
    "elu": Macro(lambda x, *alpha: add(ir.apply("relu", x), mul(_arg(alpha, 0, 1.0), ir.apply(
        "minimum", sub(ir.apply("exp", x), ONE), const(0.0)))), arities=(1, 2)),
    "leaky_relu": Macro(lambda x, *slope: add(ir.apply("relu", x), mul(_arg(slope, 0, 0.01), neg(
        ir.apply("relu", neg(x))))), arities=(1, 2)),
    "hard_tanh": Macro(lambda x: _clip(x, const(-1.0), ONE)),
    "softsign": Macro(lambda x: div(x, add(ONE, ir.apply("abs", x)))),
    "clip": Macro(_clip, arities=(3,)),
}


def user_functions() -> dict[str, dict[int, tuple[str, str]]]:
    """What users may call: spelling -> {number of arguments: (op, kind)}; kinds: "map"
    elementwise (primitives and macros), "reduce" vector -> per-row scalar, "row" vector ->
    vector, "matrix" two vectors -> a matrix (outer), "axis" a matrix and the axis it is
    reduced over -> a vector, "shift" a weighting and a shift distribution -> the weighting
    shifted. `min` of one argument is lowered as -max(-x)."""
    table: dict[str, dict[int, tuple[str, str]]] = {}
    for name, op in OPS.items():
        if op.spelling:
            kind = op.kind or ("map" if not op.structural else
                               "row" if name == "softmax" else "reduce")
            table.setdefault(op.spelling, {})[op.arity] = (name, kind)
    table["min"][1] = ("rmin", "reduce")
    # composites lowered in lower.py: the mean and the Euclidean norm, of a vector (a per-row
    # scalar) and over one axis of a matrix (a vector)
    table["mean"][2] = ("axis_mean", "axis")
    table["norm"] = {1: ("norm", "reduce"), 2: ("axis_norm", "axis")}
    for name, macro in MACROS.items():
        table[name] = {n: (name, "map") for n in macro.arities}
    return table
