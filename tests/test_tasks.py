"""Tasks: shapes, determinism, padding and masks, and that each target is what the task says."""
import numpy as np
import pytest

from rnndsl.training.heads import Head
from rnndsl.training.optim import Adam, check_finite, clip_global_norm
from rnndsl.training.tasks import SEQUENCE_TASKS, TASKS, CharLM, default_text, make_task

NAMES = sorted(set(TASKS) - set(SEQUENCE_TASKS))  # those read by a head (tests/test_seq2seq.py)


def sample(name, seed=0, batch_size=16, dtype=np.float32, **options):
    task = make_task(name, **options)
    return task, task.sample(np.random.default_rng(seed), batch_size, dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", NAMES)
def test_shapes_dtypes_and_padding(name, dtype):
    task, batch = sample(name, dtype=dtype)
    T, B, n_in = batch.x.shape
    assert B == 16 and n_in == task.input_size and batch.x.dtype == dtype
    assert batch.lengths.shape == (B,) and batch.lengths.dtype == np.int64
    assert batch.lengths.max() == T and batch.lengths.min() >= 1
    padding = np.arange(T)[:, None] >= batch.lengths
    assert np.all(batch.x[padding] == 0)
    if batch.mask is not None:
        assert batch.mask.shape == (T, B) and batch.mask.dtype == bool
        assert not batch.mask[padding].any() and batch.mask.any(axis=0).all()
    # the batch is what the task's head reads
    head = Head(task.head, 5, task.output_size)
    params = head.init_params(np.random.default_rng(1), dtype)
    y = np.random.default_rng(2).standard_normal((T, B, 5)).astype(dtype)
    res = head.loss(params, y, batch.target, batch.lengths, batch.mask)
    assert np.isfinite(res.loss)
    if task.head.endswith("_step"):
        assert batch.target.shape[:2] == (T, B)
        assert np.all(batch.target[padding] == 0)
    expect = np.int64 if task.head.startswith("softmax") else dtype
    assert batch.target.dtype == expect
    assert task.baseline is not None and task.description


@pytest.mark.parametrize("name", NAMES)
def test_determined_by_the_generator(name):
    task = make_task(name)
    one, two = (task.sample(np.random.default_rng(7), 8) for _ in range(2))
    other = task.sample(np.random.default_rng(8), 8)
    for field in ("x", "target", "lengths", "mask"):
        a, b = getattr(one, field), getattr(two, field)
        assert (a is None and b is None) or np.array_equal(a, b), field
    assert one.x.shape != other.x.shape or not np.array_equal(one.x, other.x)


def test_adding():
    task, batch = sample("adding", batch_size=20000, length=12)
    x = batch.x.astype(np.float64)
    assert batch.x.shape == (12, 20000, 2) and np.all(batch.lengths == 12)
    marks = x[:, :, 1]
    assert np.all(marks.sum(0) == 2) and np.all(marks[:6].sum(0) == 1)  # one in each half
    values = x[:, :, 0]
    assert values.min() >= 0 and values.max() < 1
    np.testing.assert_allclose(batch.target[:, 0], (values * marks).sum(0), rtol=1e-6)
    # always answering 1 scores the baseline: Var(u1 + u2) = 1/6
    assert np.mean((batch.target - 1) ** 2) == pytest.approx(task.baseline, abs=0.006)
    assert task.baseline == pytest.approx(1 / 6)
    assert batch.mask is None and task.head == "mse_last"


def test_copy():
    task, batch = sample("copy", batch_size=32, length=7, min_len=2, bits=5)
    bits = 5
    assert (task.input_size, task.output_size) == (6, 5)
    for b, n in enumerate(batch.lengths):
        L = (n - 1) // 2
        assert n == 2 * L + 1 and 2 <= L <= 7
        x, y = batch.x[:n, b], batch.target[:n, b]
        np.testing.assert_array_equal(y[L + 1:], x[:L, :bits])  # the target is the input
        assert np.all(x[:, bits] == (np.arange(n) == L))  # delimiter at step L only
        assert np.all(x[L:, :bits] == 0) and np.all(y[:L + 1] == 0)
        np.testing.assert_array_equal(batch.mask[:, b], (np.arange(len(batch.mask)) > L)
                                      & (np.arange(len(batch.mask)) < n))
    assert set(np.unique(batch.x[..., :bits])) == {0.0, 1.0}
    assert len(set(batch.lengths)) > 1  # lengths vary


def test_repeat_copy():
    task, batch = sample("repeat_copy", batch_size=32, length=4, max_repeats=3, bits=3)
    bits = 3
    assert (task.input_size, task.output_size) == (5, 4)
    seen = set()
    for b, n in enumerate(batch.lengths):
        x, y = batch.x[:n, b], batch.target[:n, b]
        (L,) = np.flatnonzero(x[:, bits])  # the delimiter step
        codes = [task.normalised_repeats(k) for k in (1, 2, 3)]
        repeats = 1 + int(np.argmin(np.abs(np.array(codes) - x[L, bits + 1])))
        assert x[L, bits + 1] == pytest.approx(codes[repeats - 1])
        seen.add(repeats)
        assert n == L + 1 + repeats * L + 1
        np.testing.assert_array_equal(y[L + 1:-1, :bits], np.tile(x[:L, :bits], (repeats, 1)))
        assert np.all(y[:, bits] == (np.arange(n) == n - 1))  # end marker on the last step only
        assert np.all(batch.mask[:n, b] == (np.arange(n) > L))
    assert seen == {1, 2, 3}
    codes = [task.normalised_repeats(k) for k in (1, 2, 3)]
    assert np.mean(codes) == pytest.approx(0) and np.var(codes) == pytest.approx(1)


def test_recall():
    task, batch = sample("recall", batch_size=32)
    bits, size = 6, 3
    assert (task.input_size, task.output_size) == (8, 6)
    for b, n in enumerate(batch.lengths):
        x, y, mask = batch.x[:n, b], batch.target[:n, b], batch.mask[:n, b]
        item_flags, query_flags = np.flatnonzero(x[:, bits]), np.flatnonzero(x[:, bits + 1])
        k = len(item_flags)
        assert 2 <= k <= 6 and np.array_equal(item_flags, np.arange(k) * (size + 1))
        items = [x[f + 1:f + 1 + size, :bits] for f in item_flags]
        assert len({i.tobytes() for i in items}) == k  # distinct
        first, second = query_flags
        assert first == k * (size + 1) and second == first + size + 1
        query = x[first + 1:second, :bits]
        (q,) = [i for i, item in enumerate(items) if np.array_equal(item, query)]
        assert q < k - 1
        np.testing.assert_array_equal(y[second + 1:], items[q + 1])
        assert n == second + 1 + size
        assert np.all(mask == (np.arange(n) > second)) and np.all(y[:second + 1] == 0)


def test_sort():
    task, batch = sample("sort", batch_size=16)
    bits, n_in, n_out = 8, 20, 16
    assert batch.x.shape[0] == n_in + 1 + n_out and np.all(batch.lengths == 37)
    for b in range(16):
        x, y = batch.x[:, b], batch.target[:, b]
        priority = x[:n_in, bits]
        assert priority.min() >= -1 and priority.max() <= 1
        order = np.argsort(-priority)[:n_out]
        np.testing.assert_array_equal(y[n_in + 1:], x[order, :bits])
        assert np.all(np.diff(priority[order]) < 0)  # strictly highest first
        assert np.all(x[:, bits + 1] == (np.arange(37) == n_in))
        assert np.all(batch.mask[:, b] == (np.arange(37) > n_in))
    assert make_task("sort", 10).out_count == 8
    assert make_task("sort", in_count=5, out_count=5).output_size == 8


def test_charlm_targets_are_the_next_characters():
    task, batch = sample("charlm", batch_size=8)
    assert task.head == "softmax_step" and task.baseline == pytest.approx(np.log(len(task.vocab)))
    assert task.vocab == "".join(sorted(set(default_text())))
    lines = set(default_text().splitlines(keepends=True))
    for b, n in enumerate(batch.lengths):
        x = batch.x[:n, b]
        assert np.all(x.sum(-1) == 1)  # one-hot
        inputs, targets = task.decode(x.argmax(-1)), task.decode(batch.target[:n, b])
        assert inputs[1:] == targets[:-1]
        assert inputs + targets[-1] in lines  # a whole line, newline included
    ids = task.encode("Shall I compare thee")
    assert task.decode(ids) == "Shall I compare thee" and ids.dtype == np.int64
    with pytest.raises(ValueError, match=r"not in the vocabulary: \['\\t', '~'\]"):
        task.encode("~\t")


def padding(batch):
    return 1 - batch.lengths.sum() / batch.lengths.max() / len(batch.lengths)


def test_charlm_buckets_keep_padding_small():
    task = make_task("charlm")  # spread 0.1
    rng = np.random.default_rng(0)
    batches = [task.sample(rng, 32) for _ in range(50)]
    assert max(padding(b) for b in batches) < 0.1 / 1.1
    assert np.mean([padding(b) for b in batches]) < 0.05
    # one bucket for every length pads a lot more
    whole = make_task("charlm", spread=100)
    assert len(whole.buckets) == 1
    assert np.mean([padding(whole.sample(rng, 32)) for _ in range(10)]) > 0.15


def test_charlm_own_text_and_length_cap(tmp_path):
    text = "abcdefghij\nshort\n\nxy\n"
    path = tmp_path / "tiny.txt"
    path.write_text(text)
    task = make_task("charlm", length=4, path=path)
    assert task.vocab == "\nabcdefghijorstxy" and task.input_size == 17
    pieces = sorted(task.decode(s) for s in task.sequences)
    # "abcdefghij\n" cut into pieces of at most 5 characters sharing their ends
    assert pieces == sorted(["abcde", "efghi", "ij\n", "short", "t\n", "xy\n"])
    batch = task.sample(np.random.default_rng(0), 6)
    assert batch.lengths.max() <= 4 and batch.x.shape[2] == 17
    assert isinstance(make_task("charlm", path=str(path)), CharLM)


def test_default_text_is_ascii_and_mid_sized():
    text = default_text()
    assert text.isascii() and 20_000 <= len(text.encode()) <= 60_000


def test_make_task_errors():
    with pytest.raises(ValueError, match="unknown task 'cpy'; tasks: adding, copy, repeat_copy, "
                                         "recall, sort, charlm"):
        make_task("cpy")
    with pytest.raises(ValueError, match=r"copy: unknown option 'bitz'; options: max_len"):
        make_task("copy", bitz=4)
    with pytest.raises(ValueError, match="give length or max_len, not both"):
        make_task("copy", 10, max_len=12)
    with pytest.raises(ValueError, match="copy: need 1 <= min_len <= max_len"):
        make_task("copy", 3, min_len=5)
    with pytest.raises(ValueError, match="min_items >= 2"):
        make_task("recall", min_items=1)
    with pytest.raises(ValueError, match="adding: length must be at least 2"):
        make_task("adding", 1)
    assert make_task("copy", 5).max_len == 5 and make_task("recall", 4).max_items == 4


def test_head_and_optimizer_learn_bigrams_of_charlm():
    """The pieces compose: a softmax head read straight off the one-hot input, trained with
    Adam, learns which character follows which, well below the uniform baseline."""
    task, rng = make_task("charlm"), np.random.default_rng(0)
    head = Head(task.head, task.input_size, task.output_size)
    params, opt, losses = head.init_params(rng, np.float32), Adam(0.05), []
    for step in range(150):
        batch = task.sample(rng, 32)
        res = head.loss(params, batch.x, batch.target, batch.lengths, batch.mask)
        check_finite(step, res.loss, res.grads)
        clip_global_norm(res.grads, 5.0)
        opt.step(params, res.grads)
        losses.append(res.loss)
    assert losses[0] == pytest.approx(task.baseline, abs=0.2)
    assert np.mean(losses[-20:]) < 3.0
