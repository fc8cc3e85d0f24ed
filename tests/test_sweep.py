"""rnndsl sweep: the plan and its refusals, the results folder and the kernel lock (no Ray
needed); then sweeps on a local Ray and on a Ray cluster of two nodes on a loopback address,
skipped only where Ray is not installed (pip install -e ".[sweep]")."""
import fcntl
import importlib.util
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rnndsl.cli import app
from rnndsl.language.errors import UserError
from rnndsl.training import sweep
from rnndsl.training.train import TrainConfig, train

ROOT = Path(__file__).resolve().parent.parent
FIXED = dict(task="adding", length=8, hidden=4, steps=6, log_every=2)
needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                               reason="Ray is not installed: pip install -e '.[sweep]'")


def test_a_plan_is_every_spec_at_every_point_with_every_seed(tmp_path):
    mine = tmp_path / "mine.yaml"
    mine.write_text((ROOT / "specs" / "elman.yaml").read_text())
    args = (["gru", str(mine)], FIXED, ["hidden=4,8"], ["lr=loguniform(1e-3,1e-1)"])
    study = sweep.plan(*args, samples=3, seeds=2)
    assert study.names == ("hidden", "lr") and study.specs == ("gru", "mine")
    assert len(study.trials) == 2 * 2 * 3 * 2
    combos = {(t.spec, t.point["hidden"], t.point["lr"], t.seed) for t in study.trials}
    assert len(combos) == len(study.trials)
    lrs = {t.point["lr"] for t in study.trials}
    assert len(lrs) == 3 and all(1e-3 <= lr <= 1e-1 for lr in lrs)
    trial = next(t for t in study.trials if t.spec == "mine")
    assert trial.settings["spec"] == mine.read_text()  # workers need no copy of the file
    assert TrainConfig(**trial.settings).hidden == trial.point["hidden"]
    again = sweep.plan(*args, samples=3, seeds=2)  # what --resume relies on
    assert [t.key for t in again.trials] == [t.key for t in study.trials]
    other = sweep.plan(*args, samples=3, seeds=2, search_seed=1)
    assert {t.point["lr"] for t in other.trials}.isdisjoint(lrs)


def test_a_decoder_file_travels_as_text_too(tmp_path):
    decoder = tmp_path / "dec.yaml"
    decoder.write_text((ROOT / "specs" / "gru.yaml").read_text())
    study = sweep.plan(["lstm"], {**FIXED, "task": "reverse", "decoder": str(decoder)})
    assert study.trials[0].settings["decoder"] == decoder.read_text()


def test_ranges_draw_their_kind():
    study = sweep.plan(["elman"], FIXED, search=["hidden=randint(3,5)", "optimizer=choice(adam,"
                                                 "sgd)", "clip=uniform(0.5,2)"], samples=40)
    points = [t.point for t in study.trials]
    assert {p["hidden"] for p in points} == {3, 4, 5}
    assert {p["optimizer"] for p in points} == {"adam", "sgd"}
    assert all(0.5 <= p["clip"] <= 2 for p in points)


def test_held_out_log_evaluates_at_every_record_and_changes_nothing_else():
    config = TrainConfig(spec="elman", **FIXED)
    plain, logged = train(config), train(config, held_out_log=True)
    assert [r["step"] for r in logged.log] == [2, 4, 6]
    assert logged.log[-1]["held_out"] == {k: v for k, v in logged.final.items()
                                          if k != "baseline"}
    assert len({r["held_out"]["loss"] for r in logged.log}) == 3
    assert [r["loss"] for r in logged.log] == [r["loss"] for r in plain.log]
    assert logged.final == plain.final


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


