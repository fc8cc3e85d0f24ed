"""The CPU time loops on several threads (rnndsl.backend.row_threads): the batch rows cut into
chunks, each chunk's whole time loop on its own thread. Cells of every plan shape run chunked
(even and uneven chunks, one-row chunks, chunks large enough for BLAS) against the NumPy
reference in float64 with NaN in every scratch buffer, and the chunking itself is checked."""
import multiprocessing
import os

import numpy as np
import pytest

import rnndsl
from rnndsl.backend import row_threads
from rnndsl.backend.packed import MICRO_MAX_ROWS
from rnndsl.backend.row_threads import chunk_rows, row_chunks, set_loop_threads
from rnndsl.backend.scratch import nan_scratch

from engines import differences


@pytest.fixture
def threads(monkeypatch):
    """Set the loop threads (and the fewest rows a thread takes) for one test."""
    def use(n, min_rows=row_threads.MIN_ROWS):
        monkeypatch.setattr(row_threads, "MIN_ROWS", min_rows)
        set_loop_threads(n)
    yield use
    set_loop_threads(None)


@pytest.mark.parametrize("B", [0, 1, 3, 4, 7, 8, 9, 16, 33, 100])
@pytest.mark.parametrize("n", [1, 2, 3, 8])
def test_chunks_cover_the_rows(threads, B, n):
    threads(n)
    chunks = row_chunks(B)
    assert chunks[0][0] == 0 and chunks[-1][1] == B
    assert all(a[1] == b[0] for a, b in zip(chunks, chunks[1:]))  # contiguous, in order
    sizes = [b1 - b0 for b0, b1 in chunks]
    assert max(sizes) - min(sizes) <= 1
    assert len(chunks) == max(1, min(n, B // row_threads.MIN_ROWS))
    assert chunk_rows(chunks) == max(sizes)


def test_loop_threads_follow_the_setting_then_blas(threads, monkeypatch):
    monkeypatch.setattr(row_threads, "blas_threads", lambda: 5)
    assert row_threads.loop_threads() == 5
    threads(2)
    assert row_threads.loop_threads() == 2
    monkeypatch.setattr(row_threads, "blas_threads", lambda: None)  # a BLAS it cannot ask
    monkeypatch.setattr(row_threads, "_cores", lambda: 7)
    set_loop_threads(None)
    assert row_threads.loop_threads() == 7


def test_training_sets_the_loop_threads_and_restores_them():
    from rnndsl.training.train import kernel_threads

    set_loop_threads(3)
    try:
        with kernel_threads(1):
            assert row_threads.loop_threads() == 1
        assert row_threads.loop_setting() == 3
    finally:
        set_loop_threads(None)


@pytest.mark.parametrize("bad", [0, -1, 1.5, "2"])
def test_bad_thread_counts_are_refused(bad):
    with pytest.raises(ValueError, match="threads must be a whole number"):
        set_loop_threads(bad)


# lstm, gru (two phases: a product of a value computed in the step), layernorm_lstm (row
# reductions), jordan (a state fed back through the output), and cells with matrix states,
# which run as row kernels (emit_rows.py: per-chunk scratch and matrix states, gradients of
# vector parameters summed over the chunks); B and the thread counts give one-row chunks,
# uneven chunks and even ones.
CASES = [("lstm", 13, 3, 1), ("lstm", 9, 2, 4), ("gru", 7, 7, 1), ("gru", 10, 3, 2),
         ("layernorm_lstm", 11, 2, 1), ("jordan", 5, 4, 1), ("mgu", 12, 5, 2),
         ("peephole_lstm", 8, 2, 4), ("fast_weights", 5, 2, 1), ("delta_net", 7, 3, 1),
         ("mlstm", 4, 4, 1), ("ntm", 5, 2, 1)]


@pytest.mark.parametrize("spec, B, n, min_rows", CASES)
def test_chunked_cells_match_the_reference(threads, spec, B, n, min_rows):
    threads(n, min_rows)
    assert len(row_chunks(B)) > 1
    cpu, ref = rnndsl.compile(spec), rnndsl.compile(spec, target="reference")
    lengths = list(np.random.default_rng(B).integers(0, 7, B))
    lengths[-1], lengths[0] = 0, 6  # an empty sequence in the last chunk, a full one in the first
    with nan_scratch():
        diffs = differences(cpu, ref, 6, B, lengths, seed=B)
    bad = {k: v for k, v in diffs.items() if not v < 1e-10}
    assert not bad, bad


def test_chunks_above_the_micro_kernel_take_blas_on_one_thread(threads, monkeypatch):
    """Two chunks of more rows than the micro-kernel takes: each multiplies through BLAS, with
    BLAS on one thread during the loop and its setting back afterwards."""
    threads(2)
    B = 2 * MICRO_MAX_ROWS + 6
    assert chunk_rows(row_chunks(B)) > MICRO_MAX_ROWS
    seen, setting = [], [3]

    def fake_blas_threads(n=None):
        if n is not None:
            setting[0] = n
            seen.append(n)
        return setting[0]
    monkeypatch.setattr(row_threads, "blas_threads", fake_blas_threads)
    cpu, ref = rnndsl.compile("lstm"), rnndsl.compile("lstm", target="reference")
    with nan_scratch():
        diffs = differences(cpu, ref, 4, B, None, seed=1)
    assert max(diffs.values()) < 1e-10, diffs
    assert 1 in seen and setting[0] == 3


def test_small_elementwise_passes_keep_to_one_chunk(threads):
    threads(2)
    assert len(row_chunks(16)) == 2  # a pass with per-step products
    assert len(row_chunks(16, row_threads.SMALL_WORK // 16 - 1)) == 1
    assert len(row_chunks(16, row_threads.SMALL_WORK // 16)) == 2


@pytest.mark.parametrize("spec, chunked", [("indrnn", False), ("lstm", True)])
def test_loops_without_a_per_step_product_run_in_one_chunk(threads, monkeypatch, spec, chunked):
    """IndRNN's loops (elementwise work only) keep to one thread, forward and backward; the
    LSTM's (a recurrent product each step) split; both match the reference."""
    threads(2)
    cpu, ref = rnndsl.compile(spec), rnndsl.compile(spec, target="reference")
    module = cpu.engine.module(np.dtype(np.float64))
    seen = []
    monkeypatch.setattr(module, "run_rows", lambda kernel, T, chunks, *rest: (
        seen.append(len(chunks)), row_threads.run_rows(kernel, T, chunks, *rest)))
    with nan_scratch():
        diffs = differences(cpu, ref, 5, 16, [5, 0, 3] + [5] * 13, seed=3)
    assert max(diffs.values()) < 1e-10, diffs
    assert seen and set(seen) == ({2} if chunked else {1})


def test_a_chunk_left_out_is_caught(threads, monkeypatch):
    """The check above fails if the runner skips a chunk (its rows stay NaN)."""
    threads(3, 1)
    cpu, ref = rnndsl.compile("gru"), rnndsl.compile("gru", target="reference")
    module = cpu.engine.module(np.dtype(np.float64))
    monkeypatch.setattr(module, "run_rows", lambda kernel, T, chunks, *rest: (
        row_threads.run_rows(kernel, T, chunks[:-1], *rest)))
    with nan_scratch(), np.errstate(all="ignore"):
        diffs = differences(cpu, ref, 4, 6, None, seed=2)
    assert not max(diffs.values()) < 1e-10


def _forward_in_child(queue):
    cell = rnndsl.compile("gru")
    params = cell.init_params(seed=0, input=3, hidden=4)
    x = np.random.default_rng(0).standard_normal((5, 8, 3))
    queue.put(float(np.sum(cell.forward(params, {"x": x}).outputs["h"])))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork is POSIX only")
def test_a_forked_child_runs_chunked_loops(threads):
    """A forked child has no pool threads: it makes its own instead of waiting forever."""
    threads(2, 1)
    _forward_in_child(parent := multiprocessing.get_context("fork").SimpleQueue())
    expected = parent.get()  # the parent's pool now has a thread
    ctx = multiprocessing.get_context("fork")
    queue = ctx.SimpleQueue()
    child = ctx.Process(target=_forward_in_child, args=(queue,))
    child.start()
    child.join(60)
    assert child.exitcode == 0
    assert queue.get() == pytest.approx(expected, rel=1e-12)
