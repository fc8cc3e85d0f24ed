"""Optimisers, learning-rate schedules, gradient clipping and divergence checks on dicts of
NumPy arrays.

Parameters and gradients are dicts name -> array; optimisers update the parameter arrays in
place, so layers holding references to them see the new values. An optimiser's state is a
flat dict of arrays (np.savez can store it) from which a fresh optimiser continues exactly
where the saved one stopped.

An update is one compiled pass over all parameters at once: the gradients are gathered into
one flat buffer, their global norm is taken there, and clipping (by norm and by value), weight
decay and the update itself run fused in a single loop, in float64 arithmetic on values stored
in the parameters' dtype. Parameters made by `flatten` are views of one buffer, which the pass
updates directly; any other dict is gathered into a scratch buffer and written back.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit


# -- flat buffers -------------------------------------------------------------------------------
class _Layout:
    """Where each named array lies in one flat buffer: names, shapes and offsets, in order."""

    def __init__(self, arrays: dict[str, np.ndarray]):
        self.names = tuple(arrays)
        self.shapes = tuple(np.shape(a) for a in arrays.values())
        self.dtype = np.result_type(*arrays.values())
        sizes = [math.prod(s) for s in self.shapes]
        self.offsets = tuple(np.concatenate([[0], np.cumsum(sizes)]).astype(int).tolist())
        self.size = self.offsets[-1]

    def fits(self, arrays: dict) -> bool:
        return tuple(arrays) == self.names and all(
            np.shape(a) == s for a, s in zip(arrays.values(), self.shapes))

    def views(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        return {name: flat[lo:hi].reshape(shape) for name, shape, lo, hi in
                zip(self.names, self.shapes, self.offsets, self.offsets[1:])}

    def gather(self, arrays: dict, out: np.ndarray) -> np.ndarray:
        for a, lo, hi in zip(arrays.values(), self.offsets, self.offsets[1:]):
            out[lo:hi] = np.ravel(a)
        return out

    def scatter(self, flat: np.ndarray, arrays: dict) -> None:
        for a, shape, lo, hi in zip(arrays.values(), self.shapes, self.offsets, self.offsets[1:]):
            a[...] = flat[lo:hi].reshape(shape)

    def base_of(self, arrays: dict) -> np.ndarray | None:
        """The flat buffer these arrays are consecutive views of, in this order; else None."""
        first = next(iter(arrays.values()), None)
        base = getattr(first, "base", None)
        if not (isinstance(base, np.ndarray) and base.ndim == 1 and base.size == self.size
                and base.flags.c_contiguous and base.dtype == self.dtype):
            return None
        start, step = base.ctypes.data, base.itemsize
        for a, lo in zip(arrays.values(), self.offsets):
            if a.base is not base or not a.flags.c_contiguous or \
                    a.ctypes.data != start + lo * step:
                return None
        return base


def flatten(params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The same parameters (copied) as views of one contiguous buffer, in the same order: the
    optimisers update such a dict in one pass, without gathering and scattering it."""
    layout = _Layout(params)
    return layout.views(layout.gather(params, np.empty(layout.size, layout.dtype)))


# -- the compiled passes ------------------------------------------------------------------------
@njit(cache=True, fastmath=True)  # the order of the sum is free: it vectorises
def _square_sum(g):
    total = 0.0
    for i in range(g.size):
        total += float(g[i]) * float(g[i])
    return total


# NumPy's error model: Python's checks every division for zero, a branch per entry that kept
# the update loops from vectorising (Adam over 75,000 float32 parameters: 299 -> 66 us, the
# results identical to the bit). eps = 0 with a zero second moment now gives NaN, as torch's
# Adam does, instead of raising ZeroDivisionError in the middle of a run.
@njit(cache=True, error_model="numpy")
def _clipped(g, scale, limit):
    """A gradient entry scaled by the global-norm clip, then clamped to [-limit, limit]
    (limit 0: no clamp)."""
    value = float(g) * scale
    if limit > 0:
        value = min(max(value, -limit), limit)
    return value


