"""Sequence generation by a decoder network: encoder-decoder (many-to-many, unaligned) and
vector-to-sequence (one-to-many) models over `rnndsl.Network`, in NumPy.

Tokens are integer ids. A `Decoder` is a one-directional Network of any cell with a softmax
head over the target vocabulary, which holds an end-of-sequence token `eos`. At step t the
decoder reads the previous target token one-hot (target_vocab + 1 inputs: the extra id,
`target_vocab`, is the start token read at the first step), followed by a context vector when
it has one (`context_size` more inputs, the same at every step). Training is by teacher
forcing: the decoder reads the true previous token. A target sequence is its tokens followed
by `eos`; its length counts the `eos`, and steps past it are padding that no loss or gradient
sees. Decoding is greedy or by beam search (`beam`), one step at a time with the network's
states carried over (`Network.run`), and stops at `eos` or after `max_len` tokens.

`Seq2Seq(encoder, decoder, target_vocab)` (Sutskever, Vinyals & Le 2014; Cho et al. 2014):
the encoder Network (any cell, stacked, bidirectional in any mode, residual, dense) reads the
source one-hot (its input_size is the source vocabulary) within each source length; only its
final states are used. They become the decoder's initial states (the `Bridge`): decoder layer
l reads encoder layer l + (encoder layers - decoder layers) (the top layers face each other;
layer 0 where the encoder has fewer), state s reads the encoder state of the same name (else
the encoder's first state: an LSTM decoder's c from a GRU's h), concatenated over the encoder
layer's directions; copied where the widths agree, else through a learned matrix
`bridge.layer{l}.{s}` (n, width), no bias.

`VectorToSequence(decoder, target_vocab, vector_size, condition=...)`: the decoder is
conditioned on a fixed vector v per sequence (captioning's image code), as its initial states
(`condition="state"`: every decoder state is `bridge.layer{l}.{s}` @ v), as an input at every
step (`"input"`), or both.

Parameters are one flat dict: `encoder.<network parameter>`, `decoder.<network parameter>`,
`bridge.layer{l}.{s}`, `head.W`, `head.b`. Each model's `loss(params, batch, grads=True)`
returns (loss, metrics, gradients) as `rnndsl.training.train.Model` does, so `rnndsl train` runs them.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rnndsl.backend.blas import matmul, weight_grad
from rnndsl.training.heads import Head, _log_softmax
from rnndsl.training.layers import Network


@dataclass
class Seq2SeqBatch:
    """A batch of token sequences, time-major; padding past the lengths may hold any id."""
    source: np.ndarray | None  # (Ts, B) ids, or None for a vector-to-sequence task
    source_lengths: np.ndarray | None  # (B,)
    target: np.ndarray  # (Tt, B) ids, each sequence ending with eos
    target_lengths: np.ndarray  # (B,), counting the eos
    vector: np.ndarray | None = None  # (B, n): the condition of a vector-to-sequence task


def one_hot(ids: np.ndarray, size: int, dtype, lengths=None) -> np.ndarray:
    """(T, B) ids to (T, B, size); steps past `lengths` are zero whatever id they hold."""
    ids = np.asarray(ids)
    T = ids.shape[0]
    live = np.ones(ids.shape, bool) if lengths is None else \
        np.arange(T)[:, None] < np.asarray(lengths)[None, :]
    bad = live & ((ids < 0) | (ids >= size))
    if bad.any():
        t, b = np.argwhere(bad)[0]
        raise ValueError(f"token id {ids[t, b]} at step {t} of sequence {b} is outside the "
                         f"vocabulary of {size}")
    out = np.zeros((*ids.shape, size), dtype)
    np.put_along_axis(out, np.where(live, ids, 0)[..., None], live[..., None].astype(dtype),
                      axis=-1)
    return out


def _prefixed(prefix: str, d: dict) -> dict:
    return {f"{prefix}.{k}": v for k, v in d.items()}


def _unprefixed(prefix: str, d: dict) -> dict:
    start = len(prefix) + 1
    return {k[start:]: v for k, v in d.items() if k.startswith(prefix + ".")}


def _state_width(net: Network, state: str, role: str) -> int:
    size = net.cell.states[state]
    if size not in net.sizes:
        raise ValueError(f"the {role}'s state '{state}' has the input's size: a state handed "
                         "between encoder and decoder needs a size of its own")
    return net.sizes[size]


class Bridge:
    """The decoder's initial states from given vectors, one per decoder (layer, state): copied
    where a vector has the state's width and copying is allowed, else multiplied by a learned
    matrix `bridge.layer{l}.{s}` (state width, vector width)."""

    def __init__(self, decoder: Network, widths: dict, copy: bool = True):
        self.decoder, self.widths = decoder, widths  # (layer, state) -> vector width
        self.shapes = {}
        for (layer, s), w in widths.items():
            n = _state_width(decoder, s, "decoder")
            if not (copy and w == n):
                self.shapes[f"bridge.layer{layer}.{s}"] = (n, w)

    def init_params(self, rng, dtype) -> dict:
        return {name: rng.uniform(-1 / np.sqrt(w), 1 / np.sqrt(w), (n, w)).astype(dtype)
                for name, (n, w) in self.shapes.items()}

    def forward(self, params, vectors: dict) -> dict:
        state0 = {}
        for (layer, s), v in vectors.items():
            name = f"bridge.layer{layer}.{s}"
            value = matmul(v, params[name].T) if name in self.shapes else v
            state0.setdefault((layer, "fwd"), {})[s] = value
        return state0

    def backward(self, params, vectors: dict, d_state0: dict, grads: dict) -> dict:
        """dL/d(vectors) given dL/d(state0); the matrices' gradients into `grads`."""
        d_vectors = {}
        for (layer, s), v in vectors.items():
            d = d_state0[(layer, "fwd")][s]
            name = f"bridge.layer{layer}.{s}"
            if name in self.shapes:
                grads[name] = weight_grad(d, v)
                d = matmul(d, params[name])
            d_vectors[(layer, s)] = d
        return d_vectors


