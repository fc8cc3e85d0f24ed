"""The training loop: repeatable runs, exact resume from checkpoints, divergence stops with a
clear message, the command line; and the long-lag result on the adding problem."""
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from rnndsl.cli import app
from rnndsl.training.optim import TrainingDiverged
from rnndsl.training.train import (TrainConfig, batch_at, evaluate_lengths, make_model,
                                   read_checkpoint, train)

SMALL = dict(spec="lstm", task="adding", length=12, hidden=8, batch=8, log_every=5,
             eval_batch=32, dtype="float64")


def test_same_seed_same_run_other_seed_other_run():
    a = train(TrainConfig(steps=10, **SMALL))
    b = train(TrainConfig(steps=10, **SMALL))
    c = train(TrainConfig(steps=10, **{**SMALL, "seed": 1}))
    assert [r["loss"] for r in a.log] == [r["loss"] for r in b.log]
    assert a.final["loss"] != c.final["loss"]


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_resume_reproduces_the_uninterrupted_run(tmp_path, optimizer):
    opts = dict(SMALL, optimizer=optimizer, momentum=0.9 if optimizer == "sgd" else 0.0,
                layers=2, bidirectional="concat")
    whole = train(TrainConfig(steps=20, **opts))
    ckpt = tmp_path / "half.npz"
    train(TrainConfig(steps=10, **opts), save=ckpt)
    resumed = train(TrainConfig(steps=20, **opts), resume=ckpt)
    assert resumed.steps_run == 10
    for k, v in whole.params.items():
        np.testing.assert_array_equal(resumed.params[k], v, err_msg=k)
    assert resumed.final == whole.final
    assert resumed.log == [{**r, "steps_per_s": r2["steps_per_s"], "seconds": r2["seconds"]}
                           for r, r2 in zip(whole.log, resumed.log)]


def reference_run(config: TrainConfig) -> list[float]:
    """The per-step losses of `config` trained by a plain loop written here: loose parameter
    arrays, clipping by norm then by value, and AdamW's update and the schedule written out in
    NumPy (the form torch.optim.AdamW and lr_scheduler take)."""
    model = make_model(config)
    params = model.init_params(config.seed, config.orthogonal)
    b1, b2, eps, decay = 0.9, 0.999, 1e-8, config.weight_decay or 0.0
    m = {k: np.zeros_like(p) for k, p in params.items()}
    v = {k: np.zeros_like(p) for k, p in params.items()}
    losses = []
    for step in range(config.steps):
        batch = batch_at(model.task, config.seed, step, config.batch, model.dtype)
        loss, _, grads = model.loss(params, batch)
        losses.append(loss)
        norm = np.sqrt(sum(np.sum(g ** 2) for g in grads.values()))
        if norm > config.clip:
            grads = {k: g * (config.clip / norm) for k, g in grads.items()}
        grads = {k: np.clip(g, -config.clip_value, config.clip_value) for k, g in grads.items()}
        if step < config.warmup:
            lr = config.lr * (step + 1) / (config.warmup + 1)
        else:
            done = (step - config.warmup) / (config.steps - config.warmup)
            lr = config.lr * (1 + np.cos(np.pi * done)) / 2
        t = step + 1
        for k, g in grads.items():
            m[k] = b1 * m[k] + (1 - b1) * g
            v[k] = b2 * v[k] + (1 - b2) * g * g
            params[k] *= 1 - lr * decay
            params[k] -= lr * (m[k] / (1 - b1 ** t)) / (np.sqrt(v[k] / (1 - b2 ** t)) + eps)
    return losses


@pytest.mark.parametrize("opts", [
    dict(layers=2, bidirectional="concat"),
    dict(task="copy", length=5, spec="gru", residual=True, layers=2),
], ids=["adding-2x-bidirectional", "copy-gru-residual"])
def test_training_takes_the_steps_of_the_plain_loop(opts):
    """The fused, flat-buffer optimiser step inside `train` (AdamW, a cosine schedule with
    warm-up, both clips) gives the losses of the plain loop, step for step."""
    config = TrainConfig(**{**SMALL, "log_every": 1, "steps": 12, "optimizer": "adamw",
                            "lr": 0.02, "weight_decay": 0.05, "schedule": "cosine",
                            "warmup": 3, "clip": 0.5, "clip_value": 0.02, **opts})
    trained = [r["loss"] for r in train(config).log]
    np.testing.assert_allclose(trained, reference_run(config), rtol=1e-12)
    assert trained[-1] < trained[0]  # it learns: the comparison is not between two still runs


