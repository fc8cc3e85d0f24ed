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
| reverse | seq2seq | reverse and map a letter sequence (encoder-decoder; exact match) |
| dates | seq2seq | ISO dates to words, 1987-04-23 -> 23 april 1987 (encoder-decoder) |
| expand | vector2seq | write symbols as often as a vector of counts says (one-to-many) |

`make_task(name, length, **options)` builds one; `length` sets each task's main size (the
sequence length, the longest sequence, the number of items; see LENGTH_OPTION).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from datetime import date
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
    MIN_OPTION: str | None = None  # the lower end of a range of lengths, if the task draws one
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
    MIN_OPTION = "min_len"

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
    MIN_OPTION = "min_len"

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
    MIN_OPTION = "min_items"

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


# -- sequence-generating tasks: a decoder writes the target (rnndsl.training.seq2seq) -----------------

def _is_held_out(key: tuple) -> bool:
    """One input in five belongs to the held-out part, by a fixed hash of the input itself, so
    the evaluation inputs never occur in training (Python's own hash of str is salted)."""
    h = 0
    for v in key:
        h = (h * 1_000_003 + int(v) + 1) % 2_147_483_647
    return h % 5 == 0


class _TokenTask(Task):
    """A task whose target is a token sequence written by a decoder: a source sequence for an
    encoder-decoder ("seq2seq"), or a vector for a conditioned decoder ("vector2seq"). Targets
    end with the token EOS (id 0). `sample` draws from the training part, `sample_held_out`
    from the held-out part: inputs with `_is_held_out`, never seen in training. The baseline
    is the loss of a uniform guess over the target vocabulary."""
    EOS = 0
    target_chars: str  # the characters of the target ids 1..; id 0 is EOS

    def sample(self, rng, batch_size, dtype=np.float32):
        return self._batch(rng, batch_size, dtype, held_out=False)

    def sample_held_out(self, rng, batch_size, dtype=np.float32):
        return self._batch(rng, batch_size, dtype, held_out=True)

    def _draw(self, rng) -> tuple:
        """One input (a tuple: source ids, or the vector's entries)."""
        raise NotImplementedError

    def _pairs(self, rng, batch_size, held_out):
        pairs = []
        while len(pairs) < batch_size:
            key = self._draw(rng)
            if _is_held_out(key) == held_out:
                pairs.append((key, self.answer(key)))
        return pairs

    @staticmethod
    def _targets(answers) -> tuple[np.ndarray, np.ndarray]:
        lengths = np.array([len(a) + 1 for a in answers], dtype=np.int64)  # + EOS
        target = np.zeros((int(lengths.max()), len(answers)), dtype=np.int64)  # EOS-padded
        for b, a in enumerate(answers):
            target[:len(a), b] = a
        return target, lengths

    def decode(self, ids) -> str:
        return "".join(self.target_chars[int(i) - 1] for i in ids if int(i) != self.EOS)


class Reverse(_TokenTask):
    """Reverse and map (a small translation): the source is 1..`length` letters from the first
    `symbols` of a-z; the target is the same letters in reverse order, each shifted `shift`
    places on in the alphabet and in capitals (abc -> FED). Every target token depends on the
    whole source, in the opposite order: the task of Sutskever et al.'s source reversal."""
    name, LENGTH_OPTION, head = "reverse", "length", "seq2seq"

    def __init__(self, length: int = 8, min_len: int = 1, symbols: int = 8, shift: int = 3):
        _require(1 <= min_len <= length, self.name,
                 f"need 1 <= min_len <= length, got {min_len}, {length}")
        _require(2 <= symbols <= 26 - shift and 0 <= shift, self.name,
                 f"need 2 <= symbols and symbols + shift <= 26, got {symbols}, {shift}")
        self.length, self.min_len, self.symbols = int(length), int(min_len), int(symbols)
        self.source_chars = "abcdefghijklmnopqrstuvwxyz"[:symbols]
        self.target_chars = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[shift:shift + symbols]
        self.input_size, self.output_size = symbols, symbols + 1
        self.baseline = float(np.log(self.output_size))
        self.description = (f"reverse {min_len}..{length} letters of {self.source_chars} and "
                            f"shift each {shift} on, in capitals")

    def _draw(self, rng):
        n = int(rng.integers(self.min_len, self.length + 1))
        return tuple(int(a) for a in rng.integers(0, self.symbols, n))

    @staticmethod
    def answer(key):
        return [a + 1 for a in reversed(key)]

    def encode(self, text: str) -> np.ndarray:
        unknown = sorted(set(text) - set(self.source_chars))
        _require(not unknown, self.name, f"characters not in the source alphabet "
                                         f"{self.source_chars}: {unknown}")
        return np.array([self.source_chars.index(c) for c in text], dtype=np.int64)

    def _batch(self, rng, batch_size, dtype, held_out):
        from rnndsl.training.seq2seq import Seq2SeqBatch

        pairs = self._pairs(rng, batch_size, held_out)
        src_len = np.array([len(k) for k, _ in pairs], dtype=np.int64)
        source = np.zeros((int(src_len.max()), batch_size), dtype=np.int64)
        for b, (k, _) in enumerate(pairs):
            source[:len(k), b] = k
        target, lengths = self._targets([a for _, a in pairs])
        return Seq2SeqBatch(source, src_len, target, lengths)


MONTHS = ("january", "february", "march", "april", "may", "june", "july", "august",
          "september", "october", "november", "december")


