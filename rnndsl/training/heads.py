"""Output heads: an affine read-out of a network's output sequence and a loss on it.

A head maps the network output y (T, B, n) to scores z = y @ W.T + b, either at every step
(kinds ending in "_step") or at each sequence's own last step, t = lengths[b] - 1 ("_last"),
and turns them into a loss with its gradients with respect to y and to the head's parameters:

- softmax: softmax cross-entropy against integer class ids (character-level language models);
- mse: mean squared error against real targets (the adding problem of Hochreiter &
  Schmidhuber 1997);
- bits: a sigmoid per output bit with binary cross-entropy, as for the copy, repeat-copy,
  associative-recall and priority-sort tasks of Graves, Wayne & Danihelka 2014 (Neural
  Turing Machines).

Losses are means over the counted items (steps for softmax, steps x outputs for mse and bits)
so that the learning rate does not depend on sequence length or batch size. Steps that are
not counted (padding past a sequence's length, or outside the task's mask) contribute nothing
to the loss or to any gradient, whatever their targets hold.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rnndsl.backend.blas import matmul, weight_grad

KINDS = ("softmax_step", "softmax_last", "mse_step", "mse_last", "bits_step")


@dataclass
class LossResult:
    loss: float
    dy: np.ndarray                 # dL/dy, (T, B, n); zero where nothing is counted
    grads: dict[str, np.ndarray]   # {"head.W": (out, n), "head.b": (out,)}
    metrics: dict[str, float]      # "accuracy" for softmax and bits heads, see Head.loss


def _log_softmax(z: np.ndarray) -> np.ndarray:
    top = z.max(axis=-1, keepdims=True)  # log-sum-exp shifted by the max: no overflow
    return z - top - np.log(np.exp(z - top).sum(axis=-1, keepdims=True))


def _log_sigmoid(z: np.ndarray) -> np.ndarray:
    """log(1 / (1 + e^-z)), finite for any z: -logaddexp(0, -z) written out, whose exp and
    log1p run vectorised (logaddexp calls libm per element: 63 against 12 us for copy's
    656 x 9 scores, three times a step; the two agree to 1 unit in the last place)."""
    return np.minimum(z, 0) - np.log1p(np.exp(-np.abs(z)))


class Head:
    """One of KINDS on top of a network with `in_size` outputs, giving `out_size` scores."""
    KINDS = KINDS

    def __init__(self, kind: str, in_size: int, out_size: int):
        if kind not in KINDS:
            raise ValueError(f"unknown head kind {kind!r}; kinds: {', '.join(KINDS)}")
        self.kind, self.in_size, self.out_size = kind, int(in_size), int(out_size)
        self.family, _, where = kind.partition("_")
        self.per_step = where == "step"

    def __repr__(self) -> str:
        return f"Head({self.kind!r}, in_size={self.in_size}, out_size={self.out_size})"

    def init_params(self, rng: np.random.Generator, dtype=np.float32) -> dict[str, np.ndarray]:
        """U(-k, k) with k = 1/sqrt(in_size), as torch.nn.Linear."""
        k = 1.0 / np.sqrt(self.in_size)
        W = rng.uniform(-k, k, (self.out_size, self.in_size)).astype(dtype)
        b = rng.uniform(-k, k, self.out_size).astype(dtype)
        return {"head.W": W, "head.b": b}

    def predict(self, params, y: np.ndarray, lengths=None) -> np.ndarray:
        """Class probabilities (softmax), values (mse) or bit probabilities (bits): (T, B, out)
        for step heads, whose values past a sequence's length mean nothing, or (B, out)."""
        z = self._scores(params, self._read(y, lengths))
        if self.family == "softmax":
            return np.exp(_log_softmax(z))
        if self.family == "bits":
            return np.exp(_log_sigmoid(z))
        return z

    def loss(self, params, y: np.ndarray, target: np.ndarray, lengths=None,
             mask: np.ndarray | None = None) -> LossResult:
        """The loss of `target` given the network output y (T, B, n).

        Step heads count the steps t < lengths[b] (all steps when lengths is None), and of
        those only where `mask` (T, B) is true if it is given. Targets: class ids (T, B) or
        (B,) for softmax, values (T, B, out) or (B, out) for mse, {0, 1} (T, B, out) for bits.
        Metrics: "accuracy" (softmax: fraction of counted items whose top class is the target;
        bits: fraction of counted bits rounded right); bits also give "bits_wrong_per_seq"
        (mean over sequences of the number of wrong bits) and "cost_per_seq" (binary
        cross-entropy in bits summed over a sequence, averaged over sequences; Graves et al.
        plot this)."""
        T, B, _ = y.shape
        lengths = np.full(B, T) if lengths is None else np.asarray(lengths)
        counted = self._counted(T, B, lengths, mask)
        h = self._read(y, lengths)
        z = self._scores(params, h)
        target = np.asarray(target)
        want = z.shape[:-1] if self.family == "softmax" else z.shape
        if target.shape != want:
            raise ValueError(f"{self.kind} head: target has shape {target.shape}, "
                             f"expected {want}")
        n = max(int(counted.sum()), 1)
        per_item, dz, metrics = getattr(self, "_" + self.family)(z, target, counted, n)
        if self.family != "softmax":
            n *= self.out_size  # mse and bits average over outputs too
        dz = np.where(counted[..., None], dz, 0) / n
        W = params["head.W"]
        lead = tuple(range(dz.ndim - 1))
        grads = {"head.W": weight_grad(dz, h).astype(W.dtype, copy=False),
                 "head.b": dz.sum(axis=lead).astype(W.dtype, copy=False)}
        dh = matmul(dz, W).astype(y.dtype, copy=False)  # float64 targets must not promote dy
        if self.per_step:
            dy = dh
        else:
            dy = np.zeros_like(y)
            dy[lengths - 1, np.arange(B)] = dh
        return LossResult(float(per_item[counted].sum() / n), dy, grads, metrics)

    # -- pieces ---------------------------------------------------------------------------

    def _read(self, y: np.ndarray, lengths) -> np.ndarray:
        """What the read-out sees: every step, or each sequence's last step (B, n)."""
        if self.per_step:
            return y
        T, B, _ = y.shape
        lengths = np.full(B, T) if lengths is None else np.asarray(lengths)
        if lengths.min(initial=1) < 1:
            raise ValueError(f"{self.kind} head: every sequence needs a last step (length >= 1)")
        return y[lengths - 1, np.arange(B)]

    def _counted(self, T: int, B: int, lengths: np.ndarray, mask) -> np.ndarray:
        if not self.per_step:
            if mask is not None:
                raise ValueError(f"{self.kind} head reads one step per sequence: no mask")
            return np.ones(B, dtype=bool)
        counted = np.arange(T)[:, None] < lengths[None, :]
        # a mask that strays past a sequence's end must not make padding count
        return counted if mask is None else counted & np.asarray(mask, dtype=bool)

    @staticmethod
    def _scores(params, h: np.ndarray) -> np.ndarray:
        return matmul(h, params["head.W"].T) + params["head.b"]

    # Each family gives the loss per counted item (summed over outputs), dL/dz before the
    # division by the number of items, and its metrics.

    @staticmethod
    def _softmax(z, target, counted, n):
        ids = np.where(counted, target, 0).astype(np.intp)  # padding may hold any id
        logp = _log_softmax(z)
        per_item = -np.take_along_axis(logp, ids[..., None], axis=-1)[..., 0]
        dz = np.exp(logp) - (np.arange(z.shape[-1]) == ids[..., None])
        right = (z.argmax(axis=-1) == ids) & counted
        return per_item, dz, {"accuracy": float(right.sum() / n)}

    @staticmethod
    def _mse(z, target, counted, n):
        diff = np.where(counted[..., None], z - target, 0)
        return (diff ** 2).sum(axis=-1), 2 * diff, {}

    @staticmethod
    def _bits(z, target, counted, n):
        t = np.where(counted[..., None], target, 0)
        # -[t log s + (1 - t) log(1 - s)] with s = sigmoid(z), log(1 - s) = log s(-z)
        per_bit = -(t * _log_sigmoid(z) + (1 - t) * _log_sigmoid(-z))
        wrong = ((z > 0) != (t > 0.5)) & counted[..., None]
        B = z.shape[1]
        metrics = {"accuracy": float(1 - wrong.sum() / (n * z.shape[-1])),
                   "bits_wrong_per_seq": float(wrong.sum() / B),
                   "cost_per_seq": float(per_bit[counted].sum() / np.log(2) / B)}
        return per_bit.sum(axis=-1), np.exp(_log_sigmoid(z)) - t, metrics