class Decoder:
    """A one-directional network and a softmax head that writes target tokens (see the module
    docstring for what it reads)."""

    def __init__(self, network: Network, target_vocab: int, eos: int = 0, context_size: int = 0):
        if network.bidirectional is not None:
            raise ValueError(f"a decoder writes left to right: it cannot be bidirectional "
                             f"({network.bidirectional})")
        if not (isinstance(target_vocab, (int, np.integer)) and target_vocab >= 2):
            raise ValueError(f"target_vocab must be at least 2 (eos and a token), got "
                             f"{target_vocab!r}")
        if not 0 <= eos < target_vocab:
            raise ValueError(f"eos must be a token id in [0, {target_vocab}), got {eos!r}")
        want = target_vocab + 1 + context_size
        if network.input_size != want:
            extra = f" + the context's {context_size}" if context_size else ""
            raise ValueError(f"the decoder's network reads {network.input_size} inputs, but it "
                             f"must read the previous target token one-hot: {target_vocab} "
                             f"target tokens + 1 start token{extra} = {want}")
        self.network, self.vocab, self.eos = network, int(target_vocab), int(eos)
        self.bos, self.context_size = int(target_vocab), int(context_size)
        self.head = Head("softmax_step", network.output_size, target_vocab)

    def param_shapes(self) -> dict:
        return {**_prefixed("decoder", self.network.param_shapes()),
                "head.W": (self.vocab, self.network.output_size), "head.b": (self.vocab,)}

    def init_params(self, seed: int, dtype, orthogonal: bool) -> dict:
        params = _prefixed("decoder", self.network.init_params(seed, dtype, orthogonal))
        params.update(self.head.init_params(np.random.default_rng([seed, 1]), dtype))
        return params

    def _inputs(self, prev_ids, context, dtype, lengths=None) -> np.ndarray:
        x = one_hot(prev_ids, self.vocab + 1, dtype, lengths)
        if self.context_size:  # context (B, n): the same at every step
            c = np.broadcast_to(np.asarray(context, dtype), (*x.shape[:2], self.context_size))
            x = np.concatenate([x, c], axis=2)
        return x

    def _teacher(self, target, lengths, context, dtype) -> np.ndarray:
        """What the decoder reads under teacher forcing: start, then the target shifted."""
        target = np.asarray(target)
        prev = np.concatenate([np.full((1, target.shape[1]), self.bos), target[:-1]])
        return self._inputs(prev, context, dtype, lengths)

    def check_target(self, target, lengths) -> None:
        target, lengths = np.asarray(target), np.asarray(lengths)
        if target.ndim != 2 or lengths.shape != (target.shape[1],):
            raise ValueError(f"target must be (T, B) ids with lengths (B,), got {target.shape} "
                             f"and {lengths.shape}")
        if (lengths < 1).any() or (lengths > target.shape[0]).any():
            raise ValueError(f"target lengths must be in [1, {target.shape[0]}] (every target "
                             "ends with eos)")
        B = target.shape[1]
        ends = target[lengths - 1, np.arange(B)]
        if (ends != self.eos).any():
            b = int(np.flatnonzero(ends != self.eos)[0])
            raise ValueError(f"target sequence {b} does not end with eos ({self.eos}) at its "
                             f"length {lengths[b]}")

    def loss(self, params, state0, target, lengths, context=None, grads=True):
        """Teacher-forced softmax cross-entropy of `target` (T, B) (mean over target steps),
        its metrics and, with `grads`, (parameter gradients, dL/dstate0)."""
        self.check_target(target, lengths)
        net = _unprefixed("decoder", params)
        dtype = next(iter(net.values())).dtype
        x = self._teacher(target, lengths, context, dtype)
        run = self.network.run(net, x, lengths, state0, save=grads)
        res = self.head.loss(params, run.y, np.asarray(target), lengths)
        if not grads:
            return res, None
        net_grads, _, d_state0 = self.network.backward_states(net, run.tape, res.dy,
                                                               input_grads=False)
        return res, ({**_prefixed("decoder", net_grads), **res.grads}, d_state0)

    def log_prob(self, params, state0, target, lengths, context=None) -> np.ndarray:
        """log p(target | state0, context) per sequence (B,), teacher-forced in one pass."""
        self.check_target(target, lengths)
        net = _unprefixed("decoder", params)
        dtype = next(iter(net.values())).dtype
        run = self.network.run(net, self._teacher(target, lengths, context, dtype), lengths,
                               state0, save=False)
        logp = _log_softmax(matmul(run.y, params["head.W"].T) + params["head.b"])
        T, B = np.shape(target)
        picked = np.take_along_axis(logp, np.where(
            np.arange(T)[:, None] < lengths, target, 0)[..., None], axis=-1)[..., 0]
        return np.where(np.arange(T)[:, None] < lengths, picked, 0).sum(axis=0)

    # -- decoding ---------------------------------------------------------------------------
    def _step(self, net, params, prev, states, context):
        """Read one token per row; log-probabilities of the next (rows, vocab), new states."""
        dtype = next(iter(net.values())).dtype
        run = self.network.run(net, self._inputs(prev[None], context, dtype), state0=states,
                               save=False)
        z = matmul(run.y[0], params["head.W"].T) + params["head.b"]
        return _log_softmax(z.astype(np.float64)), run.states

    def greedy(self, params, state0, batch: int, max_len: int, context=None) -> list[list[int]]:
        """The most likely token at each step, until eos (not included) or max_len tokens."""
        net = _unprefixed("decoder", params)
        prev, states = np.full(batch, self.bos), state0
        out = np.zeros((max_len, batch), np.int64)
        done = np.zeros(batch, bool)
        lengths = np.full(batch, max_len)
        for t in range(max_len):
            logp, states = self._step(net, params, prev, states, context)
            prev = logp.argmax(axis=1)
            out[t] = prev
            ended = ~done & (prev == self.eos)
            lengths[ended] = t
            done |= ended
            if done.all():
                break
        return [out[:lengths[b], b].tolist() for b in range(batch)]

    def beam(self, params, state0, batch: int, max_len: int, width: int = 4,
             context=None) -> list[tuple[list[int], float]]:
        """Beam search for the most likely target (tokens without eos, its log-probability).
        `width` hypotheses are kept per sequence; a hypothesis ending in eos is set aside, and
        a sequence's search stops once its best finished hypothesis scores at least as high as
        every open one (log-probabilities only fall as hypotheses grow, so none can beat it).
        With no finished hypothesis after max_len tokens, the best open one is returned."""
        if not (isinstance(width, (int, np.integer)) and width >= 1):
            raise ValueError(f"beam width must be a whole number of at least 1, got {width!r}")
        net = _unprefixed("decoder", params)
        K, V, B = int(width), self.vocab, batch
        scores = np.full((B, K), -np.inf)
        scores[:, 0] = 0.0  # one open hypothesis, the empty one, to start
        history = np.zeros((B, K, 0), np.int64)
        repeat = (lambda a: None if a is None else np.repeat(np.asarray(a), K, axis=0))
        states = None if state0 is None else \
            {k: {s: repeat(v) for s, v in st.items()} for k, st in state0.items()}
        if context is not None:
            context = repeat(context)
        prev = np.full(B * K, self.bos)
        finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(B)]
        for _ in range(max_len):
            logp, states = self._step(net, params, prev, states, context)
            total = (scores[:, :, None] + logp.reshape(B, K, V)).reshape(B, K * V)
            new_scores = np.full((B, K), -np.inf)
            parents, tokens = np.zeros((B, K), np.int64), np.full((B, K), self.eos)
            for b in range(B):
                kept = 0
                for c in np.argsort(-total[b], kind="stable")[:2 * K]:
                    if total[b, c] == -np.inf or kept == K:
                        break
                    parent, token = divmod(int(c), V)
                    if token == self.eos:
                        finished[b].append((float(total[b, c]), history[b, parent].tolist()))
                    else:
                        new_scores[b, kept], parents[b, kept], tokens[b, kept] = \
                            total[b, c], parent, token
                        kept += 1
                best = max((f[0] for f in finished[b]), default=-np.inf)
                if best >= new_scores[b].max():
                    new_scores[b] = -np.inf  # settled: no open hypothesis can win
            rows = np.arange(B)[:, None]
            history = np.concatenate([history[rows, parents], tokens[:, :, None]], axis=2)
            scores = new_scores
            order = (rows * K + parents).reshape(-1)
            states = {k: {s: v[order] for s, v in st.items()} for k, st in states.items()}
            prev = tokens.reshape(-1)
            if (scores == -np.inf).all():
                break
        results = []
        for b in range(B):
            if finished[b]:
                score, tokens = max(finished[b], key=lambda f: f[0])
            else:
                k = int(scores[b].argmax())
                score, tokens = float(scores[b, k]), history[b, k].tolist()
            results.append((tokens, score))
        return results


