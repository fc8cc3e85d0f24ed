"""Generation: a one-directional network with a softmax head, run one token at a time.

`Generator` feeds tokens to a `rnndsl.Network` and carries every cell's states from one call
to the next (`Network.run` with `state0`), so each new token costs one step, not a rerun of
the prefix. `next_token` draws from the head's distribution, sharpened or flattened by a
temperature (probabilities proportional to p ** (1 / temperature)) and optionally cut to the
`top_k` most likely tokens. Draws come from one NumPy generator, so a seed fixes the text.

`charlm_text(...)` samples from a model trained with `rnndsl train --task charlm`. Such a
model saw each line of its text as one sequence starting from zero states, with no start
symbol; so the generator does the same: a line starts from zero states, its first character
drawn from how the text's lines begin (unless a prompt gives it), and after each newline the
states are reset and the next line starts afresh. `decode_prompt` answers a prompt with a
model of a sequence task (rnndsl.training.tasks.SEQUENCE_TASKS).
"""
from __future__ import annotations

import math
from typing import Iterator

import numpy as np

from rnndsl.backend.blas import matmul
from rnndsl.language.errors import UserError, printable
from rnndsl.training.heads import Head, _log_softmax
from rnndsl.training.layers import Network
from rnndsl.training.tasks import SEQUENCE_TASKS


class Generator:
    """A network and a per-step softmax head, stepped one token at a time with carried states.
    Tokens enter as one-hot vectors of the network's input size."""

    def __init__(self, network: Network, head: Head, params: dict):
        if network.bidirectional is not None:
            raise UserError(f"a {network.bidirectional} bidirectional network reads each "
                            "sequence backwards too, so it cannot generate one step at a time")
        if head.family != "softmax" or not head.per_step:
            raise UserError(f"generation needs a softmax head at every step, not {head.kind}")
        if head.out_size > network.input_size:
            raise UserError(f"the head gives {head.out_size} tokens but the network reads only "
                            f"{network.input_size}: it cannot be fed its own output")
        self.network, self.head, self.params = network, head, params
        self.net_params = {k: params[k] for k in network.param_shapes()}
        self.dtype = next(iter(params.values())).dtype
        self.states = None  # zeros

    def reset(self) -> None:
        """Back to zero states: the start of a sequence."""
        self.states = None

    def feed(self, ids) -> np.ndarray:
        """Read the tokens `ids` (a sequence, or one int) from the current states; return the
        log-probabilities of the token that follows (out_size,)."""
        ids = np.atleast_1d(np.asarray(ids, dtype=np.int64))
        x = np.zeros((len(ids), 1, self.network.input_size), self.dtype)
        x[np.arange(len(ids)), 0, ids] = 1
        run = self.network.run(self.net_params, x, state0=self.states, save=False)
        self.states = run.states
        z = matmul(run.y[-1], self.params["head.W"].T) + self.params["head.b"]
        return _log_softmax(z[0].astype(np.float64))


def check_sampling(temperature: float, top_k: int | None) -> None:
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature)
            and temperature > 0):
        raise UserError(f"temperature must be a number > 0, got {temperature!r}")
    if top_k is not None and not (isinstance(top_k, int) and top_k >= 1):
        raise UserError(f"top_k must be a whole number of at least 1, got {top_k!r}")


def next_token(logp: np.ndarray, rng: np.random.Generator, temperature: float = 1.0,
               top_k: int | None = None) -> int:
    """A draw from softmax(logp / temperature), restricted to the top_k most likely tokens."""
    z = logp / temperature
    if top_k is not None and top_k < len(z):
        cut = np.partition(z, -top_k)[-top_k]
        z = np.where(z >= cut, z, -np.inf)
    p = np.exp(z - z.max())
    return int(rng.choice(len(p), p=p / p.sum()))


# -- the character-level language model --------------------------------------------------------

GENERATING = ("charlm", *SEQUENCE_TASKS)  # the tasks whose models write sequences


def load_generator(path):
    """The training configuration, model and parameters of a checkpoint whose model writes
    sequences (GENERATING); any other (another task, a bidirectional language model, a changed
    text) is a UserError naming it."""
    from rnndsl.training.train import load_trained, read_checkpoint

    where = printable(path)
    ckpt = read_checkpoint(path)
    config = ckpt["config"]
    if config.task not in GENERATING:
        raise UserError(f"{where} holds a model of the task '{config.task}', which writes no "
                        f"sequence; sampling needs one trained with --task "
                        f"{', '.join(GENERATING)}")
    if config.task == "charlm" and config.bidirectional:
        raise UserError(f"{where} holds a bidirectional network ({config.bidirectional}), "
                        "which reads each line backwards too and cannot generate")
    model, params = load_trained(path, ckpt)
    return config, model, params


def decode_prompt(model, params, prompt: str, max_len: int, beam: int | None) -> str:
    """A sequence task's answer to `prompt` (reverse: the source letters; dates: YYYY-MM-DD;
    expand: the counts), decoded greedily or by beam search of width `beam`."""
    if not prompt:
        raise UserError(f"give the input with --prompt (the task {model.task.name}: "
                        f"{model.task.description})")
    try:
        given = model.task.encode(prompt)
    except ValueError as exc:
        raise UserError(f"prompt: {exc}") from None
    dtype = model.dtype
    if model.task.head == "seq2seq":
        ids = model.model.translate(params, given[:, None], [len(given)], max_len, beam)
    else:
        vector = given[None].astype(dtype) / model.task.length
        ids = model.model.generate(params, vector, max_len, beam)
    return model.task.decode(ids[0])


def charlm_text(task, generator: Generator, length: int, prompt: str = "",
                temperature: float = 1.0, top_k: int | None = None,
                seed: int = 0) -> Iterator[str]:
    """Yield `length` characters that continue `prompt`, one at a time (the prompt itself is
    not yielded). Lines start from zero states, as in training (see the module docstring)."""
    check_sampling(temperature, top_k)
    if not (isinstance(length, int) and length >= 1):
        raise UserError(f"length must be a whole number of at least 1, got {length!r}")
    try:
        prompt_ids = task.encode(prompt)
    except ValueError as exc:
        raise UserError(f"prompt: {exc}") from None
    rng = np.random.default_rng(seed)
    starts = np.bincount([s[0] for s in task.sequences], minlength=task.output_size)
    starts = starts / starts.sum()
    newline = task.vocab.find("\n")
    generator.reset()
    # The prompt's last line is the context; earlier lines ended with a reset.
    line = prompt_ids[np.flatnonzero(prompt_ids == newline)[-1] + 1:] \
        if newline >= 0 and (prompt_ids == newline).any() else prompt_ids
    logp = generator.feed(line) if len(line) else None
    for _ in range(length):
        if logp is None:  # a new line: how the text's lines begin
            token = int(rng.choice(len(starts), p=starts))
            generator.reset()
        else:
            token = next_token(logp, rng, temperature, top_k)
        yield task.vocab[token]
        logp = None if token == newline else generator.feed(token)


def terminal_text(text: str) -> str:
    """Generated text for a terminal: newlines and tabs as they are, any other character
    that is not printable escaped (a model of a text with escape codes must not send them)."""
    return "".join(c if c in "\n\t" else printable(c) for c in text)