BAD = [
    (["nosuch"], "cannot read spec 'nosuch'"),
    ([str(ROOT / "tests" / "bad_specs" / "unknown_name.yaml")], "unknown_name.yaml:6:24"),
    (["lstm", "--search", "lr=loguniform(1e-2,1e-3)"], "the range 0.01..0.001 is empty"),
    (["lstm", "--search", "hidden=choice()"], "--search hidden=choice: empty"),
    (["lstm", "--grid", "hidden="], "--grid hidden: empty"),
    (["lstm", "--grid", "condition=state"],
     "lstm at condition=state: condition applies to the vector-to-sequence task"),
    (["lstm", "--grid", "momentum=0.5,0.9"], "momentum applies to sgd only"),
    (["lstm", "--grid", "dropout=0.1"], "'dropout' is not a hyperparameter a sweep can vary"),
    (["lstm", "--search", "hidden=uniform(8,16)"], "use choice"),
    (["lstm", "--hidden", "8", "--grid", "hidden=8,16"], "given as an option and in --grid"),
    (["lstm", "--samples", "2"], "--samples draws points from the --search ranges"),
    (["lstm", "--length", "1"], "adding: length must be at least 2"),
    (["lstm", "--address", f"127.0.0.1:{_free_port()}"], "no Ray cluster answers there"),
    (["lstm", "--address", "nowhere"], "expected HOST:PORT"),
]


@pytest.mark.parametrize("args,message", BAD, ids=[m for _, m in BAD])
def test_a_bad_sweep_is_refused_before_any_trial(args, message, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["sweep", *args, "--task", "adding", "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert not out.exists()


def test_without_ray_the_sweep_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # what an import finds where Ray is absent
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["sweep", "elman", "--task", "adding", "--out", str(out)])
    assert result.exit_code == 2 and "pip install 'rnndsl[sweep]'" in result.output
    assert not out.exists()


def _row(trial, status="ok", loss=0.1):
    return sweep.row_of({"key": trial.key, "spec": trial.spec, "point": trial.point,
                         "seed": trial.seed}, {"status": status, "best_loss": loss,
                                               "final_loss": loss, "step": 6})


def test_results_folder_keeps_finished_trials_and_refuses_foreign_ones(tmp_path):
    study = sweep.plan(["elman"], FIXED, grid=["lr=0.01,0.1,0.2"])
    results = sweep.Results(tmp_path / "out", study.names)
    first, second, third = study.trials
    results.start([_row(first), _row(second, "error")])
    results.append(_row(third, "diverged", loss=None))
    with pytest.raises(UserError, match="holds 3 trial.s. of a sweep; give --resume"):
        results.finished(study, resume=False)
    kept = results.finished(study, resume=True)  # an error is run again, a divergence is not
    assert [r["trial"] for r in kept] == [first.key, third.key]
    csv_rows = (tmp_path / "out" / "trials.csv").read_text().splitlines()
    assert csv_rows[0].split(",")[:4] == ["trial", "spec", "lr", "seed"] and len(csv_rows) == 4
    other = sweep.plan(["elman"], {**FIXED, "steps": 7}, grid=["lr=0.01,0.1,0.2"])
    with pytest.raises(UserError, match="3 trial.s. that this sweep does not plan"):
        results.finished(other, resume=True)
    (tmp_path / "out" / "trials.jsonl").unlink()  # the CSV alone is never overwritten
    with pytest.raises(UserError, match="holds 0 trial.s. of a sweep; give --resume"):
        results.finished(study, resume=False)
    with pytest.raises(UserError, match="has trials.csv but not trials.jsonl"):
        results.finished(study, resume=True)
    deep = sweep.Results(tmp_path / "a" / "b", study.names)
    assert deep.finished(study, resume=False) == [] and not (tmp_path / "a").exists()


def test_a_trial_the_scheduler_stopped_or_that_died_is_named_so():
    trial = sweep.plan(["elman"], FIXED).trials[0]
    assert _row(trial, "running")["status"] == "stopped"
    died = sweep.row_of({"key": trial.key, "spec": "elman", "point": {}, "seed": 0},
                        {"status": "running", "best_loss": 0.2}, error="ActorDiedError: gone")
    assert died["status"] == "error" and died["reason"] == "ActorDiedError: gone"
    assert died["final_loss"] is None


def test_one_kernel_lock_per_spec_and_dtype(tmp_path, monkeypatch):
    monkeypatch.setenv("RNNDSL_CACHE_DIR", str(tmp_path))
    config = TrainConfig(spec="gru")
    with sweep.kernel_lock(config) as path:
        with open(path) as other:  # another open file: what another worker would hold
            with pytest.raises(BlockingIOError):
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with sweep.kernel_lock(TrainConfig(spec="gru", dtype="float64")) as path64:
            assert path64 != path
    with open(path) as other:  # released
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)