def exact_match(predicted: list[list[int]], target, lengths) -> float:
    """The fraction of sequences decoded exactly (target without its eos)."""
    target = np.asarray(target)
    right = [p == target[:n - 1, b].tolist() for b, (p, n) in enumerate(zip(predicted, lengths))]
    return float(np.mean(right))


def _decode_len(batch: Seq2SeqBatch) -> int:
    return int(np.max(batch.target_lengths)) + 5  # room to show a run that does not stop


class Seq2Seq:
    """An encoder network, a bridge and a decoder (see the module docstring)."""

    def __init__(self, encoder: Network, decoder: Network, target_vocab: int, eos: int = 0):
        self.encoder = encoder
        self.decoder = Decoder(decoder, target_vocab, eos)
        self.source_vocab = encoder.input_size
        self.sources = {}  # (decoder layer, state) -> (encoder state, [encoder cell keys])
        widths = {}
        for layer in range(decoder.layers):
            enc_layer = max(0, layer + encoder.layers - decoder.layers)
            keys = [k for k in encoder.cell_keys() if k[0] == enc_layer]
            for s in decoder.cell.states:
                es = s if s in encoder.cell.states else next(iter(encoder.cell.states))
                self.sources[(layer, s)] = (es, keys)
                widths[(layer, s)] = len(keys) * _state_width(encoder, es, "encoder")
        self.bridge = Bridge(decoder, widths)

    def __repr__(self) -> str:
        return f"<rnndsl.Seq2Seq encoder {self.encoder!r}, decoder {self.decoder.network!r}>"

    def param_shapes(self) -> dict:
        return {**_prefixed("encoder", self.encoder.param_shapes()), **self.bridge.shapes,
                **self.decoder.param_shapes()}

    def init_params(self, seed: int = 0, dtype=np.float32, orthogonal: bool = False) -> dict:
        params = _prefixed("encoder", self.encoder.init_params(seed, dtype, orthogonal))
        params.update(self.bridge.init_params(np.random.default_rng([seed, 2]), dtype))
        decoder_seed = int(np.random.default_rng([seed, 3]).integers(2**62))
        params.update(self.decoder.init_params(decoder_seed, dtype, orthogonal))
        return params

    def check(self, params) -> None:
        shapes = self.param_shapes()
        missing = [p for p in shapes if p not in params]
        extra = [p for p in params if p not in shapes]
        if missing or extra:
            raise ValueError(f"Seq2Seq parameters: missing {missing or 'none'}, unknown "
                             f"{extra or 'none'}")

    def encode(self, params, source, lengths, save: bool = False):
        """The encoder's run over the source ids (Ts, B), and the vectors the bridge reads."""
        self.check(params)
        enc = _unprefixed("encoder", params)
        dtype = next(iter(enc.values())).dtype
        x = one_hot(source, self.source_vocab, dtype, lengths)
        run = self.encoder.run(enc, x, lengths, save=save)
        vectors = {dec: np.concatenate([run.states[k][es] for k in keys], axis=1)
                   for dec, (es, keys) in self.sources.items()}
        return run, vectors

    def loss(self, params, batch: Seq2SeqBatch, grads: bool = True):
        """(loss, metrics, gradients or None), as rnndsl.training.train.Model.loss. Without grads (an
        evaluation), the metrics add "exact_match" of greedy decoding."""
        run, vectors = self.encode(params, batch.source, batch.source_lengths, save=grads)
        state0 = self.bridge.forward(params, vectors)
        res, back = self.decoder.loss(params, state0, batch.target, batch.target_lengths,
                                      grads=grads)
        metrics = dict(res.metrics)
        if not grads:
            predicted = self.decoder.greedy(params, state0, len(batch.target_lengths),
                                            _decode_len(batch))
            metrics["exact_match"] = exact_match(predicted, batch.target, batch.target_lengths)
            return res.loss, metrics, None
        out, d_state0 = back
        d_vectors = self.bridge.backward(params, vectors, d_state0, out)
        d_final = {}
        for dec, d in d_vectors.items():
            es, keys = self.sources[dec]
            for k, part in zip(keys, np.split(d, len(keys), axis=1)):
                cell = d_final.setdefault(k, {})
                cell[es] = cell[es] + part if es in cell else part
        enc = _unprefixed("encoder", params)
        enc_grads, _, _ = self.encoder.backward_states(enc, run.tape, None, d_final,
                                                        input_grads=False)
        out.update(_prefixed("encoder", enc_grads))
        return res.loss, metrics, {k: out[k] for k in self.param_shapes()}

    def translate(self, params, source, lengths, max_len: int, beam: int | None = None):
        """Decoded targets (lists of ids, without eos): greedy, or beam search of that width."""
        _, vectors = self.encode(params, source, lengths)
        state0 = self.bridge.forward(params, vectors)
        B = np.shape(source)[1]
        if beam is None:
            return self.decoder.greedy(params, state0, B, max_len)
        return [tokens for tokens, _ in self.decoder.beam(params, state0, B, max_len, beam)]


