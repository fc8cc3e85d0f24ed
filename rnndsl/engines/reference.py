"""The NumPy reference: interprets the forward and backward step IR over a whole sequence.

It is the oracle for the kernels' tests and for `rnndsl gradcheck`, never the fast path: it
walks the IR node by node at every step and recomputes the forward step during backward.
Arrays: per-step vectors are (B, n), per-row scalars (B, 1), matrices (B, r, c), parameters
as they are. A matrix is always held whole, so that every rule sees its full shape.
Padding (`lengths`): past a sequence's length its states freeze and its outputs are zero, so
in backward its seeds are zero and the state adjoints pass through unchanged; nothing a padded
step computes reaches a gradient (a key normalised by its norm is 0 / 0 on zero padding).
"""
from __future__ import annotations

import contextlib

import numpy as np

from rnndsl.language.spec import state_shape
from rnndsl.symbolic import ir
from rnndsl.symbolic.grad import Backward
from rnndsl.symbolic.ir import Node, StepIR
from rnndsl.symbolic.ops import OPS, block_diagonal


class Evaluator:
    """Evaluates a fixed set of roots, given the leaves' values, in one topological sweep."""

    def __init__(self, roots: list[Node]):
        self.order = ir.topo_order(roots)

    def run(self, leaves: dict, sizes: dict[str, int], batch: int, dtype) -> dict[int, object]:
        vals: dict[int, object] = {}
        for n in self.order:
            if n.op in ("input", "prev", "param", "adj"):
                vals[n.uid] = leaves[(n.op, n.attr)]
            elif n.op == "const":
                vals[n.uid] = dtype.type(n.attr)
            elif n.op == "size":
                vals[n.uid] = dtype.type(sizes[n.attr])
            elif n.op == "bcast":
                vals[n.uid] = full(_rank(vals[n.args[0].uid], n.args[0], n), n.shape, sizes,
                                   batch, dtype)
            else:
                args = [_rank(vals[a.uid], a, n) for a in n.args]
                value = OPS[n.op].numpy(*args, *([] if n.attr is None else [n.attr]))
                if len(n.shape) == 2:
                    lead = (batch,) if n.batched else ()
                    value = np.broadcast_to(value, (*lead, *(sizes[s] for s in n.shape)))
                vals[n.uid] = value
        return vals


def _rank(value, arg: Node, user: Node):
    """A per-row scalar (B, 1) as (B, 1, 1) where a matrix uses it, so it broadcasts per row."""
    if len(user.shape) == 2 and arg.batched and arg.shape == ():
        return np.reshape(value, (-1, 1, 1))
    return value


def _quiet_if_padded(t: int, lengths):
    """No NumPy warnings at a step where some sequence has ended: its padded rows may divide
    by zero (a key normalised on zero padding) and are thrown away."""
    if (t < lengths).all():
        return contextlib.nullcontext()
    return np.errstate(divide="ignore", invalid="ignore")


def _live(t: int, lengths, ndim: int) -> np.ndarray:
    """Which sequences still run at step t, shaped to mask arrays of `ndim` dimensions."""
    return (t < lengths).reshape(-1, *(1,) * (ndim - 1))


def full(value, shape: tuple[str, ...], sizes: dict[str, int], batch: int, dtype) -> np.ndarray:
    """A value as a writable (B, *shape) array, whatever broadcastable form it was computed in."""
    target = (batch, *(sizes[s] for s in shape)) if shape else (batch, 1)
    return np.array(np.broadcast_to(np.asarray(value, dtype=dtype), target))


