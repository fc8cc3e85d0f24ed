"""Encoder-decoder and vector-to-sequence models (rnndsl.training.seq2seq): every gradient against
central differences on tiny float64 models with ragged lengths; beam search against an
exhaustive search; decoding one step at a time against the teacher-forced pass; bad
combinations refused by name."""
import functools
import itertools

import numpy as np
import pytest

import rnndsl
from rnndsl.training.layers import Network
from rnndsl.training.seq2seq import Seq2Seq, Seq2SeqBatch, VectorToSequence

SRC, TGT, H = 5, 4, 3  # source vocabulary, target vocabulary (eos = 0), hidden size


@functools.cache
def cells(name):
    return rnndsl.compile(name)


def ragged_batch(rng, vector_size=None):
    """Four sequences; source lengths 4, 2, 0, 3 and target lengths 1 (eos alone) to 4, the
    padding filled with ids that must not matter."""
    src_len, tgt_len = np.array([4, 2, 0, 3]), np.array([3, 1, 4, 2])
    source = rng.integers(0, SRC, (4, 4))
    target = rng.integers(1, TGT, (4, 4))
    target[tgt_len - 1, np.arange(4)] = 0  # eos
    vector = None if vector_size is None else rng.standard_normal((4, vector_size))
    return Seq2SeqBatch(source, src_len, target, tgt_len, vector)


def perturbed(model, seed=0):
    rng = np.random.default_rng(seed)
    return {k: v + 0.3 * rng.standard_normal(v.shape)  # off the init: no symmetry hides
            for k, v in model.init_params(seed=seed, dtype=np.float64).items()}


def check_gradients(model, params, batch, picks=2):
    loss, _, grads = model.loss(params, batch)
    assert set(grads) == set(params)
    rng = np.random.default_rng(3)
    eps = 1e-6
    for name, arr in params.items():
        assert grads[name].shape == arr.shape, name
        flat = arr.reshape(-1)
        for k in rng.choice(flat.size, size=min(picks, flat.size), replace=False):
            keep = flat[k]
            flat[k] = keep + eps
            up = model.loss(params, batch, grads=False)[0]
            flat[k] = keep - eps
            down = model.loss(params, batch, grads=False)[0]
            flat[k] = keep
            numeric = (up - down) / (2 * eps)
            derived = grads[name].reshape(-1)[k]
            assert abs(derived - numeric) <= 1e-6 * max(1.0, abs(numeric)), \
                (name, k, derived, numeric)


@pytest.mark.parametrize("enc,dec,layers,dec_layers,bidirectional", [
    ("lstm", "gru", 2, 1, "concat"),      # bridge projects [h_fwd, h_bwd] to h
    ("gru", "lstm", 1, 2, None),          # one encoder h feeds both h and c, copied
    ("elman", "lstm", 2, 2, "separate"),  # per layer, both streams' final states
])
def test_seq2seq_gradients_match_finite_differences(enc, dec, layers, dec_layers,
                                                    bidirectional):
    model = Seq2Seq(Network(cells(enc), SRC, H, layers, bidirectional),
                    Network(cells(dec), TGT + 1, H, dec_layers), TGT)
    if bidirectional:
        assert any(name.startswith("bridge.") for name in model.param_shapes())
    else:
        assert not any(name.startswith("bridge.") for name in model.param_shapes())
    check_gradients(model, perturbed(model), ragged_batch(np.random.default_rng(1)))


CUSTOM = """name: custom
sizes: [input, hidden]
inputs: {x: input}
states: {h: hidden}
equations: |
  r = sigmoid(W_r @ x + U_r @ h_prev + b_r)
  h = (1 - r) * h_prev + r * tanh(W @ x + U @ (r * h_prev) + b)
"""


def test_any_spec_custom_encoder_and_jordan_decoder():
    """A spec given as text for the encoder; Jordan's network, whose state is its softmax
    output y (no state of that name in the encoder: it starts from the encoder's h, projected
    to the output width), as the decoder."""
    model = Seq2Seq(Network(rnndsl.compile(CUSTOM), SRC, H, 2, "alternate"),
                    Network(cells("jordan"), TGT + 1, H, sizes={"output": 2}), TGT)
    assert model.bridge.shapes == {"bridge.layer0.y": (2, 2 * H)}
    check_gradients(model, perturbed(model), ragged_batch(np.random.default_rng(5)))


@pytest.mark.parametrize("condition", ["state", "input", "both"])
def test_vector_to_sequence_gradients_match_finite_differences(condition):
    size = 2
    as_input = condition != "state"
    model = VectorToSequence(Network(cells("lstm"), TGT + 1 + size * as_input, H), TGT, size,
                             condition)
    check_gradients(model, perturbed(model), ragged_batch(np.random.default_rng(2), size))