def test_resume_refuses_other_settings(tmp_path):
    ckpt = tmp_path / "c.npz"
    train(TrainConfig(steps=2, **SMALL), save=ckpt)
    with pytest.raises(ValueError, match="hidden=8 .now 9"):
        train(TrainConfig(steps=4, **{**SMALL, "hidden": 9}), resume=ckpt)


def test_nan_in_the_data_stops_training_naming_the_step(monkeypatch):
    from rnndsl.training import train as training

    clean = training.batch_at

    def poisoned(task, seed, step, size, dtype):
        batch = clean(task, seed, step, size, dtype)
        if step == 2:
            batch.x[0, 0, 0] = np.nan
        return batch

    monkeypatch.setattr(training, "batch_at", poisoned)
    with pytest.raises(TrainingDiverged, match="step 2"):
        train(TrainConfig(steps=5, **SMALL))


def test_cli_train_json_log_and_checkpoint(tmp_path):
    ckpt = tmp_path / "run.npz"
    result = CliRunner().invoke(app, ["train", "gru", "--task", "adding", "--length", "10",
                                      "--hidden", "8", "--steps", "6", "--batch", "4",
                                      "--json", "--save", str(ckpt)])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.output.splitlines()]
    assert lines[-1]["spec"] == "gru" and "loss" in lines[-1]["final"]
    assert all("loss" in rec for rec in lines[:-1])
    assert ckpt.exists()


def test_cli_adamw_and_schedule_reach_the_run():
    result = CliRunner().invoke(app, ["train", "gru", "--task", "adding", "--length", "6",
                                      "--hidden", "4", "--steps", "4", "--batch", "2", "--json",
                                      "--optimizer", "adamw", "--weight-decay", "0.2",
                                      "--schedule", "cosine", "--warmup", "1", "--threads", "2"])
    assert result.exit_code == 0, result.output
    settings = json.loads(result.output.splitlines()[-1])["settings"]
    assert (settings["optimizer"], settings["weight_decay"], settings["schedule"],
            settings["warmup"]) == ("adamw", 0.2, "cosine", 1)


def test_cli_compare_prints_one_row_per_cell():
    result = CliRunner().invoke(app, ["compare", "elman", "mgu", "--task", "copy",
                                      "--length", "4", "--hidden", "8", "--steps", "4",
                                      "--batch", "4"])
    assert result.exit_code == 0, result.output
    rows = [line.split()[0] for line in result.output.splitlines() if line.startswith("  1x")]
    assert rows == ["1xelman", "1xmgu"]


@pytest.mark.parametrize("args, message", [
    (["--bidirectional", "sideways"], "sideways"),
    (["--task", "chess"], "chess"),
    (["--optimizer", "rmsprop"], "rmsprop"),
    (["--schedule", "sawtooth"], "sawtooth"),
    (["--weight-decay", "0.1"], "adamw"),
    (["--schedule", "cosine", "--warmup", "2"], "warmup < steps"),
])
def test_cli_bad_options_exit_2_without_traceback(args, message):
    result = CliRunner().invoke(app, ["train", "elman", "--steps", "2", *args])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


def test_adding_problem_long_lag_lstm_learns_elman_does_not():
    """Hochreiter & Schmidhuber 1997: gated cells bridge the lag where a plain recurrent network
    stays at the trivial solution (MSE ~0.167, always answering 1). A CI-sized version of the
    README's T=100 run."""
    base = dict(task="adding", length=50, hidden=32, batch=32, steps=2000, lr=1e-2, seed=0,
                log_every=100)
    lstm = train(TrainConfig(spec="lstm", **base)).final["loss"]
    elman = train(TrainConfig(spec="elman", **base)).final["loss"]
    assert lstm < 0.02, lstm
    assert elman > 0.1, elman


