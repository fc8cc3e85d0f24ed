"""Running two engines of the same cell on one random problem and comparing every array they
return: outputs, final states, and the gradients of parameters, inputs and initial states."""
from __future__ import annotations

import os

import numpy as np

from rnndsl.language.spec import state_shape


def long_checks() -> bool:
    """Whether the long checks run too (pytest --long; tests/conftest.py)."""
    return os.environ.get("RNNDSL_LONG_CHECKS") == "1"


def relative(a, b, floor: float = 1e-30) -> float:
    """max |a - b| / max(max |b|, floor); NaN where they disagree on NaN or inf.
    `floor` keeps an array that cancels to nearly zero in the reference from turning rounding
    noise into a large relative error."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if not np.array_equal(np.isfinite(a), np.isfinite(b)) or \
            not np.array_equal(a[~np.isfinite(a)], b[~np.isfinite(b)], equal_nan=True):
        return float("nan")
    a, b = np.where(np.isfinite(a), a, 0.0), np.where(np.isfinite(b), b, 0.0)
    scale = max(np.abs(b).max(initial=0.0), floor)
    return float(np.abs(a - b).max(initial=0.0) / scale)


# States that are weightings over memory slots (nonnegative), by cell: the NTM sharpens them
# with a power, w ** gamma, which is NaN for a negative weight.
WEIGHTINGS = {"ntm": ("w_read", "w_write")}
# The share of an initial weighting's sum that tests give it: the NTM's learned start weighting
# makes up the rest, relu(1 - sum). At a sum of exactly 1 the relu sits on its kink, where the
# rounding of the sum decides the derivative (and finite differences straddle it), and the
# start weighting's gradient is rounding noise.
WEIGHTING_SUM = 0.75


# A memory whose number of slots only its states show (the built-in ntm's start weightings have
# it), starting at zero: forward must be told the slots.
SLOTS_SHOWN_BY_STATES_ONLY = """name: slotted
sizes: [input, hidden, slots]
inputs: {x: input}
states: {M: [slots, hidden], w: slots}
outputs: [y]
equations: |
  v = tanh(W @ x)
  M = M_prev + outer(w_prev, v)
  w = softmax(M @ v)
  y = M.T @ w + v
"""


def as_weightings(cell, state0: dict) -> dict:
    """`state0` with the cell's weightings (WEIGHTINGS) made by a softmax times WEIGHTING_SUM."""
    for s in WEIGHTINGS.get(cell.name, ()):
        e = np.exp(state0[s])
        state0[s] = WEIGHTING_SUM * e / e.sum(-1, keepdims=True)
    return state0


def problem(cell, T: int, B: int, seed: int, first_size: int = 3, step: int = 2):
    """Parameters, inputs and initial states in float64; sizes differ so mixups show. The
    initial weightings of a cell with some (WEIGHTINGS) are as as_weightings makes them."""
    rng = np.random.default_rng(seed)
    sizes = {s: first_size + step * k for k, s in enumerate(cell.sizes)}
    params = cell.init_params(seed=seed, dtype=np.float64, **sizes)
    params = {p: v + 0.1 * rng.standard_normal(v.shape) for p, v in params.items()}
    xs = {x: rng.standard_normal((T, B, sizes[n])) for x, n in cell.inputs.items()}
    shapes = {s: tuple(sizes[d] for d in state_shape(n)) or (1,)  # a scalar state: (B, 1)
              for s, n in cell.states.items()}
    state0 = {s: 0.5 * rng.standard_normal((B, *shape)) for s, shape in shapes.items()}
    return params, xs, as_weightings(cell, state0)


def differences(cell, ref, T: int, B: int, lengths=None, dtype=np.float64, seed: int = 0,
                problem_args: tuple = (), floor: float = 1e-30) -> dict[str, float]:
    """Relative difference of every array `cell` returns from what `ref` (run in float64 on
    exactly the values `cell` sees) returns."""
    params, xs, state0 = problem(ref, T, B, seed, *problem_args)
    cast = lambda d: {k: np.asarray(v).astype(dtype) for k, v in d.items()}  # noqa: E731
    up = lambda d: {k: np.asarray(v).astype(np.float64) for k, v in d.items()}  # noqa: E731
    p, x, s = cast(params), cast(xs), cast(state0)
    f_ref = ref.forward(up(p), up(x), up(s), lengths)
    f_dev = cell.forward(p, x, s, lengths)
    out = {}
    for o in f_ref.outputs:
        assert f_dev.outputs[o].dtype == dtype
        out[f"output {o}"] = relative(_host(f_dev.outputs[o]), f_ref.outputs[o], floor)
    for k in f_ref.states:
        out[f"state {k}"] = relative(_host(f_dev.states[k]), f_ref.states[k], floor)
    rng = np.random.default_rng(seed + 1)
    d_out = {o: rng.standard_normal(v.shape) for o, v in f_ref.outputs.items()}
    d_fin = {k: rng.standard_normal(v.shape) for k, v in f_ref.states.items()}
    g_ref = ref.backward(up(p), f_ref, d_out, d_fin)
    g_dev = cell.backward(p, f_dev, cast(d_out), cast(d_fin))
    for group in ("params", "inputs", "state0"):
        want, got = getattr(g_ref, group), getattr(g_dev, group)
        assert set(want) == set(got), group
        for k in want:
            assert np.shape(got[k]) == np.shape(want[k]), (group, k)
            out[f"d {group} {k}"] = relative(_host(got[k]), want[k], floor)
    return out


def _host(a):
    """A device array's host copy (the CUDA engine may return device arrays)."""
    return a.copy_to_host() if hasattr(a, "copy_to_host") else a