@njit(cache=True, error_model="numpy")
def _sgd_pass(p, g, velocity, lr, momentum, scale, limit):
    for i in range(p.size):
        d = _clipped(g[i], scale, limit)
        if momentum > 0:
            d = momentum * float(velocity[i]) + d
            velocity[i] = d
        p[i] = float(p[i]) - lr * d


@njit(cache=True, error_model="numpy")
def _adam_pass(p, g, m, v, lr, b1, b2, correct1, correct2, eps, decay, scale, limit):
    # AdamW's decay shrinks the weight apart from the gradient (Loshchilov & Hutter 2019);
    # 1 without decay. The bias corrections are folded as torch.optim.Adam folds them: one
    # division and one square root per entry.
    shrink, step, root = 1.0 - lr * decay, lr / correct1, 1.0 / math.sqrt(correct2)
    for i in range(p.size):
        d = _clipped(g[i], scale, limit)
        m_i = b1 * float(m[i]) + (1.0 - b1) * d
        v_i = b2 * float(v[i]) + (1.0 - b2) * d * d
        m[i], v[i] = m_i, v_i
        p[i] = float(p[i]) * shrink - step * m_i / (math.sqrt(v_i) * root + eps)


def load_passes(dtype) -> None:
    """Compile the passes for parameters of `dtype` (or load them from Numba's cache) now, so
    that the first step of a timed run does not pay for it."""
    empty = np.zeros(0, dtype)
    _square_sum(empty)
    _sgd_pass(empty, empty, empty, 0.1, 0.0, 1.0, 0.0)
    _adam_pass(empty, empty, empty, empty, 0.1, 0.9, 0.999, 0.1, 0.001, 1e-8, 0.0, 1.0, 0.0)


# -- optimisers ---------------------------------------------------------------------------------
class _Optimizer:
    _BUFFERS: tuple[str, ...] = ()  # per-parameter state, saved as "<buffer>/<param name>"

    def __init__(self, lr: float):
        self.lr = _lr(lr)
        self._state = {b: {} for b in self._BUFFERS}
        self._layout: _Layout | None = None  # of the parameters that have gradients
        self._flat: dict[str, np.ndarray] = {}  # "grad", "param" scratch and each buffer

    def step(self, params: dict[str, np.ndarray], grads: dict[str, np.ndarray],
             lr: float | None = None, clip_norm: float | None = None,
             clip_value: float | None = None) -> float:
        """Update the parameters that have a gradient, in place, at learning rate `lr` (the
        optimiser's own when None), after scaling the gradients by clip_norm/norm when their
        global norm exceeds `clip_norm` and clamping them to [-clip_value, clip_value]; the
        gradients themselves are left as they are. Returns the global norm before clipping;
        when it is not finite nothing is updated (`check_finite` names the culprit)."""
        live = {name: p for name, p in params.items() if name in grads}
        layout = self._prepare(live)
        g = layout.gather({name: grads[name] for name in live}, self._flat["grad"])
        norm = math.sqrt(_square_sum(g))
        if not math.isfinite(norm):
            return norm
        scale = clip_norm / norm if clip_norm and norm > clip_norm else 1.0
        p = layout.base_of(live)
        if p is None:
            p = layout.gather(live, self._flat["param"])
        self._update(p, g, self.lr if lr is None else _lr(lr), scale, float(clip_value or 0.0))
        if p is not layout.base_of(live):
            layout.scatter(p, live)
        return norm

    def _update(self, p, g, lr, scale, limit) -> None:
        raise NotImplementedError

    def _prepare(self, live: dict) -> _Layout:
        """The flat buffers for these parameters, made once and kept while they stay the same;
        each buffer's per-parameter arrays in `_state` become views of its flat one."""
        if self._layout is not None and self._layout.fits(live):
            return self._layout
        layout = self._layout = _Layout(live)
        self._flat = {"grad": np.empty(layout.size, layout.dtype),
                      "param": np.empty(layout.size, layout.dtype)}
        for kind, bufs in self._state.items():
            flat = np.zeros(layout.size, layout.dtype)
            views = layout.views(flat)
            for name, view in views.items():
                if name in bufs:
                    view[...] = bufs[name]
            bufs.update(views)
            self._flat[kind] = flat
        return layout

    def state_dict(self) -> dict[str, np.ndarray]:
        return {f"{kind}/{name}": buf.copy()
                for kind, bufs in self._state.items() for name, buf in bufs.items()}

    def load_state_dict(self, d, params: dict | None = None) -> None:
        """Take the state from `state_dict()` or from np.load of an .npz file holding it.
        With `params`, every buffer must belong to one of them and have its shape; the
        state is replaced only when all of it is sound."""
        state = {b: {} for b in self._BUFFERS}
        for key in d.keys():
            kind, sep, name = key.partition("/")
            if not (sep and kind in state):
                raise ValueError(f"{type(self).__name__}: unexpected state entry {key!r}")
            buf = np.array(d[key])
            if params is not None:
                if name not in params:
                    raise ValueError(f"{key!r} belongs to no parameter")
                if buf.shape != params[name].shape or not np.isfinite(buf).all():
                    raise ValueError(f"{key!r} has shape {buf.shape} or values that do not fit "
                                     f"the parameter (shape {params[name].shape})")
            state[kind][name] = buf
        self._state, self._layout = state, None


