"""Optimisers, gradient clipping and divergence checks on dicts of NumPy arrays.

Parameters and gradients are dicts name -> array; optimisers update the parameter arrays in
place, so layers holding references to them see the new values. An optimiser's state is a
flat dict of arrays (np.savez can store it) from which a fresh optimiser continues exactly
where the saved one stopped.
"""
from __future__ import annotations

import numpy as np


class _Optimizer:
    _BUFFERS: tuple[str, ...] = ()  # per-parameter state, saved as "<buffer>/<param name>"

    def __init__(self):
        self._state = {b: {} for b in self._BUFFERS}

    def _buffer(self, kind: str, name: str, like: np.ndarray) -> np.ndarray:
        buf = self._state[kind].get(name)
        if buf is None:
            buf = self._state[kind][name] = np.zeros_like(like)
        return buf

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
        self._state = state


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
        super().__init__()
        self.lr, self.momentum = _lr(lr), float(momentum)
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")

    def step(self, params: dict[str, np.ndarray], grads: dict[str, np.ndarray]) -> None:
        """Update the parameters that have a gradient, in place."""
        for name, p in params.items():
            g = grads.get(name)
            if g is None:
                continue
            if self.momentum:
                v = self._buffer("velocity", name, p)
                v *= self.momentum
                v += g
                g = v
            p -= self.lr * g


class Adam(_Optimizer):
    """Adam with bias correction (Kingma & Ba 2015, Algorithm 1)."""
    _BUFFERS = ("m", "v")

    def __init__(self, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8):
        super().__init__()
        self.lr, self.eps = _lr(lr), float(eps)
        self.betas = (float(betas[0]), float(betas[1]))
        self.t = 0  # steps taken; the bias correction depends on it

    def step(self, params: dict[str, np.ndarray], grads: dict[str, np.ndarray]) -> None:
        """Update the parameters that have a gradient, in place."""
        self.t += 1
        b1, b2 = self.betas
        correct1, correct2 = 1 - b1 ** self.t, 1 - b2 ** self.t
        for name, p in params.items():
            g = grads.get(name)
            if g is None:
                continue
            m, v = self._buffer("m", name, p), self._buffer("v", name, p)
            m *= b1
            m += (1 - b1) * g
            v *= b2
            v += (1 - b2) * g * g
            p -= self.lr * (m / correct1) / (np.sqrt(v / correct2) + self.eps)

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


OPTIMIZERS = ("sgd", "adam")


def make_optimizer(name: str, lr: float | None = None, momentum: float = 0.0):
    """"sgd" (default lr 0.1, optional momentum) or "adam" (default lr 1e-3)."""
    key = name.lower()
    if key == "sgd":
        return SGD(0.1 if lr is None else lr, momentum)
    if key == "adam":
        if momentum:
            raise ValueError("momentum applies to sgd only (adam keeps its own moment estimates)")
        return Adam(1e-3 if lr is None else lr)
    raise ValueError(f"unknown optimizer {name!r}; choose {' or '.join(OPTIMIZERS)}")


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