def test_cli_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")  # installed by the test extra
    out = tmp_path / "curve.png"
    result = CliRunner().invoke(app, ["compare", "elman", "gru", "--task", "adding",
                                      "--length", "6", "--hidden", "4", "--steps", "4",
                                      "--batch", "2", "--plot", str(out)])
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_size_sets_a_cell_size_and_the_checkpoint_keeps_it(tmp_path):
    ckpt = tmp_path / "jordan.npz"
    result = CliRunner().invoke(app, ["train", "jordan", "--task", "copy", "--length", "3",
                                      "--hidden", "6", "--size", "output=5", "--steps", "2",
                                      "--batch", "2", "--json", "--save", str(ckpt)])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output.splitlines()[-1])["settings"]["sizes"] == {"output": 5}
    config = read_checkpoint(ckpt)["config"]
    shapes = make_model(config).network.param_shapes()
    assert any(5 in shape for shape in shapes.values()), shapes
    assert not any(5 in shape for shape in make_model(
        TrainConfig(spec="jordan", task="copy", length=3, hidden=6)).network.param_shapes()
        .values())
    resumed = CliRunner().invoke(app, ["train", "--resume", str(ckpt), "--steps", "3"])
    assert resumed.exit_code == 0, resumed.output


@pytest.mark.parametrize("spec, size, message", [
    ("lstm", "slots=3", "lstm has no size slots"),
    ("lstm", "hidden=3", "cannot be set"),
    ("lstm", "slots=x", "expected NAME=N"),
    ("lstm", "slots=0", "expected NAME=N"),
])
def test_cli_bad_size_exits_2_naming_it(spec, size, message):
    result = CliRunner().invoke(app, ["train", spec, "--size", size, "--steps", "2"])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


def test_evaluate_at_exact_lengths_beyond_training(tmp_path):
    ckpt = tmp_path / "copy.npz"
    train(TrainConfig(spec="gru", task="copy", length=4, hidden=8, batch=4, steps=3),
          save=ckpt)
    _, rows = evaluate_lengths(ckpt, [2, 9], batch=16)
    assert [r["length"] for r in rows] == [2, 9]
    for r in rows:  # every sequence has exactly `length` vectors of 8 bits to write back
        assert r["bits_wrong_per_seq"] == pytest.approx((1 - r["accuracy"]) * 8 * r["length"])
    assert 0 < rows[0]["bits_wrong_per_seq"] <= 16 and rows[1]["bits_wrong_per_seq"] > 16
    out = tmp_path / "curves.png"
    result = CliRunner().invoke(app, ["evaluate", str(ckpt), str(ckpt), "--length", "2",
                                      "--length", "9", "--batch", "16", "--plot", str(out)])
    assert result.exit_code == 0, result.output
    table = [line.split() for line in result.output.splitlines()[1:]]
    assert [(r[0], r[1]) for r in table] == [("copy.npz", "2"), ("copy.npz", "9")] * 2
    assert float(table[1][4]) == pytest.approx(rows[1]["bits_wrong_per_seq"], abs=1e-4)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluate_refuses_what_has_no_length_to_vary(tmp_path):
    ckpt = tmp_path / "recall.npz"
    train(TrainConfig(spec="gru", task="recall", length=3, hidden=4, batch=2, steps=1),
          save=ckpt)
    result = CliRunner().invoke(app, ["evaluate", str(ckpt), "--length", "1"])
    assert result.exit_code == 2 and "min_items >= 2" in result.output, result.output
    lm = tmp_path / "lm.npz"
    train(TrainConfig(spec="gru", task="charlm", length=5, hidden=4, batch=2, steps=1), save=lm)
    result = CliRunner().invoke(app, ["evaluate", str(lm), "--length", "5"])
    assert result.exit_code == 2 and "'charlm'" in result.output, result.output
    assert "Traceback" not in result.output


def test_cli_trains_and_evaluates_the_ntm_as_the_experiment_does(tmp_path):
    """examples/ntm/experiment.sh at toy size: the NTM's memory sizes by --size, then the
    checkpoint evaluated on longer sequences than it was trained on."""
    ckpt = tmp_path / "ntm_copy.npz"
    result = CliRunner().invoke(app, ["train", "ntm", "--task", "copy", "--length", "3",
                                      "--hidden", "8", "--size", "slots=6", "--size", "width=4",
                                      "--steps", "3", "--batch", "2", "--lr", "1e-3",
                                      "--dtype", "float64",  # the kernels other tests compile
                                      "--save", str(ckpt)])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(app, ["evaluate", str(ckpt), "--length", "5", "--batch", "4"])
    assert result.exit_code == 0, result.output
    length, bits = result.output.splitlines()[1].split()[1:5:3]
    assert length == "5" and 0 <= float(bits) <= 40