CONDITIONS = ("state", "input", "both")


class VectorToSequence:
    """A decoder conditioned on a fixed vector per sequence (see the module docstring)."""

    def __init__(self, decoder: Network, target_vocab: int, vector_size: int,
                 condition: str = "state", eos: int = 0):
        if condition not in CONDITIONS:
            raise ValueError(f"condition must be one of {', '.join(CONDITIONS)}, got "
                             f"{condition!r}")
        self.vector_size, self.condition = int(vector_size), condition
        as_input = condition in ("input", "both")
        self.decoder = Decoder(decoder, target_vocab, eos, vector_size if as_input else 0)
        widths = {(layer, s): self.vector_size for layer in range(decoder.layers)
                  for s in decoder.cell.states} if condition in ("state", "both") else {}
        self.bridge = Bridge(decoder, widths, copy=False)

    def param_shapes(self) -> dict:
        return {**self.bridge.shapes, **self.decoder.param_shapes()}

    def init_params(self, seed: int = 0, dtype=np.float32, orthogonal: bool = False) -> dict:
        params = self.bridge.init_params(np.random.default_rng([seed, 2]), dtype)
        params.update(self.decoder.init_params(seed, dtype, orthogonal))
        return params

    def _start(self, params, vector):
        vector = np.asarray(vector)
        if vector.ndim != 2 or vector.shape[1] != self.vector_size:
            raise ValueError(f"vector must be (B, {self.vector_size}), got {vector.shape}")
        vector = vector.astype(params["head.W"].dtype, copy=False)
        vectors = {key: vector for key in self.bridge.widths}
        context = vector if self.decoder.context_size else None
        return vector, vectors, self.bridge.forward(params, vectors), context

    def loss(self, params, batch: Seq2SeqBatch, grads: bool = True):
        """(loss, metrics, gradients or None), as Seq2Seq.loss."""
        vector, vectors, state0, context = self._start(params, batch.vector)
        res, back = self.decoder.loss(params, state0 or None, batch.target, batch.target_lengths,
                                      context, grads=grads)
        metrics = dict(res.metrics)
        if not grads:
            predicted = self.decoder.greedy(params, state0 or None, len(vector),
                                            _decode_len(batch), context)
            metrics["exact_match"] = exact_match(predicted, batch.target, batch.target_lengths)
            return res.loss, metrics, None
        out, d_state0 = back
        self.bridge.backward(params, vectors, d_state0, out)
        return res.loss, metrics, {k: out[k] for k in self.param_shapes()}

    def generate(self, params, vector, max_len: int, beam: int | None = None):
        """Targets for each vector (lists of ids, without eos): greedy or by beam search."""
        vector, _, state0, context = self._start(params, vector)
        if beam is None:
            return self.decoder.greedy(params, state0 or None, len(vector), max_len, context)
        return [t for t, _ in self.decoder.beam(params, state0 or None, len(vector), max_len,
                                                beam, context)]


