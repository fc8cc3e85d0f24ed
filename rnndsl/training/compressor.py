"""The neural history compressor (Schmidhuber 1992, "Learning complex, extended sequences using
the principle of history compression"), over rnndsl networks.

A stack of recurrent levels reads a sequence of symbols. Each level is a one-directional
`Network` with a softmax head, trained without labels to predict its next input. Level 0 reads
the raw sequence; only the inputs it fails to predict (its most likely next symbol is not the
one that comes; the first input always) go up, with their time stamps, and form level 1's
sequence, and so on: a level above sees only the surprises of the level below, so it runs on
a much shorter sequence, on which long lags become short ones.

The compressed form of a sequence is its length, the time stamps of the inputs passed up by
each level, and the symbols that the top level fails to predict. It holds everything needed
to rebuild the sequence: walking down from the top, each level regenerates the symbols it
predicted (its most likely next symbol) between those it was given. `compress` and
`decompress` step every level through the same batch in the same way, one step at a time with
carried states, so each prediction is computed bit for bit as during compression and the
rebuilt sequences are exact (a batch must be decompressed as it was compressed).

Symbols are ids in [0, vocab). Parameters: `level{k}.<network parameter>`, `level{k}.head.W`,
`level{k}.head.b`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rnndsl.backend.blas import matmul
from rnndsl.training.heads import Head
from rnndsl.training.layers import Network
from rnndsl.training.optim import Adam, check_finite, clip_global_norm


@dataclass
class Compressed:
    """A batch in compressed form (see the module docstring)."""
    lengths: list[int]  # per sequence
    stamps: list[list[list[int]]]  # [level][sequence]: time stamps of what the level passed up
    symbols: list[list[int]]  # [sequence]: what the top level passed up, at stamps[-1]

    def size(self) -> int:
        """Symbols kept (time stamps not counted)."""
        return sum(len(s) for s in self.symbols)


def pad(seqs: list, fill: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Sequences of ids to (T, B) and lengths (B,)."""
    lengths = np.array([len(s) for s in seqs], dtype=np.int64)
    out = np.full((max(int(lengths.max()), 1), len(seqs)), fill, dtype=np.int64)
    for b, s in enumerate(seqs):
        out[:len(s), b] = s
    return out, lengths


class HistoryCompressor:
    """`levels` predictors of `cell` (a compiled cell with one input), each a Network of width
    `hidden` reading its symbols one-hot, with a softmax head over the vocabulary."""

    def __init__(self, cell, vocab: int, hidden: int, levels: int = 2):
        if levels < 1 or vocab < 2:
            raise ValueError(f"need levels >= 1 and vocab >= 2, got {levels}, {vocab}")
        self.vocab, self.levels = int(vocab), int(levels)
        self.networks = [Network(cell, vocab, hidden) for _ in range(levels)]
        self.heads = [Head("softmax_step", net.output_size, vocab) for net in self.networks]

    def init_params(self, seed: int = 0, dtype=np.float32) -> dict:
        params = {}
        for k, (net, head) in enumerate(zip(self.networks, self.heads)):
            params.update({f"level{k}.{p}": v for p, v in
                           net.init_params(seed=seed + k, dtype=dtype).items()})
            params.update({f"level{k}.{p}": v for p, v in
                           head.init_params(np.random.default_rng([seed, k]), dtype).items()})
        return params

    def _own(self, params, k: int) -> dict:
        prefix = f"level{k}."
        return {p[len(prefix):]: v for p, v in params.items() if p.startswith(prefix)}

    # -- training a level --------------------------------------------------------------------
    def level_loss(self, params, k: int, seqs: list, grads: bool = True):
        """Level k's next-symbol loss on `seqs` (its input sequences): (loss, metrics,
        gradients keyed as `params`, or None)."""
        own = self._own(params, k)
        net, head = self.networks[k], self.heads[k]
        ids, lengths = pad(seqs)
        if lengths.max() < 2:  # every input was predicted below: nothing left to predict
            zeros = {f"level{k}.{p}": np.zeros_like(v) for p, v in own.items()}
            return 0.0, {"accuracy": 1.0}, (zeros if grads else None)
        x = self._one_hot(ids[:-1], own)
        steps = np.maximum(lengths - 1, 0)  # predict symbol t+1 from symbols 0..t
        net_params = {p: own[p] for p in net.param_shapes()}
        y, tape = net.forward(net_params, x, steps, save=grads)
        res = head.loss(own, y, ids[1:], steps)
        if not grads:
            return res.loss, res.metrics, None
        g, _ = net.backward(net_params, tape, res.dy, input_grads=False)
        return res.loss, res.metrics, {f"level{k}.{p}": v for p, v in {**g, **res.grads}.items()}

    def _one_hot(self, ids, own) -> np.ndarray:
        x = np.zeros((*ids.shape, self.vocab), own["head.W"].dtype)
        np.put_along_axis(x, ids[..., None], 1, axis=-1)
        return x

    # -- one step at a time ------------------------------------------------------------------
    def _walk(self, params, k: int, given: np.ndarray, lengths: np.ndarray):
        """Run level k over sequences (T, B) whose symbols are known where `given` >= 0 and
        otherwise are the level's own prediction. Returns the symbols (T, B) and the
        prediction made for each step (-1 at step 0, which nothing predicts)."""
        own = self._own(params, k)
        net = self.networks[k]
        net_params = {p: own[p] for p in net.param_shapes()}
        T, B = given.shape
        symbols = np.where(given >= 0, given, 0)
        predicted = np.full((T, B), -1, dtype=np.int64)
        states = None
        for t in range(T):
            if t > 0:
                symbols[t] = np.where(given[t] >= 0, given[t], predicted[t])
            if t + 1 < T:
                run = net.run(net_params, self._one_hot(symbols[t:t + 1], own), state0=states,
                              save=False)
                states = run.states
                z = matmul(run.y[0], own["head.W"].T) + own["head.b"]
                predicted[t + 1] = z.argmax(axis=1)
        live = np.arange(T)[:, None] < lengths
        return np.where(live, symbols, 0), np.where(live, predicted, -1)

    def _levels(self, params, seqs: list) -> list[tuple[list, list]]:
        """Each level's input sequences with their original time stamps, then (last) what the
        top level passed up."""
        current = [list(map(int, s)) for s in seqs]
        stamps = [list(range(len(s))) for s in seqs]
        out = [(current, stamps)]
        for k in range(self.levels):
            ids, lengths = pad(current)
            _, predicted = self._walk(params, k, ids, lengths)
            keep = [[i for i in range(n) if i == 0 or predicted[i, b] != ids[i, b]]
                    for b, n in enumerate(lengths)]
            current = [[current[b][i] for i in kb] for b, kb in enumerate(keep)]
            stamps = [[stamps[b][i] for i in kb] for b, kb in enumerate(keep)]
            out.append((current, stamps))
        return out

    def compress(self, params, seqs: list) -> Compressed:
        """Pass each level's unpredicted inputs up; keep the top level's."""
        levels = self._levels(params, seqs)
        return Compressed([len(s) for s in seqs], [st for _, st in levels[1:]], levels[-1][0])

    def level_inputs(self, params, seqs: list, k: int) -> list:
        """What level k reads for each sequence: its training data."""
        return self._levels(params, seqs)[k][0] if k else [list(map(int, s)) for s in seqs]

    def decompress(self, params, packed: Compressed) -> list[list[int]]:
        """The sequences that `compress` was given, rebuilt from the top level down."""
        known = packed.symbols  # symbols of the top level's passed-up inputs
        for k in reversed(range(self.levels)):
            # level k's inputs are what level k-1 passed up (every step, at level 0)
            times = packed.stamps[k - 1] if k > 0 else [list(range(n)) for n in packed.lengths]
            given = []
            for b, t_b in enumerate(times):
                where = {t: s for t, s in zip(packed.stamps[k][b], known[b])}
                given.append([where.get(t, -1) for t in t_b])
            ids, lengths = pad(given, fill=-1)
            symbols, _ = self._walk(params, k, ids, lengths)
            known = [symbols[:n, b].tolist() for b, n in enumerate(lengths)]
        return known

    def passed_up(self, packed: Compressed) -> list[float]:
        """Per level, the fraction of its inputs that it passed up."""
        inputs = sum(packed.lengths)
        out = []
        for stamps in packed.stamps:
            n = sum(len(s) for s in stamps)
            out.append(n / max(inputs, 1))
            inputs = n
        return out