# -- on Ray --------------------------------------------------------------------------------------
SMALL = ["--task", "adding", "--length", "8", "--hidden", "4", "--steps", "6",
         "--optimizer", "sgd", "--clip", "0"]


def rnndsl(*args, cwd) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-c", "from rnndsl.cli import main; main()", *args],
                          cwd=cwd, capture_output=True, text=True, timeout=600)
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    return proc


def rows(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "trials.jsonl").read_text().splitlines()]


@needs_ray
def test_tiny_sweep_on_a_local_ray(tmp_path):
    proc = rnndsl("sweep", "elman", "gru", *SMALL, "--grid", "lr=0.05,1e8", "--out", "out",
                  "--cpus", "2", "--plot", "box.png", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    got = rows(tmp_path / "out")
    assert sorted((r["spec"], r["hyperparameters"]["lr"]) for r in got) == \
        [("elman", 0.05), ("elman", 1e8), ("gru", 0.05), ("gru", 1e8)]
    for r in got:
        if r["hyperparameters"]["lr"] == 1e8:  # recorded with its reason; the sweep went on
            assert r["status"] == "diverged" and "step" in r["reason"], r
            continue
        assert r["status"] == "ok" and r["steps"] == 6 and r["kernel_seconds"] >= 0, r
        alone = train(TrainConfig(spec=r["spec"], **FIXED, lr=0.05, optimizer="sgd", clip=None))
        assert r["final_loss"] == alone.final["loss"]  # the trial trained what was planned
        assert r["best_loss"] <= r["final_loss"]
    table = (tmp_path / "out" / "trials.csv").read_text().splitlines()
    assert len(table) == 5 and table[0].startswith("trial,spec,lr,seed,status")
    assert [line for line in proc.stdout.splitlines() if line.startswith(("  elman", "  gru"))]
    assert (tmp_path / "box.png").read_bytes()[:4] == b"\x89PNG"

    again = rnndsl("sweep", "elman", "gru", *SMALL, "--grid", "lr=0.05,1e8", "--out", "out",
                   cwd=tmp_path)
    assert again.returncode == 2 and "give --resume" in again.stderr
    more = rnndsl("sweep", "elman", "gru", *SMALL, "--grid", "lr=0.05,1e8,0.1", "--out", "out",
                  "--cpus", "2", "--resume", cwd=tmp_path)
    assert more.returncode == 0, more.stdout + more.stderr
    assert "(4 finished before)" in more.stdout
    assert sum(line.startswith("[") for line in more.stdout.splitlines()) == 2  # only the new
    assert rows(tmp_path / "out")[:4] == got and len(rows(tmp_path / "out")) == 6


@needs_ray
def test_a_cluster_of_two_nodes_runs_trials_on_both(tmp_path, monkeypatch):
    from ray.cluster_utils import Cluster

    # An empty kernel cache (the nodes inherit this environment): the first trial compiles
    # for seconds, so the other node has its worker up before the queue is empty.
    monkeypatch.setenv("RNNDSL_CACHE_DIR", str(tmp_path / "cache"))
    # 127.0.0.2: Ray rewrites 127.0.0.1 in an address to this machine's outward address.
    loopback = {"num_cpus": 1, "node_ip_address": "127.0.0.2"}
    cluster = Cluster(initialize_head=True, head_node_args={**loopback,
                                                            "include_dashboard": False})
    try:
        worker = cluster.add_node(**loopback)
        proc = rnndsl("sweep", "gru", *SMALL, "--grid", "lr=0.01,0.02,0.03,0.04,0.05,0.06",
                      "--out", "out", "--address", cluster.address, cwd=tmp_path)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        nodes = {r["node"] for r in rows(tmp_path / "out")}
        assert nodes == {cluster.head_node.node_id, worker.node_id}
    finally:
        cluster.shutdown()