class SequenceModel:
    """What `rnndsl.training.train` trains on the sequence tasks (rnndsl.training.tasks.SEQUENCE_TASKS), with the
    interface of `rnndsl.training.train.Model`: a Seq2Seq for "seq2seq" tasks (encoder `config.spec`,
    decoder `config.decoder`, else the same spec; `bidirectional` applies to the encoder),
    a VectorToSequence for "vector2seq" tasks (decoder `config.decoder` or `config.spec`,
    conditioned as `config.condition` says, "state" by default). Both networks take the
    configuration's hidden size, layers, residual and dense options."""

    def __init__(self, config):
        from rnndsl import compiler
        from rnndsl.training.train import network_for, task_for

        self.task = task_for(config)
        self.dtype = np.dtype(config.dtype)
        decoder = compiler.compile(config.decoder or config.spec)
        vocab = self.task.output_size
        if self.task.head == "seq2seq":
            encoder = network_for(config, compiler.compile(config.spec), self.task.input_size)
            self.model = Seq2Seq(encoder, network_for(config, decoder, vocab + 1, one_way=True),
                                 vocab, self.task.EOS)
        else:
            condition = config.condition or "state"
            context = self.task.input_size if condition != "state" else 0
            self.model = VectorToSequence(network_for(config, decoder, vocab + 1 + context,
                                                      one_way=True),
                                          vocab, self.task.input_size, condition, self.task.EOS)

    def init_params(self, seed: int, orthogonal: bool) -> dict:
        return self.model.init_params(seed, self.dtype, orthogonal)

    def loss(self, params, batch: Seq2SeqBatch, grads: bool = True):
        return self.model.loss(params, batch, grads)