def test_padding_ids_do_not_matter():
    model = Seq2Seq(Network(cells("gru"), SRC, H), Network(cells("gru"), TGT + 1, H), TGT)
    params = perturbed(model)
    batch = ragged_batch(np.random.default_rng(4))
    loss, _, grads = model.loss(params, batch)
    pad_src = np.arange(4)[:, None] >= batch.source_lengths
    pad_tgt = np.arange(4)[:, None] >= batch.target_lengths
    other = Seq2SeqBatch(np.where(pad_src, 1, batch.source), batch.source_lengths,
                         np.where(pad_tgt, 3, batch.target), batch.target_lengths)
    loss2, _, grads2 = model.loss(params, other)
    assert loss == loss2
    for k in grads:
        np.testing.assert_array_equal(grads[k], grads2[k], err_msg=k)


def peaked(model, seed):
    """Parameters scaled up so the decoder's distributions are far from uniform."""
    return {k: 3 * v for k, v in perturbed(model, seed).items()}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_beam_search_finds_what_an_exhaustive_search_finds(seed):
    V, max_len = 3, 4  # eos and two tokens: 1 + 2 + 4 + 8 = 15 finished sequences
    model = Seq2Seq(Network(cells("lstm"), SRC, H), Network(cells("gru"), V + 1, H), V)
    params = peaked(model, seed)
    source, src_len = np.array([[1, 2], [3, 0], [4, 1]]), np.array([3, 2])
    _, vectors = model.encode(params, source, src_len)
    state0 = model.bridge.forward(params, vectors)
    candidates = [list(c) for n in range(max_len) for c in itertools.product([1, 2], repeat=n)]
    found = model.decoder.beam(params, state0, 2, max_len, width=V ** max_len)
    for b in range(2):
        one = {k: {s: v[b:b + 1] for s, v in st.items()} for k, st in state0.items()}
        scores = []
        for c in candidates:
            target = np.array(c + [0])[:, None]
            scores.append(model.decoder.log_prob(params, one, target, [len(c) + 1])[0])
        best = int(np.argmax(scores))
        tokens, score = found[b]
        assert tokens == candidates[best]
        assert score == pytest.approx(scores[best], abs=1e-9)  # stepping = teacher forcing
    greedy = model.translate(params, source, src_len, max_len)
    narrow = model.translate(params, source, src_len, max_len, beam=2)
    for b in range(2):
        one = {k: {s: v[b:b + 1] for s, v in st.items()} for k, st in state0.items()}
        if len(greedy[b]) < max_len:  # a finished greedy output cannot beat the best
            g = model.decoder.log_prob(params, one, np.array(greedy[b] + [0])[:, None],
                                       [len(greedy[b]) + 1])[0]
            assert g <= found[b][1] + 1e-12
        assert len(narrow[b]) <= max_len


def test_bad_combinations_are_refused():
    enc = Network(cells("lstm"), SRC, H)
    with pytest.raises(ValueError, match=r"4 target tokens \+ 1 start token = 5"):
        Seq2Seq(enc, Network(cells("gru"), TGT, H), TGT)
    with pytest.raises(ValueError, match="cannot be bidirectional"):
        Seq2Seq(enc, Network(cells("gru"), TGT + 1, H, bidirectional="concat"), TGT)
    with pytest.raises(ValueError, match="eos must be"):
        Seq2Seq(enc, Network(cells("gru"), TGT + 1, H), TGT, eos=TGT)
    with pytest.raises(ValueError, match="condition must be"):
        VectorToSequence(Network(cells("gru"), TGT + 1, H), TGT, 2, condition="sideways")
    model = Seq2Seq(enc, Network(cells("gru"), TGT + 1, H), TGT)
    params = model.init_params(dtype=np.float64)
    batch = ragged_batch(np.random.default_rng(0))
    batch.target[0, 1] = 2  # sequence 1 has length 1: its only token must be eos
    with pytest.raises(ValueError, match="does not end with eos"):
        model.loss(params, batch)
    batch = ragged_batch(np.random.default_rng(0))
    batch.source[0, 0] = SRC
    with pytest.raises(ValueError, match="outside the vocabulary of 5"):
        model.loss(params, batch)
    with pytest.raises(ValueError, match="missing"):
        model.loss({k: v for k, v in params.items() if k != "head.b"}, batch)


# -- the sequence tasks, trained ---------------------------------------------------------------
def test_held_out_inputs_never_occur_in_training():
    from rnndsl.training.tasks import _is_held_out, make_task

    for task in (make_task("reverse", 3), make_task("dates", 1), make_task("expand")):
        rng = np.random.default_rng(0)
        train_batch, held = task.sample(rng, 300), task.sample_held_out(rng, 300)
        for batch, want in ((train_batch, False), (held, True)):
            if batch.source is not None:
                keys = [tuple(batch.source[:n, b]) for b, n in enumerate(batch.source_lengths)]
            else:
                keys = [tuple(np.rint(v * task.length).astype(int)) for v in batch.vector]
            assert all(_is_held_out(k) == want for k in keys)
            for b, k in enumerate(keys[:20]):
                n = batch.target_lengths[b]
                assert batch.target[:n, b].tolist() == task.answer(k) + [0]


