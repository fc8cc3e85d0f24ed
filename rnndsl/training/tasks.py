"""Training tasks for recurrent networks, generated in code: nothing is downloaded.

Each task samples batches of time-major sequences from the generator it is given, so a seed
fixes every batch. A batch's `target` has the form its head (rnndsl.training.heads) expects:

| task | head | source |
|---|---|---|
| adding | mse_last | Hochreiter & Schmidhuber 1997, in its common modern form |
| copy | bits_step | Graves, Wayne & Danihelka 2014 (Neural Turing Machines), sec. 4.1 |
| repeat_copy | bits_step | Graves et al. 2014, sec. 4.2 |
| recall | bits_step | Graves et al. 2014, sec. 4.3 (associative recall) |
| sort | bits_step | Graves et al. 2014, sec. 4.5 (priority sort) |
| charlm | softmax_step | character-level language modelling (Graves 2013; Karpathy 2015) |

`make_task(name, length, **options)` builds one; `length` sets each task's main size (the
sequence length, the longest sequence, the number of items; see LENGTH_OPTION).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np


@dataclass
class Batch:
    x: np.ndarray                    # (T, B, input_size) float
    target: np.ndarray               # as the task's head expects
    lengths: np.ndarray              # (B,) int64
    mask: np.ndarray | None = None   # (T, B) bool: the steps the loss counts (None: t < lengths)


class Task:
    """A task: its sizes, the head kind that reads the network's output, the loss of a trivial
    solution (`baseline`, for reports; None if there is none worth quoting) and `sample`."""
    name: str
    LENGTH_OPTION: str  # the option that make_task's `length` sets
    input_size: int
    output_size: int
    head: str
    baseline: float | None
    description: str

    def sample(self, rng: np.random.Generator, batch_size: int, dtype=np.float32) -> Batch:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<task {self.name}: {self.description}>"


def _require(ok: bool, task: str, message: str) -> None:
    if not ok:
        raise ValueError(f"{task}: {message}")


class Adding(Task):
    """The adding problem (Hochreiter & Schmidhuber 1997, experiment 4) in the form later work
    on long-term memory uses: at each of `length` steps a value U(0, 1) and a marker; exactly
    two markers are 1, one in the first half of the sequence and one in the second. The
    target, read after the last step, is the sum of the two marked values. Always answering 1
    has mean squared error Var(u1 + u2) = 2/12 = 1/6, the baseline."""
    name, LENGTH_OPTION, head = "adding", "length", "mse_last"
    input_size, output_size, baseline = 2, 1, 1 / 6

    def __init__(self, length: int = 100):
        _require(length >= 2, self.name, f"length must be at least 2, not {length}")
        self.length = int(length)
        self.description = (f"sum of the two marked values among {length} U(0,1) "
                            f"(one mark in each half)")

    def sample(self, rng, batch_size, dtype=np.float32):
        T, B = self.length, batch_size
        x = np.zeros((T, B, 2), dtype=dtype)
        x[:, :, 0] = rng.random((T, B))
        cols = np.arange(B)
        first, second = rng.integers(0, T // 2, B), rng.integers(T // 2, T, B)
        x[first, cols, 1] = x[second, cols, 1] = 1
        target = (x[first, cols, 0] + x[second, cols, 0])[:, None]
        return Batch(x, target, np.full(B, T, dtype=np.int64))


# -- the Graves et al. 2014 tasks: random bit vectors, built one sequence at a time ----------

@dataclass
class _Sequence:
    x: np.ndarray       # (steps, input_size)
    target: np.ndarray  # (steps, output_size)
    mask: np.ndarray    # (steps,) bool: the answer steps


def _blank(steps: int, input_size: int, output_size: int) -> _Sequence:
    return _Sequence(np.zeros((steps, input_size)), np.zeros((steps, output_size)),
                     np.zeros(steps, dtype=bool))


def _random_bits(rng, *shape) -> np.ndarray:
    return rng.integers(0, 2, shape).astype(np.float64)


def _pad(seqs: list[_Sequence], dtype) -> Batch:
    """Stack sequences of different lengths, zero-padded to the longest, time-major."""
    lengths = np.array([len(s.mask) for s in seqs], dtype=np.int64)
    T, B = int(lengths.max()), len(seqs)
    x = np.zeros((T, B, seqs[0].x.shape[1]), dtype=dtype)
    target = np.zeros((T, B, seqs[0].target.shape[1]), dtype=dtype)
    mask = np.zeros((T, B), dtype=bool)
    for b, (s, n) in enumerate(zip(seqs, lengths)):
        x[:n, b], target[:n, b], mask[:n, b] = s.x, s.target, s.mask
    return Batch(x, target, lengths, mask)


class _BitTask(Task):
    """Bit-vector tasks of Graves et al. 2014: a sigmoid per output bit, the loss counted on
    the answer steps only. The baseline is the loss of answering 1/2 for every bit: ln 2."""
    head, baseline = "bits_step", float(np.log(2))

    def sample(self, rng, batch_size, dtype=np.float32):
        return _pad([self._sequence(rng) for _ in range(batch_size)], dtype)

    def _sequence(self, rng) -> _Sequence:
        raise NotImplementedError

    def _check_range(self, low_name: str, low: int, high_name: str, high: int) -> None:
        _require(1 <= low <= high, self.name,
                 f"need 1 <= {low_name} <= {high_name}, got {low_name}={low}, {high_name}={high}")


class Copy(_BitTask):
    """Copy (Graves et al. 2014, sec. 4.1): a sequence of L random `bits`-bit vectors, L uniform
    in [min_len, max_len], then a delimiter flag on an extra input channel; during the next L
    steps the input is blank and the target is the sequence. Input bits + 1 channels, output
    bits; each sequence is 2L + 1 steps, the loss counts the last L."""
    name, LENGTH_OPTION = "copy", "max_len"

    def __init__(self, max_len: int = 20, min_len: int = 1, bits: int = 8):
        self._check_range("min_len", min_len, "max_len", max_len)
        _require(bits >= 1, self.name, f"bits must be at least 1, not {bits}")
        self.max_len, self.min_len, self.bits = int(max_len), int(min_len), int(bits)
        self.input_size, self.output_size = bits + 1, bits
        self.description = f"copy {min_len}..{max_len} vectors of {bits} bits after a delimiter"

    def _sequence(self, rng):
        L, bits = int(rng.integers(self.min_len, self.max_len + 1)), self.bits
        data = _random_bits(rng, L, bits)
        s = _blank(2 * L + 1, self.input_size, self.output_size)
        s.x[:L, :bits] = data
        s.x[L, bits] = 1  # delimiter
        s.target[L + 1:] = data
        s.mask[L + 1:] = True
        return s


class RepeatCopy(_BitTask):
    """Repeat copy (Graves et al. 2014, sec. 4.2): as copy, but with the delimiter comes a
    repeat count n, uniform in [min_repeats, max_repeats], on its own input channel, normalised
    to mean 0 and variance 1 over that range as in the paper. The target is the sequence n
    times, then an end marker on an extra output channel. Input bits + 2 channels, output
    bits + 1; the loss counts the n L + 1 steps after the delimiter."""
    name, LENGTH_OPTION = "repeat_copy", "max_len"

    def __init__(self, max_len: int = 10, min_len: int = 1, max_repeats: int = 10,
                 min_repeats: int = 1, bits: int = 8):
        self._check_range("min_len", min_len, "max_len", max_len)
        self._check_range("min_repeats", min_repeats, "max_repeats", max_repeats)
        _require(bits >= 1, self.name, f"bits must be at least 1, not {bits}")
        self.max_len, self.min_len, self.bits = int(max_len), int(min_len), int(bits)
        self.max_repeats, self.min_repeats = int(max_repeats), int(min_repeats)
        self.input_size, self.output_size = bits + 2, bits + 1
        self.description = (f"copy {min_len}..{max_len} vectors of {bits} bits "
                            f"{min_repeats}..{max_repeats} times, then an end marker")

    def normalised_repeats(self, n: int) -> float:
        """The repeat count as the network sees it: mean 0, variance 1 over the range."""
        k = self.max_repeats - self.min_repeats + 1  # a uniform over k consecutive integers
        std = np.sqrt((k * k - 1) / 12)
        return float((n - (self.min_repeats + self.max_repeats) / 2) / std) if k > 1 else 0.0

    def _sequence(self, rng):
        L, bits = int(rng.integers(self.min_len, self.max_len + 1)), self.bits
        n = int(rng.integers(self.min_repeats, self.max_repeats + 1))
        data = _random_bits(rng, L, bits)
        s = _blank(L + 1 + n * L + 1, self.input_size, self.output_size)
        s.x[:L, :bits] = data
        s.x[L, bits] = 1  # delimiter
        s.x[L, bits + 1] = self.normalised_repeats(n)
        s.target[L + 1:-1, :bits] = np.tile(data, (n, 1))
        s.target[-1, bits] = 1  # end marker
        s.mask[L + 1:] = True
        return s


class Recall(_BitTask):
    """Associative recall (Graves et al. 2014, sec. 4.3): k items, k uniform in
    [min_items, max_items], each `item_size` (3) random vectors of `bits` (6) bits and each
    preceded by a delimiter flag; then a query item, one of the first k - 1, between two query
    flags. The target is the item that followed the query, over the `item_size` steps after
    the second query flag. Input bits + 2 channels (item flag, query flag), output bits. Items
    are distinct, so the answer is unique."""
    name, LENGTH_OPTION = "recall", "max_items"

    def __init__(self, max_items: int = 6, min_items: int = 2, item_size: int = 3,
                 bits: int = 6):
        self._check_range("min_items", min_items, "max_items", max_items)
        _require(min_items >= 2, self.name, "an item must follow the query: min_items >= 2")
        _require(bits >= 1 and item_size >= 1, self.name, "bits and item_size must be >= 1")
        _require(2 ** (bits * item_size) >= max_items, self.name,
                 f"{max_items} distinct items need more than {bits * item_size} bits each")
        self.max_items, self.min_items = int(max_items), int(min_items)
        self.item_size, self.bits = int(item_size), int(bits)
        self.input_size, self.output_size = bits + 2, bits
        self.description = (f"recall the item after the query among {min_items}..{max_items} "
                            f"items of {item_size}x{bits} bits")

    def _sequence(self, rng):
        size, bits = self.item_size, self.bits
        k = int(rng.integers(self.min_items, self.max_items + 1))
        items = _random_bits(rng, k, size, bits)
        while len(np.unique(items.reshape(k, -1), axis=0)) < k:  # rare for the defaults
            items = _random_bits(rng, k, size, bits)
        q = int(rng.integers(0, k - 1))
        query_at = k * (size + 1)  # first query flag
        answer_at = query_at + size + 2
        s = _blank(answer_at + size, self.input_size, self.output_size)
        for i in range(k):
            s.x[i * (size + 1), bits] = 1  # item flag
            s.x[i * (size + 1) + 1:(i + 1) * (size + 1), :bits] = items[i]
        s.x[query_at, bits + 1] = s.x[answer_at - 1, bits + 1] = 1  # query flags
        s.x[query_at + 1:answer_at - 1, :bits] = items[q]
        s.target[answer_at:] = items[q + 1]
        s.mask[answer_at:] = True
        return s


class Sort(_BitTask):
    """Priority sort (Graves et al. 2014, sec. 4.5): `in_count` (20) random `bits`-bit vectors,
    each with a priority U(-1, 1) on an extra input channel, then a delimiter flag; the target
    is the `out_count` (16) vectors of highest priority, highest first. Input bits + 2
    channels (priority, delimiter), output bits; every sequence is in_count + 1 + out_count
    steps, the loss counts the last out_count."""
    name, LENGTH_OPTION = "sort", "in_count"

    def __init__(self, in_count: int = 20, out_count: int | None = None, bits: int = 8):
        out_count = in_count * 4 // 5 if out_count is None else out_count  # 16 of 20
        self._check_range("out_count", out_count, "in_count", in_count)
        _require(bits >= 1, self.name, f"bits must be at least 1, not {bits}")
        self.in_count, self.out_count, self.bits = int(in_count), int(out_count), int(bits)
        self.input_size, self.output_size = bits + 2, bits
        self.description = (f"the {out_count} of {in_count} vectors of {bits} bits with the "
                            f"highest priority, highest first")

    def _sequence(self, rng):
        n, bits = self.in_count, self.bits
        data, priority = _random_bits(rng, n, bits), rng.uniform(-1, 1, n)
        s = _blank(n + 1 + self.out_count, self.input_size, self.output_size)
        s.x[:n, :bits] = data
        s.x[:n, bits] = priority
        s.x[n, bits + 1] = 1  # delimiter
        s.target[n + 1:] = data[np.argsort(-priority)[:self.out_count]]
        s.mask[n + 1:] = True
        return s


# -- character-level language model ---------------------------------------------------------

def default_text() -> str:
    """A selection of 57 of Shakespeare's sonnets (public domain), plain ASCII in modern
    spelling. It was written out from memory, not copied from an edition, so it may differ
    from a critical text in places."""
    return (resources.files("rnndsl") / "data" / "sonnets.txt").read_text(encoding="ascii")


class CharLM(Task):
    """Character-level language modelling (Graves 2013; Karpathy, Johnson & Fei-Fei 2015): at
    each step the input is a character, one-hot over the text's sorted characters, and the
    target is the id of the next one. Sequences are the lines of the text with their newline
    (a line longer than `length` steps is cut into pieces sharing one character, so no
    transition is lost). Batches are bucketed by length: bucket k holds the sequences of
    (1 + spread)^k to (1 + spread)^(k+1) steps; a batch draws a bucket (weighted by its size,
    so every sequence is equally likely) and then its sequences from that bucket, so padding
    is under spread / (1 + spread) of a batch's steps. The baseline is log(vocabulary size),
    the loss of a uniform guess."""
    name, LENGTH_OPTION, head = "charlm", "length", "softmax_step"

    def __init__(self, length: int = 100, path: str | Path | None = None, spread: float = 0.1):
        _require(length >= 1, self.name, f"length must be at least 1, not {length}")
        _require(spread > 0, self.name, f"spread must be positive, not {spread}")
        try:
            text = default_text() if path is None else Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"{self.name}: cannot read the text {path}: "
                             f"{getattr(exc, 'strerror', None) or exc}") from None
        self.length, self.path = int(length), path
        self.vocab = "".join(sorted(set(text)))
        self._index = {c: i for i, c in enumerate(self.vocab)}
        self.input_size = self.output_size = len(self.vocab)
        self.baseline = float(np.log(len(self.vocab)))
        pieces = [line[start:start + self.length + 1]
                  for line in text.splitlines(keepends=True)
                  for start in range(0, len(line) - 1, self.length)]
        _require(bool(pieces), self.name, "the text has no line of two or more characters")
        self.sequences = [self.encode(p) for p in pieces]  # ids; steps = len - 1
        steps = np.array([len(s) - 1 for s in self.sequences])
        key = np.floor(np.log(steps) / np.log1p(spread)).astype(np.int64)
        self.buckets = [np.flatnonzero(key == k) for k in np.unique(key)]
        source = "built-in sonnets" if path is None else str(path)
        self.description = (f"next character of lines of {source} ({len(text)} characters, "
                            f"vocabulary {len(self.vocab)}, at most {length} steps)")

    def encode(self, text: str) -> np.ndarray:
        unknown = sorted(set(text) - set(self._index))
        _require(not unknown, self.name, f"characters not in the vocabulary: {unknown}")
        return np.array([self._index[c] for c in text], dtype=np.int64)

    def decode(self, ids) -> str:
        return "".join(self.vocab[int(i)] for i in ids)

    def sample(self, rng, batch_size, dtype=np.float32):
        sizes = np.array([len(b) for b in self.buckets])
        bucket = self.buckets[rng.choice(len(self.buckets), p=sizes / sizes.sum())]
        picks = rng.choice(bucket, size=batch_size, replace=len(bucket) < batch_size)
        seqs = [self.sequences[i] for i in picks]
        lengths = np.array([len(s) - 1 for s in seqs], dtype=np.int64)
        T = int(lengths.max())
        x = np.zeros((T, batch_size, self.input_size), dtype=dtype)
        target = np.zeros((T, batch_size), dtype=np.int64)
        for b, s in enumerate(seqs):
            n = len(s) - 1
            x[np.arange(n), b, s[:-1]] = 1
            target[:n, b] = s[1:]
        return Batch(x, target, lengths)


TASKS: dict[str, type[Task]] = {cls.name: cls for cls in
                                 (Adding, Copy, RepeatCopy, Recall, Sort, CharLM)}


def make_task(name: str, length: int | None = None, **options) -> Task:
    """The task `name` (one of TASKS) with its options; `length`, if given, sets the task's
    LENGTH_OPTION (adding, charlm: length; copy, repeat_copy: max_len; recall: max_items;
    sort: in_count)."""
    cls = TASKS.get(name)
    if cls is None:
        raise ValueError(f"unknown task {name!r}; tasks: {', '.join(TASKS)}")
    if length is not None:
        if cls.LENGTH_OPTION in options:
            raise ValueError(f"{name}: give length or {cls.LENGTH_OPTION}, not both")
        options[cls.LENGTH_OPTION] = length
    known = inspect.signature(cls).parameters
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(f"{name}: unknown option {', '.join(map(repr, unknown))}; "
                         f"options: {', '.join(known)}")
    return cls(**options)