def forward(step: StepIR, params: dict, xs: dict, state0: dict, lengths, sizes: dict, dtype):
    """Returns (outputs {name: (T, B, n)}, final states {name: (B, n)}, states before each step
    {name: (T, B, n)})."""
    T, B = next(iter(xs.values())).shape[:2]
    ev = Evaluator(step.roots())
    leaves = {("param", p): v for p, v in params.items()}
    states = {s: np.array(v, dtype=dtype) for s, v in state0.items()}
    outs = {o: np.zeros((T, B, *_dims(step.shape_of(o), sizes, 1)), dtype) for o in step.outputs}
    history = {s: np.zeros((T, *v.shape), dtype) for s, v in states.items()}
    for t in range(T):
        for s, v in states.items():
            history[s][t] = v
            leaves[("prev", s)] = v
        for x, seq in xs.items():
            leaves[("input", x)] = seq[t]
        with _quiet_if_padded(t, lengths):
            vals = ev.run(leaves, sizes, B, dtype)
        for o in step.outputs:
            out = full(vals[step.values[o].uid], step.shape_of(o), sizes, B, dtype)
            outs[o][t] = np.where(_live(t, lengths, out.ndim), out, 0)
        for s in step.states:
            new = full(vals[step.values[s].uid], step.shape_of(s), sizes, B, dtype)
            states[s] = np.where(_live(t, lengths, new.ndim), new, states[s])
    return outs, states, history


def backward(bwd: Backward, params: dict, xs: dict, history: dict, lengths, d_outputs: dict,
             d_final: dict, sizes: dict, dtype):
    """Gradients (params, inputs, initial states) of a loss whose gradient with respect to each
    output sequence is `d_outputs[name]` and to each final state `d_final[name]`."""
    step = bwd.forward
    T, B = next(iter(xs.values())).shape[:2]
    ev = Evaluator(bwd.roots())
    leaves = {("param", p): v for p, v in params.items()}
    d_state = {s: np.array(d_final[s], dtype=dtype) for s in step.states}
    d_params = {p: np.zeros_like(v) for p, v in params.items()}
    d_inputs = {x: np.zeros_like(seq) for x, seq in xs.items()}
    for t in reversed(range(T)):
        for s in step.states:
            leaves[("prev", s)] = history[s][t]
            seed = d_state[s] + (d_outputs[s][t] if s in d_outputs else 0)
            leaves[("adj", s)] = np.where(_live(t, lengths, seed.ndim), seed, 0)
        for o in bwd.seeds:
            if o not in step.states:
                seed = d_outputs[o][t]
                leaves[("adj", o)] = np.where(_live(t, lengths, seed.ndim), seed, 0)
        for x, seq in xs.items():
            leaves[("input", x)] = seq[t]
        with _quiet_if_padded(t, lengths):
            vals = ev.run(leaves, sizes, B, dtype)
        for s in step.states:
            d_prev = full(vals[bwd.d_prev[s].uid], state_shape(step.states[s]), sizes, B, dtype)
            d_state[s] = np.where(_live(t, lengths, d_prev.ndim), d_prev, d_state[s])
        live = t < lengths
        for x in xs:
            d_x = full(vals[bwd.d_inputs[x].uid], (step.inputs[x],), sizes, B, dtype)
            d_inputs[x][t] = _rows(d_x, live)
        for p, g in bwd.d_params.items():
            d_params[p] += _collapse(_rows(vals[g.uid], live), params[p].shape)
        for w, terms in bwd.d_matrices.items():
            for g, v in terms:
                d_params[w] += block_diagonal(
                    _rows(full(vals[g.uid], g.shape, sizes, B, dtype), live).T @
                    full(vals[v.uid], v.shape, sizes, B, dtype), step.params[w].blocks)
    return d_params, d_inputs, d_state


def _rows(value, live: np.ndarray):
    """A per-row value with the rows of padded steps zero (a (B, ...) array; anything that is
    the same for every row is left as it is)."""
    if np.ndim(value) == 0 or np.shape(value)[0] != live.shape[0]:
        return value
    return np.where(live.reshape(-1, *(1,) * (np.ndim(value) - 1)), value, 0)


def _collapse(value, shape: tuple[int, ...]) -> np.ndarray:
    """Sum a per-row contribution over the batch (and features, for a scalar parameter)."""
    value = np.asarray(value)
    while value.ndim > len(shape):
        value = value.sum(axis=0)
    if shape == ():
        return value.sum()
    return np.broadcast_to(value, shape) if value.shape != shape else value


def _dims(shape: tuple[str, ...], sizes: dict[str, int], scalar: int) -> tuple[int, ...]:
    return tuple(sizes[s] for s in shape) if shape else (scalar,)
