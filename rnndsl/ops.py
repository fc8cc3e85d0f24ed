"""The primitive table: for each op, its NumPy forward rule and its derivative rule, side by side.

Adding an operator means adding one entry here (and its spelling in `check.FUNCTIONS` if
users may call it); the reference interpreter, `grad` and the code generators read this
table. A derivative rule gets the node `y = op(*args)` and the adjoint `g` of y, and returns
one contribution per argument (None where no gradient flows). Rules reuse forward values:
sigmoid' is written with y itself, tanh' as 1 - y**2.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from . import ir
from .ir import Node, add, const, div, mul, neg, power, sub
from .kernel_lib import HARD_SLOPE

ONE, TWO, HALF = const(1.0), const(2.0), const(0.5)
HARD_EDGE = 0.5 / HARD_SLOPE  # hard_sigmoid(x) = clip(HARD_SLOPE x + 0.5, 0, 1): flat beyond


@dataclass(frozen=True)
class Op:
    numpy: Callable  # forward rule on NumPy arrays
    grad: Callable[[Node, Node], tuple]  # (y, g) -> one contribution per argument
    code: str = ""  # one scalar element in generated kernels; names from kernel_lib.KERNEL_FUNCTIONS


def _sigmoid(x):
    # exp of -|x| only, so neither branch overflows.
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e)).astype(x.dtype, copy=False)


def _softplus(x):
    return np.maximum(x, 0) + np.log1p(np.exp(-np.abs(x)))


def _softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _step(x):
    return (x > 0).astype(x.dtype) if isinstance(x, np.ndarray) else float(x > 0)


def _hard_sigmoid(x):
    return np.clip(HARD_SLOPE * x + 0.5, 0.0, 1.0)


def _x(y: Node) -> Node:
    return y.args[0]


OPS: dict[str, Op] = {
    # arithmetic
    "add": Op(np.add, lambda y, g: (g, g), "({0} + {1})"),
    "sub": Op(np.subtract, lambda y, g: (g, neg(g)), "({0} - {1})"),
    "mul": Op(np.multiply, lambda y, g: (mul(g, y.args[1]), mul(g, y.args[0])), "({0} * {1})"),
    "div": Op(np.divide, lambda y, g: (div(g, y.args[1]), neg(div(mul(g, y), y.args[1]))), "({0} / {1})"),
    "neg": Op(np.negative, lambda y, g: (neg(g),), "(-{0})"),
    "pow": Op(np.power, lambda y, g: (
        mul(g, mul(y.args[1], power(y.args[0], sub(y.args[1], ONE)))),
        None if y.args[1].op in ("const", "size") else mul(g, mul(ir.apply("log", y.args[0]), y))), "power({0}, {1})"),
    # elementwise functions
    "sigmoid": Op(_sigmoid, lambda y, g: (mul(g, mul(y, sub(ONE, y))),), "sigmoid({0})"),
    "tanh": Op(np.tanh, lambda y, g: (mul(g, sub(ONE, power(y, TWO))),), "tanh({0})"),
    "relu": Op(lambda x: np.maximum(x, 0), lambda y, g: (mul(g, ir.apply("step", _x(y))),), "relu({0})"),
    "exp": Op(np.exp, lambda y, g: (mul(g, y),), "exp({0})"),
    "log": Op(np.log, lambda y, g: (div(g, _x(y)),), "math.log({0})"),
    "softplus": Op(_softplus, lambda y, g: (mul(g, ir.apply("sigmoid", _x(y))),), "softplus({0})"),
    "hard_sigmoid": Op(_hard_sigmoid, lambda y, g: (mul(g, mul(const(HARD_SLOPE), ir.apply(
        "step", sub(const(HARD_EDGE), ir.apply("abs", _x(y)))))),), "hard_sigmoid({0})"),
    "abs": Op(np.abs, lambda y, g: (mul(g, ir.apply("sign", _x(y))),), "abs({0})"),
    "sqrt": Op(np.sqrt, lambda y, g: (div(mul(HALF, g), y),), "math.sqrt({0})"),
    "minimum": Op(np.minimum, lambda y, g: _pick(g, ir.apply("step", sub(y.args[1], y.args[0]))), "minimum({0}, {1})"),
    "maximum": Op(np.maximum, lambda y, g: _pick(g, ir.apply("step", sub(y.args[0], y.args[1]))), "maximum({0}, {1})"),
    # derivative helpers: piecewise constant, so no gradient of their own
    "step": Op(_step, lambda y, g: (None,), "step({0})"),
    "sign": Op(np.sign, lambda y, g: (None,), "sign({0})"),
    "eq": Op(lambda a, b: (a == b).astype(np.result_type(a, b)), lambda y, g: (None, None), "equal({0}, {1})"),
    # rows: reductions over the feature axis give one value per batch row
    "rsum": Op(lambda x: x.sum(axis=-1, keepdims=True), lambda y, g: (g,)),
    "rmean": Op(lambda x: x.mean(axis=-1, keepdims=True),
                lambda y, g: (div(g, ir.size(_x(y).shape[0])),)),
    "rmax": Op(lambda x: x.max(axis=-1, keepdims=True),
               lambda y, g: (mul(g, ir.apply("eq", _x(y), y)),)),
    "softmax": Op(_softmax, lambda y, g: (mul(y, sub(g, ir.reduce("rsum", mul(g, y)))),)),
    "bcast": Op(lambda x: x, lambda y, g: (ir.reduce("rsum", g),)),
    # matrix times vector; the matrix's own gradient (an outer product) is kept by grad.py
    "matvec": Op(lambda w, v: v @ w.T, lambda y, g: (None, ir.matvec_t(y.args[0], g))),
    "matvec_t": Op(lambda w, v: v @ w, lambda y, g: (None, None)),
}


def _pick(g: Node, first: Node) -> tuple[Node, Node]:
    """min/max: the gradient goes to the argument that was chosen (ties go to the second)."""
    return mul(g, first), mul(g, sub(ONE, first))