def _lr(lr) -> float:
    """A learning rate must be a positive finite number (a negative one ascends the loss)."""
    value = float(lr)
    if not (np.isfinite(value) and value > 0):
        raise ValueError(f"the learning rate must be a positive number, got {lr}")
    return value


class SGD(_Optimizer):
    """Stochastic gradient descent with heavy-ball momentum in PyTorch's form
    (v <- momentum * v + g; p <- p - lr * v), Polyak 1964; plain SGD when momentum is 0."""
    _BUFFERS = ("velocity",)

    def __init__(self, lr: float = 0.1, momentum: float = 0.0):
        self.momentum = float(momentum)
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self._BUFFERS = ("velocity",) if self.momentum else ()  # plain SGD keeps no state
        super().__init__(lr)

    def _update(self, p, g, lr, scale, limit) -> None:
        _sgd_pass(p, g, self._flat.get("velocity", p), lr, self.momentum, scale, limit)


class Adam(_Optimizer):
    """Adam with bias correction (Kingma & Ba 2015, Algorithm 1); with `weight_decay`, AdamW
    (Loshchilov & Hutter 2019): every step first shrinks each weight by lr * weight_decay,
    apart from the gradient, as torch.optim.AdamW."""
    _BUFFERS = ("m", "v")

    def __init__(self, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0):
        super().__init__(lr)
        self.eps, self.weight_decay = float(eps), float(weight_decay)
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"weight decay must be a number >= 0, got {weight_decay}")
        self.betas = (float(betas[0]), float(betas[1]))
        self.t = 0  # steps taken; the bias correction depends on it

    def _update(self, p, g, lr, scale, limit) -> None:
        self.t += 1
        b1, b2 = self.betas
        _adam_pass(p, g, self._flat["m"], self._flat["v"], lr, b1, b2, 1 - b1 ** self.t,
                   1 - b2 ** self.t, self.eps, self.weight_decay, scale, limit)

    def state_dict(self) -> dict[str, np.ndarray]:
        return {**super().state_dict(), "t": np.array(self.t, dtype=np.int64)}

    def load_state_dict(self, d, params: dict | None = None) -> None:
        d = dict(d)
        if "t" not in d:
            raise ValueError("Adam: the state has no step count 't'")
        t = np.asarray(d.pop("t"))
        if t.shape != () or t.dtype.kind not in "iu" or t < 0:
            raise ValueError(f"Adam: the step count 't' must be a whole number >= 0, got {t}")
        super().load_state_dict(d, params)
        self.t = int(t)


OPTIMIZERS = ("sgd", "adam", "adamw")
DEFAULT_WEIGHT_DECAY = 0.01  # adamw's, as torch.optim.AdamW's


