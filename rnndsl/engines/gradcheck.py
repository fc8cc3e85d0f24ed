"""Finite differences against the derived gradients, for every parameter, input and state."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rnndsl.engines.cell import Cell
from rnndsl.language.spec import state_shape


@dataclass(frozen=True)
class GradcheckResult:
    errors: dict[str, float]  # array name -> relative error (max |a - n| / max(|a|, |n|))

    @property
    def worst(self) -> tuple[str, float]:
        return max(self.errors.items(), key=lambda kv: kv[1])


def gradcheck(cell: Cell, T: int = 4, B: int = 3, size: int = 3, seed: int = 0,
              eps: float = 1e-6, lengths=None, progress=None, params: dict | None = None,
              xs: dict | None = None, state0: dict | None = None) -> GradcheckResult:
    """Compare `cell.backward` with central differences of the loss
    L = sum(R * outputs) + sum(S * final states), R and S random, in float64.

    Parameters, inputs and initial states are random unless given (a cell whose states have
    a restricted domain needs chosen values: the NTM's weightings are distributions, and a
    negative weight sharpened by a power is NaN); given arrays fix the sizes, and T and B are
    read off the inputs."""
    rng = np.random.default_rng(seed)
    sizes = {s: size + k for k, s in enumerate(cell.sizes)}  # distinct, so mixups show
    if params is None:
        params = cell.init_params(seed=seed, dtype=np.float64, **sizes)
        params = {p: v + 0.1 * rng.standard_normal(v.shape) for p, v in params.items()}
    if xs is None:
        xs = {x: rng.standard_normal((T, B, sizes[n])) for x, n in cell.inputs.items()}
    if state0 is None:
        B = next(iter(xs.values())).shape[1]
        state0 = {s: 0.5 * rng.standard_normal((B, *(tuple(sizes[d] for d in state_shape(n))
                                                     or (1,))))  # a scalar state: (B, 1)
                  for s, n in cell.states.items()}
    # own float64 arrays (a 0-d parameter too, which arithmetic turns into a NumPy scalar):
    # the perturbations below write into them
    params, xs, state0 = ({k: np.array(v, dtype=np.float64) for k, v in group.items()}
                          for group in (params, xs, state0))
    fwd = cell.forward(params, xs, state0, lengths)
    r = {o: rng.standard_normal(v.shape) for o, v in fwd.outputs.items()}
    s_w = {s: rng.standard_normal(v.shape) for s, v in fwd.states.items()}

    def loss(params, xs, state0) -> float:
        f = cell.forward(params, xs, state0, lengths)
        return sum(float((r[o] * f.outputs[o]).sum()) for o in r) + \
            sum(float((s_w[s] * f.states[s]).sum()) for s in s_w)

    grads = cell.backward(params, fwd, r, s_w)
    groups = [("param", params, grads.params), ("input", xs, grads.inputs),
              ("state0", state0, grads.state0)]
    return _compare(groups, lambda: loss(params, xs, state0), eps, progress)


def tree_gradcheck(cell, size: int = 3, seed: int = 0, eps: float = 1e-6,
                   progress=None) -> GradcheckResult:
    """`gradcheck` for a TreeCell, over a fixed batch of three small trees of several shapes
    (a lone leaf, a full one, a lopsided one; up to three children where the cell takes any
    number), with inputs on every node; L = sum(R * outputs), float64."""
    from rnndsl.engines.tree import TreeBatch

    rng = np.random.default_rng(seed)
    sizes = {s: size + k for k, s in enumerate(cell.sizes)}
    params = cell.init_params(seed=seed, dtype=np.float64, **sizes)
    params = {p: np.array(v + 0.1 * rng.standard_normal(v.shape)) for p, v in params.items()}
    parents = [[-1], [-1, 0, 0, 1, 1, 2, 2], [-1, 0, 1, 1, 0, 4]]
    if cell.arity is None:
        parents[2] = [-1, 0, 0, 0, 1, 1, 1, 2]
    width = sizes[next(iter(cell.inputs.values()))]
    batch = TreeBatch.from_parents(parents, [rng.standard_normal((len(p), width))
                                             for p in parents])
    fwd = cell.forward(params, batch)
    r = {o: rng.standard_normal(v.shape) for o, v in fwd.outputs.items()}

    def loss() -> float:
        f = cell.forward(params, batch)
        return sum(float((r[o] * f.outputs[o]).sum()) for o in r)

    grads = cell.backward(params, fwd, r)
    groups = [("param", params, grads.params),
              ("input", {next(iter(cell.inputs)): batch.inputs}, grads.inputs)]
    return _compare(groups, loss, eps, progress)


def _compare(groups, loss, eps: float, progress) -> GradcheckResult:
    """Central differences of `loss()` for every element of every array of `groups`
    ((kind, {name: array}, {name: derived gradient})), perturbed in place."""
    errors = {}
    for kind, arrays, derived in groups:
        for name, arr in arrays.items():
            numeric = np.zeros_like(arr)
            flat, out = arr.reshape(-1), numeric.reshape(-1)
            for k in range(flat.size):
                keep = flat[k]
                flat[k] = keep + eps
                up = loss()
                flat[k] = keep - eps
                down = loss()
                flat[k] = keep
                out[k] = (up - down) / (2 * eps)
            a = np.asarray(derived[name])
            scale = max(np.abs(a).max(initial=0.0), np.abs(numeric).max(initial=0.0), 1e-12)
            errors[f"{kind} {name}"] = float(np.abs(a - numeric).max(initial=0.0) / scale)
            if progress is not None:
                progress(f"{kind} {name}")
    return GradcheckResult(errors)
