"""The built-in cells as a practitioner writes them by hand, for the benchmarks' peers: the
weights of all gates stacked by rows (as torch.nn.LSTM stores them), the input products of
all gates hoisted into one matrix product over all T*B rows, the recurrent weights of all
gates in one product per step, the gates cut apart with `chunk`.

Each cell is written once against `ops`, the handful of functions the framework supplies
(rnndsl.peers gives PyTorch's, rnndsl.jax_peers JAX's); everything else is `@`, `*`, `+`.
The drivers (an eager loop, a compiled step, `lax.scan`) live with their framework. Imports
neither framework.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from rnndsl.compiler import analyse, builtin_specs


@dataclass(frozen=True)
class HandCell:
    """A cell written by hand. `stacks`: each of the hand-written cell's parameters -> the
    rnndsl parameters it stacks by rows, in order. `pre(ops, w, x)`: the input side of the
    step for rows x (T*B, input), hoisted out of the loop. `step(ops, w, x_t, state)`: the
    next state (a tuple of (B, hidden) arrays, h first; h is the output)."""

    spec: str
    stacks: dict[str, tuple[str, ...]]
    states: int
    pre: Callable
    step: Callable


def _lstm_step(ops, w, xt, state):
    h, c = state
    i, f, g, o = ops.chunk(xt + ops.linear(h, w["W_h"], w["b_h"]), 4)
    c = ops.sigmoid(f) * c + ops.sigmoid(i) * ops.tanh(g)
    return ops.sigmoid(o) * ops.tanh(c), c


def _gru_step(ops, w, xt, state):
    h, = state
    xr, xz, xn = ops.chunk(xt, 3)
    hr, hz, hn = ops.chunk(ops.linear(h, w["W_h"], w["b_h"]), 3)
    r = ops.sigmoid(xr + hr)
    z = ops.sigmoid(xz + hz)
    n = ops.tanh(xn + r * hn)
    return (1 - z) * n + z * h,


def _elman_step(ops, w, xt, state):
    h, = state
    return ops.tanh(xt + ops.linear(h, w["W_h"], w["b_h"])),


def _peephole_lstm_step(ops, w, xt, state):
    h, c = state
    i, f, g, o = ops.chunk(xt + ops.linear(h, w["W_h"]), 4)
    i = ops.sigmoid(i + w["w_ci"] * c)
    f = ops.sigmoid(f + w["w_cf"] * c)
    c = f * c + i * ops.tanh(g)
    return ops.sigmoid(o + w["w_co"] * c) * ops.tanh(c), c


def _indrnn_step(ops, w, xt, state):
    h, = state
    return ops.relu(xt + w["u"] * h),


def _layernorm_lstm_pre(ops, w, x):
    # LN(W_x x; a_x) + b needs nothing from the previous step: hoisted whole.
    return ops.layer_norm(ops.linear(x, w["W_x"]), w["a_x"], w["b"])


def _layernorm_lstm_step(ops, w, xt, state):
    h, c = state
    f, i, o, g = ops.chunk(xt + ops.layer_norm(ops.linear(h, w["W_h"]), w["a_h"]), 4)
    c = ops.sigmoid(f) * c + ops.sigmoid(i) * ops.tanh(g)
    return ops.sigmoid(o) * ops.tanh(ops.layer_norm(c, w["a_c"], w["b_c"])), c


def _mgu_step(ops, w, xt, state):
    h, = state
    xf, xh = ops.chunk(xt, 2)
    f = ops.sigmoid(xf + ops.linear(h, w["U_f"]))  # U_h multiplies f * h: a second product
    h_tilde = ops.tanh(xh + ops.linear(f * h, w["U_h"]))
    return (1 - f) * h + f * h_tilde,


def _input_product(ops, w, x):
    return ops.linear(x, w["W_x"], w["b_x"])


HAND_CELLS = {c.spec: c for c in [
    HandCell("lstm", {"W_x": ("W_ii", "W_if", "W_ig", "W_io"),
                      "b_x": ("b_ii", "b_if", "b_ig", "b_io"),
                      "W_h": ("W_hi", "W_hf", "W_hg", "W_ho"),
                      "b_h": ("b_hi", "b_hf", "b_hg", "b_ho")},
             2, _input_product, _lstm_step),
    HandCell("gru", {"W_x": ("W_ir", "W_iz", "W_in"), "b_x": ("b_ir", "b_iz", "b_in"),
                     "W_h": ("W_hr", "W_hz", "W_hn"), "b_h": ("b_hr", "b_hz", "b_hn")},
             1, _input_product, _gru_step),
    HandCell("elman", {"W_x": ("W_ih",), "b_x": ("b_ih",), "W_h": ("W_hh",), "b_h": ("b_hh",)},
             1, _input_product, _elman_step),
    HandCell("peephole_lstm", {"W_x": ("W_ii", "W_if", "W_ig", "W_io"),
                               "b_x": ("b_i", "b_f", "b_g", "b_o"),
                               "W_h": ("W_hi", "W_hf", "W_hg", "W_ho"),
                               "w_ci": ("w_ci",), "w_cf": ("w_cf",), "w_co": ("w_co",)},
             2, _input_product, _peephole_lstm_step),
    HandCell("indrnn", {"W_x": ("W",), "b_x": ("b",), "u": ("u",)},
             1, _input_product, _indrnn_step),
    HandCell("layernorm_lstm", {"W_x": ("W_xf", "W_xi", "W_xo", "W_xg"),
                                "a_x": ("a_xf", "a_xi", "a_xo", "a_xg"),
                                "b": ("b_f", "b_i", "b_o", "b_g"),
                                "W_h": ("W_hf", "W_hi", "W_ho", "W_hg"),
                                "a_h": ("a_hf", "a_hi", "a_ho", "a_hg"),
                                "a_c": ("a_c",), "b_c": ("b_c",)},
             2, _layernorm_lstm_pre, _layernorm_lstm_step),
    HandCell("mgu", {"W_x": ("W_f", "W_h"), "b_x": ("b_f", "b_h"),
                     "U_f": ("U_f",), "U_h": ("U_h",)},
             1, _input_product, _mgu_step),
]}


def hand_cell(cell) -> HandCell | None:
    """The hand-written peer of a compiled cell: only when the cell is a built-in spec whose
    equations are unchanged (a user's spec named 'lstm' with other equations has none)."""
    hand = HAND_CELLS.get(cell.name)
    if hand is None:
        return None
    builtin, _ = analyse(builtin_specs()[cell.name])
    return hand if _signature(builtin) == _signature(cell.step) else None


def _signature(step) -> tuple:
    return (step.equations(), step.inputs, step.states, step.outputs,
            {p: info.shape for p, info in step.params.items()})


def stack(hand: HandCell, params: dict, concat) -> dict:
    """The hand-written cell's parameters from rnndsl's (`concat` joins arrays by rows)."""
    return {name: concat([params[p] for p in parts]) for name, parts in hand.stacks.items()}


def unstack(hand: HandCell, grads: dict, params: dict) -> dict:
    """Gradients of the stacked parameters -> gradients by rnndsl's names (rows cut by the
    shapes of `params`)."""
    out = {}
    for name, parts in hand.stacks.items():
        row = 0
        for p in parts:
            n = params[p].shape[0]
            out[p] = grads[name][row:row + n]
            row += n
    return out
