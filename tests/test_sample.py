"""Generation from a trained character-level language model (rnndsl.training.sample, `rnndsl sample`):
a model trained briefly on a text of three phrases writes them back; the same seed gives the
same text; bad checkpoints and options exit 2 with a message naming them."""
import random

import numpy as np
import pytest
from typer.testing import CliRunner

from rnndsl.cli import app
from rnndsl.training.sample import next_token
from rnndsl.training.train import TrainConfig, train

PHRASES = ["the quick brown fox\n", "jumps over\n", "the lazy dog\n"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A GRU trained for 150 steps (a few seconds) on lines drawn from PHRASES."""
    folder = tmp_path_factory.mktemp("charlm")
    text = folder / "phrases.txt"
    rng = random.Random(0)
    text.write_text("".join(rng.choice(PHRASES) for _ in range(200)))
    ckpt = folder / "lm.npz"
    config = TrainConfig(spec="gru", task="charlm", text=str(text), hidden=32, steps=150,
                         lr=1e-2, log_every=50)
    train(config, save=ckpt, save_every=0)
    untrained = folder / "untrained.npz"
    train(TrainConfig(**{**config.__dict__, "steps": 1, "lr": 1e-9}), save=untrained)
    return ckpt, untrained


def sample(*args):
    result = CliRunner().invoke(app, ["sample", *map(str, args)])
    return result.exit_code, result.output


def test_a_trained_model_writes_its_phrases_back(trained):
    ckpt, untrained = trained
    code, out = sample(ckpt, "--prompt", "jum", "--length", "40", "--temperature", "0.3")
    assert code == 0, out
    assert out.startswith("jumps over\n")  # the prompt, then the model's completion
    lines = out.split("\n")[1:-2]  # whole lines written from a fresh start
    assert lines and all(line + "\n" in PHRASES for line in lines), out
    code, out = sample(untrained, "--prompt", "jum", "--length", "40", "--temperature", "0.3")
    assert code == 0 and not out.startswith("jumps over\n"), out  # the test can fail


def test_same_seed_same_text_other_seed_other_text(trained):
    ckpt, _ = trained
    runs = [sample(ckpt, "--length", "80", "--seed", s, "--top-k", "3") for s in (5, 5, 6)]
    assert all(code == 0 for code, _ in runs)
    assert runs[0][1] == runs[1][1] != runs[2][1]
    assert len(runs[0][1]) == 80 + 1  # 80 characters and the final newline


def test_top_k_one_is_the_most_likely_token():
    logp = np.log(np.array([0.1, 0.5, 0.3, 0.1]))
    rng = np.random.default_rng(0)
    assert {next_token(logp, rng, top_k=1) for _ in range(20)} == {1}
    # temperature -> 0 concentrates on the most likely, a high one spreads out
    assert {next_token(logp, rng, temperature=1e-3) for _ in range(20)} == {1}
    assert len({next_token(logp, rng, temperature=50.0) for _ in range(200)}) == 4


def test_bad_checkpoints_and_options_exit_2(trained, tmp_path):
    ckpt, _ = trained
    other = tmp_path / "adding.npz"
    train(TrainConfig(task="adding", length=5, hidden=4, steps=1), save=other)
    bidi = tmp_path / "bidi.npz"
    train(TrainConfig(task="charlm", length=5, hidden=4, steps=1, bidirectional="concat",
                      eval_batch=2), save=bidi)
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a checkpoint")
    for args, message in [((other,), "task 'adding'"),
                          ((bidi,), "bidirectional"),
                          ((garbage,), "not a readable checkpoint"),
                          ((tmp_path / "missing.npz",), "does not exist"),
                          ((ckpt, "--temperature", "0"), "temperature must be"),
                          ((ckpt, "--temperature", "nan"), "temperature must be"),
                          ((ckpt, "--top-k", "0"), "top-k"),
                          ((ckpt, "--prompt", "xyz\x1b"), "not in the vocabulary")]:
        code, out = sample(*args)
        assert code == 2, (args, out)
        assert message in out and "Traceback" not in out and "\x1b" not in out, (args, out)


def test_a_checkpoint_whose_text_changed_is_refused(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("abc abc\n" * 20)
    ckpt = tmp_path / "lm.npz"
    train(TrainConfig(task="charlm", text=str(text), hidden=4, steps=1, eval_batch=2), save=ckpt)
    text.write_text("abcd abcd\n" * 20)
    code, out = sample(ckpt)
    assert code == 2 and "the text changed since training" in out, out
