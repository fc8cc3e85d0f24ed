"""The neural history compressor (rnndsl.training.compressor): exact reconstruction from the compressed
form, the fraction passed up at each level, and the long-lag result: with predictable filler
the two-level compressor learns to predict the remembered symbol where a flat LSTM given as
many training steps stays at chance."""
import numpy as np
import pytest

import rnndsl
from rnndsl.training.compressor import (HistoryCompressor, end_predicted, filler_sequences,
                               train_level)

LOW, HIGH = 20, 40  # filler lengths


def sample(rng):
    return filler_sequences(rng, 16, LOW, HIGH)


@pytest.fixture(scope="module")
def trained():
    """Level 0 for 200 steps, then level 1 for 100: a few seconds."""
    model = HistoryCompressor(rnndsl.compile("lstm"), 8, 16, levels=2)
    params = model.init_params(0)
    untrained = {k: v.copy() for k, v in params.items()}
    train_level(model, params, 0, sample, 200)
    after_level0 = {k: v.copy() for k, v in params.items()}
    train_level(model, params, 1, sample, 100)
    return model, untrained, after_level0, params


def held_out():
    return filler_sequences(np.random.default_rng(99), 100, LOW, HIGH)


def test_filler_sequences():
    for s in held_out():
        n = len(s) - 3
        assert LOW <= n <= HIGH and s[0] == s[-1] < 4 and s[-2] == 7
        assert s[1:-2] == [4 + i % 3 for i in range(n)]


def test_the_compressed_form_rebuilds_the_sequence_exactly(trained):
    model, untrained, _, params = trained
    seqs = held_out()
    for p in (untrained, params):  # many symbols kept, and few
        packed = model.compress(p, seqs)
        assert model.decompress(p, packed) == seqs
    # trained, the top level keeps about one symbol of each 23-43, the first: the rest is
    # rebuilt by prediction (and the time stamps of what level 0 passed up)
    assert packed.size() <= 1.1 * len(seqs)
    # a damaged compressed form rebuilds something else: the rebuild reads what is kept
    packed.symbols[0][0] = (packed.symbols[0][0] + 1) % 4
    assert model.decompress(params, packed)[0] != seqs[0]


def test_fraction_passed_up_at_each_level(trained):
    model, untrained, after_level0, params = trained
    seqs = held_out()
    total = sum(map(len, seqs))
    level0, level1 = model.passed_up(model.compress(params, seqs))
    # level 0 predicts the filler: it passes up the first symbol, the marker (which comes
    # after a random length) and the last symbol unless it guessed it; level 1, in whose
    # shorter sequence the marker always follows the first symbol, passes up the first alone
    assert 2 * len(seqs) <= level0 * total <= 3 * len(seqs)
    assert level1 * level0 * total <= 1.1 * len(seqs)
    assert model.passed_up(model.compress(after_level0, seqs))[1] > 0.5  # before training
    assert model.passed_up(model.compress(untrained, seqs))[0] > 0.5


def test_long_lag_compressor_learns_where_a_flat_lstm_does_not(trained):
    model, untrained, after_level0, params = trained
    seqs = held_out()
    assert end_predicted(model, untrained, seqs) < 0.6
    assert end_predicted(model, params, seqs) >= 0.95
    flat = HistoryCompressor(rnndsl.compile("lstm"), 8, 16, levels=1)
    flat_params = flat.init_params(0)
    train_level(flat, flat_params, 0, sample, 300)  # as many steps as both levels had
    assert end_predicted(flat, flat_params, seqs) < 0.6


def test_a_level_with_nothing_to_predict_has_zero_loss():
    model = HistoryCompressor(rnndsl.compile("lstm"), 8, 4, levels=2)
    params = model.init_params(0)
    loss, _, grads = model.level_loss(params, 1, [[3], [1]])
    assert loss == 0 and set(grads) == {p for p in params if p.startswith("level1.")}
    assert not any(g.any() for g in grads.values())