class Dates(_TokenTask):
    """Dates between written formats (a small character-level translation): the source is a
    date as ISO 8601 writes it, `1987-04-23`, the target the same date in words and numbers,
    `23 april 1987`, one character per token. Dates are uniform over `years` years from 1950
    (all 36524 days of 1950-2049 by default)."""
    name, LENGTH_OPTION, head = "dates", "years", "seq2seq"

    def __init__(self, years: int = 100):
        _require(1 <= years <= 8049, self.name, f"years must be in 1..8049, not {years}")
        self.years = int(years)
        self.first = date(1950, 1, 1).toordinal()
        self.days = date(1950 + self.years - 1, 12, 31).toordinal() - self.first + 1
        self.source_chars = "0123456789-"
        self.target_chars = "".join(sorted(set("0123456789 " + "".join(MONTHS))))
        self.input_size, self.output_size = len(self.source_chars), len(self.target_chars) + 1
        self.baseline = float(np.log(self.output_size))
        self.description = (f"ISO dates of {1950}-{1950 + self.years - 1} to words: "
                            f"1987-04-23 -> 23 april 1987")

    def _draw(self, rng):
        day = date.fromordinal(self.first + int(rng.integers(0, self.days)))
        return tuple(self.source_chars.index(c) for c in day.isoformat())

    def answer(self, key):
        day = date.fromisoformat("".join(self.source_chars[i] for i in key))
        text = f"{day.day} {MONTHS[day.month - 1]} {day.year}"
        return [self.target_chars.index(c) + 1 for c in text]

    def encode(self, text: str) -> np.ndarray:
        try:
            date.fromisoformat(text)
            ok = len(text) == 10
        except ValueError:
            ok = False
        _require(ok, self.name, f"give a date as YYYY-MM-DD, e.g. 1987-04-23, not {text!r}")
        return np.array([self.source_chars.index(c) for c in text], dtype=np.int64)

    _batch = Reverse._batch


class Expand(_TokenTask):
    """One-to-many: the input is a vector of `symbols` counts, each 0..`length`, scaled to
    [0, 1]; the target writes each symbol as many times as its count, in order: (2, 0, 1) ->
    AAC. A decoder sees the vector only as its initial state or as an extra input (the image
    code of a captioning model). Vectors of all zeros have the empty target."""
    name, LENGTH_OPTION, head = "expand", "length", "vector2seq"

    def __init__(self, length: int = 3, symbols: int = 4):
        _require(length >= 1, self.name, f"length must be at least 1, not {length}")
        _require(1 <= symbols <= 26, self.name, f"symbols must be in 1..26, not {symbols}")
        self.length, self.symbols = int(length), int(symbols)
        self.target_chars = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[:symbols]
        self.input_size, self.output_size = symbols, symbols + 1
        self.baseline = float(np.log(self.output_size))
        self.description = (f"write each of {symbols} symbols as often as its count "
                            f"(0..{length}) in the input vector says")

    def _draw(self, rng):
        return tuple(int(c) for c in rng.integers(0, self.length + 1, self.symbols))

    @staticmethod
    def answer(key):
        return [i + 1 for i, count in enumerate(key) for _ in range(count)]

    def encode(self, text: str) -> np.ndarray:
        """The vector of counts given as numbers separated by spaces or commas."""
        try:
            counts = [int(v) for v in text.replace(",", " ").split()]
        except ValueError:
            counts = []
        _require(len(counts) == self.symbols and all(0 <= c <= self.length for c in counts),
                 self.name, f"give {self.symbols} counts in 0..{self.length}, e.g. "
                            f"{' '.join(['1'] * self.symbols)}")
        return np.array(counts, dtype=np.int64)

    def _batch(self, rng, batch_size, dtype, held_out):
        from rnndsl.training.seq2seq import Seq2SeqBatch

        pairs = self._pairs(rng, batch_size, held_out)
        target, lengths = self._targets([a for _, a in pairs])
        vector = np.array([k for k, _ in pairs], dtype=dtype) / self.length
        return Seq2SeqBatch(None, None, target, lengths, vector)


TASKS: dict[str, type[Task]] = {cls.name: cls for cls in
                                 (Adding, Copy, RepeatCopy, Recall, Sort, CharLM, Reverse, Dates,
                                  Expand)}
SEQUENCE_TASKS = ("reverse", "dates", "expand")  # a decoder writes the target: rnndsl.training.seq2seq


def make_task(name: str, length: int | None = None, exact: bool = False, **options) -> Task:
    """The task `name` (one of TASKS) with its options; `length`, if given, sets the task's
    LENGTH_OPTION (adding, charlm: length; copy, repeat_copy: max_len; recall: max_items;
    sort: in_count; reverse: the longest source; dates: years; expand: the largest count);
    with `exact`, every sequence has that length (copy, repeat_copy, recall draw lengths from a
    range, whose lower end MIN_OPTION is then set too)."""
    cls = TASKS.get(name)
    if cls is None:
        raise ValueError(f"unknown task {name!r}; tasks: {', '.join(TASKS)}")
    if length is not None:
        if cls.LENGTH_OPTION in options:
            raise ValueError(f"{name}: give length or {cls.LENGTH_OPTION}, not both")
        options[cls.LENGTH_OPTION] = length
        if exact and cls.MIN_OPTION is not None:
            options[cls.MIN_OPTION] = length
    known = inspect.signature(cls).parameters
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(f"{name}: unknown option {', '.join(map(repr, unknown))}; "
                         f"options: {', '.join(known)}")
    return cls(**options)