def make_optimizer(name: str, lr: float | None = None, momentum: float = 0.0,
                   weight_decay: float | None = None):
    """"sgd" (default lr 0.1, optional momentum), "adam" (default lr 1e-3) or "adamw" (Adam
    with decoupled weight decay, default lr 1e-3 and weight decay 0.01)."""
    key = name.lower()
    if key not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose {', '.join(OPTIMIZERS)}")
    if momentum and key != "sgd":
        raise ValueError("momentum applies to sgd only (adam keeps its own moment estimates)")
    if weight_decay is not None and key != "adamw":
        raise ValueError("weight decay applies to adamw only")
    if key == "sgd":
        return SGD(0.1 if lr is None else lr, momentum)
    decay = (DEFAULT_WEIGHT_DECAY if weight_decay is None else weight_decay) \
        if key == "adamw" else 0.0
    return Adam(1e-3 if lr is None else lr, weight_decay=decay)


# -- learning-rate schedules --------------------------------------------------------------------
SCHEDULES = ("constant", "warmup", "cosine")


class Schedule:
    """The factor on the learning rate at each step (0-based), over a run of `steps` steps:

    constant  1 at every step.
    warmup    (t + 1) / (warmup + 1) for the first `warmup` steps, then 1: a linear ramp, as
              torch.optim.lr_scheduler.LinearLR(start_factor=1 / (warmup + 1),
              total_iters=warmup).
    cosine    the same warm-up, then half a cosine from 1 down to 0 at step `steps`:
              (1 + cos(pi (t - warmup) / (steps - warmup))) / 2, as CosineAnnealingLR(T_max=
              steps - warmup) after the warm-up (Loshchilov & Hutter 2017, without restarts).

    It depends on the step alone, so a resumed run continues it where it stopped."""

    def __init__(self, kind: str = "constant", warmup: int = 0, steps: int = 1):
        if kind not in SCHEDULES:
            raise ValueError(f"unknown schedule {kind!r}; choose {', '.join(SCHEDULES)}")
        if kind == "constant" and warmup:
            raise ValueError("warmup applies to the warmup and cosine schedules")
        if kind == "cosine" and not 0 <= warmup < steps:
            raise ValueError(f"the cosine schedule needs 0 <= warmup < steps, got warmup "
                             f"{warmup} for {steps} steps")
        if warmup < 0:
            raise ValueError(f"warmup must be a whole number >= 0, got {warmup}")
        self.kind, self.warmup, self.steps = kind, int(warmup), int(steps)

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / (self.warmup + 1)
        if self.kind == "cosine":
            return (1 + math.cos(math.pi * (step - self.warmup) / (self.steps - self.warmup))) / 2
        return 1.0


# -- clipping and divergence (for code that steps without the fused pass) ---------------------
def global_norm(grads: dict[str, np.ndarray]) -> float:
    """sqrt of the sum of squares of every gradient entry, taken as one vector."""
    return float(np.sqrt(sum(np.sum(np.square(g, dtype=np.float64)) for g in grads.values())))


def clip_global_norm(grads: dict[str, np.ndarray], threshold: float) -> float:
    """Scale all gradients by threshold/norm when their global norm exceeds `threshold`
    (Pascanu, Mikolov & Bengio 2013), in place; returns the norm before clipping."""
    norm = global_norm(grads)
    if norm > threshold:
        scale = threshold / norm
        for g in grads.values():
            g *= scale
    return norm


def clip_value(grads: dict[str, np.ndarray], value: float) -> None:
    """Clamp every gradient entry to [-value, value], in place."""
    for g in grads.values():
        np.clip(g, -value, value, out=g)


class TrainingDiverged(Exception):
    """The loss or a gradient stopped being finite. The message names the step and what went
    bad; `step` and `name` (the parameter, None for the loss) say it to code."""

    def __init__(self, message: str, step: int | None = None, name: str | None = None):
        super().__init__(message)
        self.step, self.name = step, name


def _non_finite(a) -> str | None:
    a = np.asarray(a)
    if np.isnan(a).any():
        return "nan"
    return "inf" if np.isinf(a).any() else None


def check_finite(step: int, loss: float, grads: dict[str, np.ndarray]) -> None:
    """Raise TrainingDiverged naming the step and the loss or the first bad gradient."""
    bad = _non_finite(loss)
    if bad:
        raise TrainingDiverged(f"step {step}: loss is {bad}", step)
    for name, g in grads.items():
        bad = _non_finite(g)
        if bad:
            raise TrainingDiverged(f"step {step}: gradient of {name!r} has {bad}", step, name)