# -- training ------------------------------------------------------------------------------------
def train_level(model: HistoryCompressor, params: dict, k: int, sample, steps: int,
                lr: float = 1e-2, clip: float = 1.0, seed: int = 0, progress=None) -> list:
    """Train level k alone (the levels below as they are) for `steps` Adam steps on batches
    `sample(rng)` (a list of sequences; the batch of step s from the generator (seed, k, s)),
    each read through the levels below. Updates `params` in place; returns the losses."""
    optimizer, losses = Adam(lr), []
    for step in range(steps):
        seqs = model.level_inputs(params, sample(np.random.default_rng([seed, k, step])), k)
        loss, _, grads = model.level_loss(params, k, seqs)
        check_finite(step, loss, grads)
        clip_global_norm(grads, clip)
        optimizer.step(params, grads)
        losses.append(loss)
        if progress is not None:
            progress(k, step + 1)
    return losses


# -- the long-lag task with predictable filler ---------------------------------------------------
FILLER_VOCAB = "abcdxyzm"  # a-d: the symbol to remember; x y z: filler; m: the end marker


def filler_sequences(rng, batch: int, min_filler: int, max_filler: int) -> list:
    """Sequences `s x y z x y z ... m s`: s is one of a, b, c, d at random, the filler
    `x y z` repeated has a random length in [min_filler, max_filler], and after the marker m
    comes s again. Only s (twice), and when m comes, are not predictable from the symbols just
    before; the last s is predictable only by remembering the first across the filler."""
    out = []
    for _ in range(batch):
        s = int(rng.integers(0, 4))
        n = int(rng.integers(min_filler, max_filler + 1))
        out.append([s, *(4 + np.arange(n) % 3), 7, s])
    return out


def end_predicted(model: HistoryCompressor, params: dict, seqs: list) -> float:
    """How often each sequence's last symbol (the remembered x) is predicted by some level,
    that is, is not among what the top level keeps. One level guessing scores 1/4; with
    two, the second gets another guess where the first was wrong, and an untrained second
    level's guess depends on what it read, so chance ranges from 1/4 to about 1/2 and more
    by luck; only a hierarchy that carries the symbol across the lag scores 1 reliably."""
    packed = model.compress(params, seqs)
    return float(np.mean([len(s) - 1 not in top for s, top in zip(seqs, packed.stamps[-1])]))