@pytest.mark.parametrize("name", ["reverse", "dates", "expand"])
def test_sequence_tasks_are_determined_by_the_generator(name):
    from rnndsl.training.tasks import make_task

    task = make_task(name)
    one, two, other = (task.sample(np.random.default_rng(s), 8) for s in (7, 7, 8))
    for field in ("source", "source_lengths", "target", "target_lengths", "vector"):
        a, b = getattr(one, field), getattr(two, field)
        assert (a is None and b is None) or np.array_equal(a, b), field
    assert one.target.shape != other.target.shape or not np.array_equal(one.target,
                                                                       other.target)


@pytest.mark.parametrize("spec,decoder,task,extra", [
    ("gru", None, "reverse", {"length": 4}),
    ("lstm", "gru", "reverse", {"length": 4, "bidirectional": "concat"}),
    ("gru", None, "expand", {"condition": "state"}),
])
def test_sequence_tasks_are_learned_from_exact_match_zero(spec, decoder, task, extra):
    """Exact match of greedy decoding on held-out inputs: near 0 untrained, high after a
    few hundred steps (a second or two each)."""
    from rnndsl.training.train import TrainConfig, train

    config = dict(spec=spec, decoder=decoder, task=task, hidden=32, lr=1e-2, eval_batch=128,
                  **extra)
    untrained = train(TrainConfig(steps=1, **config))
    trained = train(TrainConfig(steps=300, **config))
    assert untrained.final["exact_match"] < 0.1, untrained.final
    assert trained.final["exact_match"] > 0.8, trained.final


def test_cli_trains_and_decodes_a_sequence_task(tmp_path):
    from typer.testing import CliRunner

    from rnndsl.cli import app

    ckpt = tmp_path / "rev.npz"
    run = CliRunner().invoke(app, ["train", "gru", "--task", "reverse", "--length", "4",
                                   "--hidden", "32", "--steps", "300", "--lr", "1e-2",
                                   "--decoder", "lstm", "--save", str(ckpt)])
    assert run.exit_code == 0, run.output
    assert "exact" in run.output
    for beam in ([], ["--beam", "3"]):
        out = CliRunner().invoke(app, ["sample", str(ckpt), "--prompt", "abcd", *beam])
        assert out.exit_code == 0 and out.output == "GFED\n", out.output
    for args, message in [(["train", "lstm", "--task", "adding", "--decoder", "gru"],
                           "decoder applies to"),
                          (["train", "lstm", "--task", "expand", "--bidirectional", "concat"],
                           "bidirectional applies to an encoder"),
                          (["train", "lstm", "--task", "reverse", "--condition", "input"],
                           "condition applies to"),
                          (["train", "lstm", "--task", "dates", "--text", "README.md"],
                           "unknown option 'path'"),
                          (["sample", str(ckpt)], "give the input with --prompt"),
                          (["sample", str(ckpt), "--prompt", "abz"], "not in the source"),
                          (["sample", str(ckpt), "--prompt", "ab", "--top-k", "2"],
                           "--top-k does not apply")]:
        out = CliRunner().invoke(app, [*args, "--steps", "1"] if args[0] == "train" else args)
        assert out.exit_code == 2, (args, out.output)
        assert message in out.output and "Traceback" not in out.output, (args, out.output)


def test_readme_example_runs():
    import re
    from pathlib import Path

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    code = re.search(r"### Encoder-decoder \(sequence to sequence\)\n\n```python\n(.*?)```",
                     readme, re.S).group(1)
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert np.isfinite(scope["loss"]) and set(scope["grads"]) == set(scope["params"])
    assert len(scope["greedy"]) == len(scope["beam"]) == 2


def test_dates_task_writes_each_date_in_words():
    from datetime import date

    from rnndsl.training.tasks import make_task

    task = make_task("dates")
    batch = task.sample(np.random.default_rng(0), 50)
    for b in range(50):
        iso = "".join(task.source_chars[i] for i in batch.source[:batch.source_lengths[b], b])
        day = date.fromisoformat(iso)
        words = task.decode(batch.target[:batch.target_lengths[b], b])
        assert words == f"{day.day} {day.strftime('%B').lower()} {day.year}"
        assert 1950 <= day.year <= 2049
    assert task.encode("2024-02-29").tolist() == [2, 0, 2, 4, 10, 0, 2, 10, 2, 9]
    with pytest.raises(ValueError, match="YYYY-MM-DD"):
        task.encode("2023-02-29")
