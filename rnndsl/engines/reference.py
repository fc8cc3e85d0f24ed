"""The NumPy reference: interprets the forward and backward step IR over a whole sequence.

It is the oracle for the kernels' tests and for `rnndsl gradcheck`, never the fast path: it
walks the IR node by node at every step and recomputes the forward step during backward.
Arrays: per-step vectors are (B, n), per-row scalars (B, 1), parameters as they are.
Padding (`lengths`): past a sequence's length its states freeze and its outputs are zero, so
in backward its seeds are zero and the state adjoints pass through unchanged.
"""
from __future__ import annotations

import numpy as np

from rnndsl.symbolic import ir
from rnndsl.symbolic.grad import Backward
from rnndsl.symbolic.ir import Node, StepIR
from rnndsl.symbolic.ops import OPS


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
                vals[n.uid] = full(vals[n.args[0].uid], n.shape, sizes, batch, dtype)
            else:
                vals[n.uid] = OPS[n.op].numpy(*(vals[a.uid] for a in n.args))
        return vals


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
        live = (t < lengths)[:, None]
        for s, v in states.items():
            history[s][t] = v
            leaves[("prev", s)] = v
        for x, seq in xs.items():
            leaves[("input", x)] = seq[t]
        vals = ev.run(leaves, sizes, B, dtype)
        for o in step.outputs:
            outs[o][t] = np.where(live, full(vals[step.values[o].uid], step.shape_of(o), sizes,
                                             B, dtype), 0)
        for s in step.states:
            new = full(vals[step.values[s].uid], step.shape_of(s), sizes, B, dtype)
            states[s] = np.where(live, new, states[s])
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
        live = (t < lengths)[:, None]
        for s in step.states:
            leaves[("prev", s)] = history[s][t]
            seed = d_state[s] + (d_outputs[s][t] if s in d_outputs else 0)
            leaves[("adj", s)] = np.where(live, seed, 0)
        for o in bwd.seeds:
            if o not in step.states:
                leaves[("adj", o)] = np.where(live, d_outputs[o][t], 0)
        for x, seq in xs.items():
            leaves[("input", x)] = seq[t]
        vals = ev.run(leaves, sizes, B, dtype)
        for s in step.states:
            d_prev = full(vals[bwd.d_prev[s].uid], (step.states[s],), sizes, B, dtype)
            d_state[s] = np.where(live, d_prev, d_state[s])
        for x in xs:
            d_inputs[x][t] = full(vals[bwd.d_inputs[x].uid], (step.inputs[x],), sizes, B, dtype)
        for p, g in bwd.d_params.items():
            d_params[p] += _collapse(vals[g.uid], params[p].shape)
        for w, terms in bwd.d_matrices.items():
            for g, v in terms:
                d_params[w] += full(vals[g.uid], g.shape, sizes, B, dtype).T @ \
                    full(vals[v.uid], v.shape, sizes, B, dtype)
    return d_params, d_inputs, d_state


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
