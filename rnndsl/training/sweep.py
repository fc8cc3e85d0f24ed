"""Architecture studies: many trainings of many cells as Ray Tune trials (`rnndsl sweep`).

A sweep is every combination of specs, hyperparameter points and seeds. The points are the
product of the grid's values (`lr=1e-3,1e-2`) with `samples` random draws from the ranges
(`lr=loguniform(1e-4,1e-1)`, `hidden=choice(32,64)`); the draws come from `search_seed`, so
one command always plans the same trials, which is how `resume` knows the finished ones.
Every spec trains at every point with every seed, so cells are compared on equal terms.

A trial is a `TrainConfig` trained by `train` on a Ray worker, with the held-out batch
evaluated at every log record; the trial reports each record to Tune, whose ASHA scheduler
(optional) stops trials that fall behind. Whatever ends a trial, the driver appends its row
to <out>/trials.jsonl and <out>/trials.csv at once: finished (`ok`), stopped early by the
scheduler (`stopped`), `diverged` (a NaN or inf, named) or `error` (an exception, or a
worker that died), the last two with their reason; the sweep goes on.

Nothing starts before everything is checked: each spec (file, line, column), each trial's
settings (a `TrainConfig` per trial, so a hyperparameter the task does not take is named),
the task, the ranges, the results folder and the cluster's address (a TCP connection with a
timeout: Ray itself would wait minutes for an address that does not answer).

Kernels: a trial first compiles or loads its spec's kernels by running one training step
while it holds a lock file in the kernel cache (one per spec and dtype), so the first trial
of a spec on a machine compiles and the others wait for it and load the kernels from disk.
Each row's `kernel_seconds` is that wait; the summary gives the first and the later trials'.

Specs given as files are sent to the workers as text, so the nodes of a cluster need no
copy of them (a charlm `--text` file must exist on every node).
"""
from __future__ import annotations

import csv
import fcntl
import hashlib
import itertools
import json
import logging
import math
import os
import re
import shutil
import socket
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from rnndsl import compiler
from rnndsl.backend.loader import PREFIX, cache_dir
from rnndsl.language.errors import UserError, printable
from rnndsl.training.optim import TrainingDiverged
from rnndsl.training.train import TrainConfig, check_writable, task_for, train

# The settings a sweep may vary, with the type of their values. The spec, task, seed and
# steps are the sweep's own axes; a decoder is a spec, so it is fixed for the sweep.
HYPERPARAMETERS = {"lr": float, "momentum": float, "weight_decay": float, "clip": float,
                   "clip_value": float, "hidden": int, "layers": int, "batch": int,
                   "length": int, "warmup": int, "optimizer": str, "schedule": str,
                   "bidirectional": str, "dense": str, "condition": str, "residual": bool,
                   "orthogonal": bool}
RANGES = {"uniform": float, "loguniform": float, "randint": int}  # and choice(...) of any type
STATUSES = ("ok", "stopped", "diverged", "error")
SCHEDULERS = ("fifo", "asha")
METRIC = "held_out_loss"  # what the scheduler compares and the summary ranks: lower is better
ROW_FIELDS = ("status", "final_loss", "best_loss", "best_step", "steps", "seconds",
              "kernel_seconds", "node", "started", "reason")


@dataclass(frozen=True)
class Dimension:
    """One hyperparameter's values: a grid (every value), a choice (one drawn per sample),
    or a range drawn from: uniform, loguniform (floats), randint (whole numbers, both ends
    included)."""
    name: str
    kind: str
    values: tuple = ()
    low: float = 0.0
    high: float = 0.0

    def draw(self, rng: np.random.Generator):
        if self.kind == "choice":
            return self.values[int(rng.integers(len(self.values)))]
        if self.kind == "randint":
            return int(rng.integers(self.low, self.high + 1))
        if self.kind == "loguniform":
            return float(np.exp(rng.uniform(np.log(self.low), np.log(self.high))))
        return float(rng.uniform(self.low, self.high))


def _hyperparameter(name: str, option: str) -> type:
    kind = HYPERPARAMETERS.get(name)
    if kind is None:
        raise UserError(f"{option}: '{printable(name)}' is not a hyperparameter a sweep can vary;"
                        f" they are {', '.join(HYPERPARAMETERS)}")
    return kind


def _value(name: str, kind: type, text: str, option: str):
    text = text.strip()
    try:
        if kind is bool:
            return {"true": True, "false": False}[text.lower()]
        return kind(text)
    except (KeyError, ValueError):
        what = {int: "whole numbers", float: "numbers", bool: "true or false"}[kind]
        raise UserError(f"{option}: {name} takes {what}, got '{printable(text)}'") from None


def _split(option: str, item: str) -> tuple[str, str]:
    name, sep, rest = item.partition("=")
    if not sep or not name.strip():
        raise UserError(f"{option} '{printable(item)}': expected NAME=VALUES")
    return name.strip(), rest.strip()


def parse_grid(item: str) -> Dimension:
    """`lr=1e-3,1e-2` -> every value."""
    name, rest = _split("--grid", item)
    kind = _hyperparameter(name, "--grid")
    values = tuple(_value(name, kind, v, "--grid") for v in rest.split(",") if v.strip())
    if not values:
        raise UserError(f"--grid {printable(name)}: empty; give one value or more, "
                        f"e.g. {name}=a,b")
    return Dimension(name, "grid", values)


_RANGE = re.compile(r"^(\w+)\s*\((.*)\)$", re.S)


def parse_search(item: str) -> Dimension:
    """`lr=loguniform(1e-4,1e-1)`, `hidden=randint(16,64)`, `hidden=choice(32,64)`."""
    name, rest = _split("--search", item)
    kind = _hyperparameter(name, "--search")
    match = _RANGE.match(rest)
    ranges = ", ".join([*RANGES, "choice"])
    if not match or match.group(1) not in (*RANGES, "choice"):
        raise UserError(f"--search {printable(name)}: expected one of {ranges} with its "
                        f"arguments, e.g. {name}=choice(a,b); got '{printable(rest)}'")
    how, args = match.group(1), [a for a in match.group(2).split(",") if a.strip()]
    where = f"--search {name}={how}"
    if how == "choice":
        if not args:
            raise UserError(f"{where}: empty; give one value or more")
        return Dimension(name, how, tuple(_value(name, kind, a, where) for a in args))
    if RANGES[how] is not kind:
        raise UserError(f"{where}: {name} takes {kind.__name__} values, and {how} draws "
                        f"{RANGES[how].__name__}s; use choice(...)")
    if len(args) != 2:
        raise UserError(f"{where}: expected two bounds, {how}(low, high)")
    low, high = (_value(name, RANGES[how], a, where) for a in args)
    if not (low < high or (how == "randint" and low == high)):
        raise UserError(f"{where}: the range {low:g}..{high:g} is empty; the low bound must be "
                        f"below the high one")
    if how == "loguniform" and low <= 0:
        raise UserError(f"{where}: a log-uniform range needs bounds > 0, got {low:g}")
    return Dimension(name, how, low=low, high=high)


@dataclass(frozen=True)
class Trial:
    """One training of a sweep: `settings` are TrainConfig's keyword arguments (the spec as a
    built-in name or as YAML text); `point` the hyperparameters the sweep varies."""
    spec: str  # the label in tables: a built-in name or a file's stem
    point: dict
    seed: int
    settings: dict

    @property
    def key(self) -> str:
        """The trial's identity across runs: a hash of everything that makes the training."""
        text = json.dumps(self.settings, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Sweep:
    trials: list[Trial]
    names: tuple[str, ...]  # the varied hyperparameters, in the order given
    specs: tuple[str, ...]
    points: int
    seeds: int
    config: TrainConfig  # the first trial's, for headings (task, length, steps)


def spec_sources(args: list[str]) -> list[tuple[str, str]]:
    """(label, source) of each spec argument, checked: a file (sent to workers as its text),
    a built-in name, or a folder (each *.yaml in it). Two specs with one label are refused."""
    out: dict[str, str] = {}
    for arg in args:
        folder = Path(arg)
        files = sorted(folder.glob("*.yaml")) if folder.is_dir() else [arg]
        if not files:
            raise UserError(f"{printable(arg)} is a folder with no .yaml spec in it")
        for item in files:
            compiler.analyse(item)  # a SpecError names the file, line and column
            path = Path(item)
            is_file = path.is_file()
            label = path.stem if is_file else str(item)
            if label in out:
                raise UserError(f"two specs are named {printable(label)}; give each once "
                                "(a file's name without .yaml names it in the tables)")
            out[label] = path.read_text(encoding="utf-8") if is_file else str(item)
    return list(out.items())


def plan(specs: list[str], fixed: dict, grid: list[str] = (), search: list[str] = (),
         samples: int = 1, seeds: int = 1, search_seed: int = 0) -> Sweep:
    """Every trial of a sweep, each one's settings checked; `fixed` holds the TrainConfig
    settings the sweep does not vary (task, steps, ...). Unless `fixed` says otherwise, the
    held-out batch is evaluated (a log record) every 50 steps, or every tenth of the steps."""
    steps = fixed.get("steps", TrainConfig.steps)
    fixed = {"log_every": max(1, min(50, steps // 10)) if isinstance(steps, int) else 1,
             **fixed}
    dims = [parse_grid(g) for g in grid] + [parse_search(s) for s in search]
    names = [d.name for d in dims]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise UserError(f"{', '.join(twice)} given more than once in --grid and --search")
    if not (isinstance(samples, int) and samples >= 1 and isinstance(seeds, int) and seeds >= 1):
        raise UserError("samples and seeds must be whole numbers of at least 1")
    if samples > 1 and not search:
        raise UserError("--samples draws points from the --search ranges; give --search too")
    ranged = [d for d in dims if d.kind != "grid"]
    rng = np.random.default_rng(search_seed)
    draws = [{d.name: d.draw(rng) for d in ranged} for _ in range(samples if ranged else 1)]
    grids = [d for d in dims if d.kind == "grid"]
    points = [{**dict(zip([d.name for d in grids], values)), **draw}
              for values in itertools.product(*(d.values for d in grids)) for draw in draws]
    points = [{n: p[n] for n in names} for p in points]  # columns in the order given
    sources = spec_sources(specs)
    if fixed.get("decoder"):
        decoder = spec_sources([fixed["decoder"]])
        if len(decoder) != 1:
            raise UserError(f"--decoder {printable(fixed['decoder'])}: give one spec")
        fixed = {**fixed, "decoder": decoder[0][1]}  # sent to the workers as text too
    trials = []
    for point in points:
        for seed in range(seeds):
            for label, source in sources:
                settings = {**fixed, **point, "spec": source, "seed": seed}
                trials.append(Trial(label, point, seed, asdict(_config(settings, label, point))))
    for options in {(t.settings["task"], t.settings["length"], t.settings["text"])
                    for t in trials}:
        _check_task(*options)
    return Sweep(trials, tuple(names), tuple(label for label, _ in sources), len(points), seeds,
                 TrainConfig(**trials[0].settings))


def _config(settings: dict, label: str, point: dict) -> TrainConfig:
    try:
        return TrainConfig(**settings)
    except UserError as exc:
        where = ", ".join(f"{k}={shown(v)}" for k, v in point.items())
        raise UserError(f"{printable(label)}" + (f" at {where}" if where else "") +
                        f": {exc}") from None


def _check_task(task: str, length, text) -> None:
    try:
        task_for(TrainConfig(task=task, length=length, text=text))
    except ValueError as exc:  # UserError is one; the task's own checks raise ValueError
        raise UserError(str(exc)) from None


def shown(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else printable(str(value))


# -- a trial, on a Ray worker --------------------------------------------------------------------
def run_trial(space: dict) -> None:
    """Ray Tune's function trainable: one training, reported at every log record."""
    import ray
    from ray import tune

    config = TrainConfig(**space["trial"]["settings"])
    node = ray.get_runtime_context().get_node_id()
    started = time.perf_counter()
    state = {"best_loss": math.inf, "best_step": 0, "kernel_seconds": None, "node": node,
             "started": time.time()}

    def report(step: int, record: dict | None) -> None:
        if record is None:
            return
        loss = record["held_out"]["loss"]
        if loss < state["best_loss"]:
            state.update(best_loss=loss, best_step=step)
        tune.report({**state, "step": step, METRIC: loss, "final_loss": loss,
                     "seconds": record["seconds"],
                     "status": "ok" if step == config.steps else "running"})

    def failed(status: str, reason: str, step: int | None = None) -> None:
        tune.report({**state, "step": step or 0, METRIC: math.inf, "status": status,
                     "reason": reason, "seconds": time.perf_counter() - started})

    try:
        with kernel_lock(config):
            train(replace(config, steps=1))  # compiles the kernels, or loads them from disk
        state["kernel_seconds"] = time.perf_counter() - started
        train(config, progress=report, threads=space["threads"], held_out_log=True)
    except TrainingDiverged as exc:
        failed("diverged", str(exc), exc.step)
    except Exception as exc:  # noqa: BLE001 - any failure is this trial's result, not the sweep's
        failed("error", f"{type(exc).__name__}: {exc}")


@contextmanager
def kernel_lock(config: TrainConfig):
    """Hold the lock file of `config`'s kernels (spec, decoder, dtype) in the kernel cache;
    yields its path."""
    what = json.dumps([config.spec, config.decoder, config.dtype])
    path = cache_dir() / f"{PREFIX}sweep_{hashlib.sha256(what.encode()).hexdigest()[:16]}.lock"
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield path
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# -- the results folder --------------------------------------------------------------------------
class Results:
    """<folder>/trials.jsonl (one JSON object per trial) and trials.csv (the same, flat)."""

    def __init__(self, folder, names: tuple[str, ...]):
        self.folder = Path(folder)
        self.jsonl, self.csv = self.folder / "trials.jsonl", self.folder / "trials.csv"
        self.columns = ("trial", "spec", *names, "seed", *ROW_FIELDS)

    def finished(self, sweep: Sweep, resume: bool) -> list[dict]:
        """The rows to keep: with `resume`, those of this sweep's trials that ended (`error`
        rows are run again); without, none, and a folder holding trials is refused. Checks
        the folder can be written; writes nothing."""
        if self.folder.exists() and not self.folder.is_dir():
            raise UserError(f"--out {printable(self.folder)} is a file; give a folder")
        rows = self._read() if self.jsonl.exists() else []
        if (rows or self.csv.exists()) and not resume:
            raise UserError(f"{printable(self.folder)} holds {len(rows)} trial(s) of a sweep; "
                            "give --resume to continue it, or another --out")
        if resume and self.csv.exists() and not self.jsonl.exists():
            raise UserError(f"{printable(self.folder)} has trials.csv but not trials.jsonl, "
                            "which --resume reads; give another --out")
        planned = {t.key for t in sweep.trials}
        foreign = [r for r in rows if r.get("trial") not in planned]
        if foreign:
            raise UserError(f"{printable(self.jsonl)} holds {len(foreign)} trial(s) that this "
                            "sweep does not plan (other specs, settings or ranges); give the "
                            "same options as the sweep it holds, or another --out")
        made = next(p for p in (self.folder, *self.folder.parents) if p.exists())
        check_writable(made / "trials.csv", "results file")  # the folders below are made
        latest = {r["trial"]: r for r in rows}  # a trial run again: its last row counts
        return [r for r in latest.values() if r["status"] != "error"]

    def _read(self) -> list[dict]:
        rows = []
        for n, line in enumerate(self.jsonl.read_text(encoding="utf-8").splitlines(), 1):
            try:
                row = json.loads(line)
                if not (isinstance(row, dict) and row.get("status") in STATUSES):
                    raise ValueError("not a trial's row")
            except ValueError as exc:
                raise UserError(f"{printable(self.jsonl)}:{n}: not a row of rnndsl sweep "
                                f"({printable(exc)})") from None
            rows.append(row)
        return rows

    def start(self, rows: list[dict]) -> None:
        """Write the kept rows (and the CSV's header) afresh, each file replaced whole."""
        self.folder.mkdir(parents=True, exist_ok=True)
        for path, write in ((self.jsonl, self._json_lines), (self.csv, self._csv_lines)):
            tmp = path.with_name(f".{path.name}.tmp")
            with open(tmp, "w", encoding="utf-8", newline="") as f:
                write(f, rows, header=True)
            tmp.replace(path)

    def append(self, row: dict) -> None:
        for path, write in ((self.jsonl, self._json_lines), (self.csv, self._csv_lines)):
            with open(path, "a", encoding="utf-8", newline="") as f:
                write(f, [row], header=False)

    @staticmethod
    def _json_lines(f, rows, header: bool) -> None:
        for row in rows:
            f.write(json.dumps(row) + "\n")

    def _csv_lines(self, f, rows, header: bool) -> None:
        writer = csv.writer(f)
        if header:
            writer.writerow(self.columns)
        for row in rows:
            flat = {**row, **row["hyperparameters"]}
            writer.writerow(["" if flat.get(c) is None else flat[c] for c in self.columns])


def row_of(trial: dict, result: dict, error: str | None = None) -> dict:
    """A trial's row, from its plan (`trial`) and the last result it reported."""
    status = result.get("status", "error")
    if error is not None:
        status = "error"
    elif status == "running":  # its last report was not the last step: the scheduler stopped it
        status = "stopped"
    done = status in ("ok", "stopped")
    best = result.get("best_loss")
    return {"trial": trial["key"], "spec": trial["spec"], "hyperparameters": trial["point"],
            "seed": trial["seed"], "status": status,
            "final_loss": result.get("final_loss") if done else None,
            "best_loss": best if best is not None and math.isfinite(best) else None,
            "best_step": result.get("best_step") or None, "steps": result.get("step"),
            "seconds": result.get("seconds"), "kernel_seconds": result.get("kernel_seconds"),
            "node": result.get("node"), "started": result.get("started"),
            "reason": error or result.get("reason")}


# -- the driver ----------------------------------------------------------------------------------
def check_address(address: str, timeout: float = 5.0) -> None:
    """Refuse an address that does not answer a TCP connection within `timeout` seconds."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"--address '{printable(address)}': expected HOST:PORT (the head "
                        "node's GCS port, 6379 by default) or ray://HOST:PORT")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        raise UserError(f"--address {printable(address)}: no Ray cluster answers there "
                        f"({printable(exc.strerror or exc)}); start one with `ray start --head`"
                        " or leave --address out to run on this machine") from None


@contextmanager
def ray_session(address: str | None, cpus: int | None):
    """Connected to the cluster at `address`, or to a Ray started here for the sweep with
    `cpus` CPUs; a Ray already running in this process is used as it is."""
    import ray

    if ray.is_initialized():
        yield
        return
    quiet = dict(logging_level=logging.ERROR, log_to_driver=False)
    if address:
        try:
            ray.init(address=address, **quiet)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise UserError(f"--address {printable(address)}: cannot join the Ray cluster: "
                            f"{printable(exc)}") from None
    else:
        ray.init(address="local", num_cpus=cpus or os.cpu_count(), include_dashboard=False,
                 **quiet)
    try:
        yield
    finally:
        ray.shutdown()


@contextmanager
def _quiet_tune():
    """Tune's own tables, loggers and error tracebacks off: the rows say it all."""
    settings = {"RAY_AIR_NEW_OUTPUT": "0", "TUNE_PRINT_ALL_TRIAL_ERRORS": "0",
                "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1"}
    saved = {k: os.environ.get(k) for k in settings}
    logger = logging.getLogger("ray.tune")
    level = logger.level
    os.environ.update(settings)
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _trial_dirname(trial) -> str:  # Tune's default puts the settings (spec text) in the name
    return trial.trial_id


def run(sweep: Sweep, out, address: str | None = None, cpus: int | None = None,
        cpus_per_trial: int = 1, scheduler: str = "fifo", grace: int | None = None,
        resume: bool = False, on_start=None, on_row=None) -> list[dict]:
    """Run the sweep's trials that `out` does not hold yet; return every row, in plan order.
    `on_start(finished)` is called once all is checked and Ray is up, with the number of
    trials `out` already holds; `on_row(row, done, total)` as each trial ends."""
    if scheduler not in SCHEDULERS:
        raise UserError(f"scheduler must be one of {', '.join(SCHEDULERS)}, got {scheduler!r}")
    steps = sweep.config.steps
    if grace is None:
        grace = max(1, steps // 10)
    if not 1 <= grace <= steps:
        raise UserError(f"--grace must be between 1 and the steps ({steps}), got {grace}")
    results = Results(out, sweep.names)
    rows = results.finished(sweep, resume)
    done = {r["trial"] for r in rows}
    pending = [t for t in sweep.trials if t.key not in done]
    order = {t.key: i for i, t in enumerate(sweep.trials)}

    def begin():  # all is checked: (re)write the results files, then say so
        results.start(rows)
        if on_start is not None:
            on_start(len(rows))

    if not pending:
        begin()
        return sorted(rows, key=lambda r: order[r["trial"]])
    if address:
        check_address(address)
    try:
        from ray import tune
        from ray.tune.schedulers import ASHAScheduler
    except ImportError:
        raise UserError("rnndsl sweep runs on Ray Tune: pip install 'rnndsl[sweep]'") from None
    with ray_session(address, cpus):
        import ray

        cluster_cpus = ray.cluster_resources().get("CPU", 0)
        if cluster_cpus < cpus_per_trial:
            raise UserError(f"a trial needs {cpus_per_trial} CPU(s) and the cluster has "
                            f"{cluster_cpus:g}")
        begin()

        class Recorder(tune.Callback):
            def on_trial_complete(self, iteration, trials, trial, **info):
                self._record(row_of(trial.config["trial"], trial.last_result or {}))

            def on_trial_error(self, iteration, trials, trial, **info):
                self._record(row_of(trial.config["trial"], trial.last_result or {},
                                    error=_error_of(trial)))

            def _record(self, row):
                results.append(row)
                rows.append(row)
                if on_row is not None:
                    on_row(row, len(rows), len(sweep.trials))

        space = {"trial": tune.grid_search([{"key": t.key, "spec": t.spec, "point": t.point,
                                             "seed": t.seed, "settings": t.settings}
                                            for t in pending]),
                 "threads": cpus_per_trial}  # the kernels' BLAS threads
        asha = ASHAScheduler(time_attr="step", metric=METRIC, mode="min", max_t=steps,
                             grace_period=grace, reduction_factor=3)
        storage = tempfile.mkdtemp(prefix="rnndsl-sweep-")  # Tune's own state, not kept
        try:
            with _quiet_tune():
                tune.Tuner(
                    tune.with_resources(run_trial, {"cpu": cpus_per_trial}), param_space=space,
                    tune_config=tune.TuneConfig(scheduler=asha if scheduler == "asha" else None,
                                                trial_dirname_creator=_trial_dirname,
                                                reuse_actors=True),
                    run_config=tune.RunConfig(storage_path=storage, name="sweep", verbose=0,
                                              callbacks=[Recorder()],
                                              failure_config=tune.FailureConfig(max_failures=0)),
                ).fit()
        finally:
            shutil.rmtree(storage, ignore_errors=True)
    return sorted(rows, key=lambda r: order[r["trial"]])


def _error_of(trial) -> str:
    """The first line of what ended a trial that raised past `run_trial` (its worker died)."""
    error = trial.get_pickled_error() or trial.get_error() or "the trial failed"
    error = getattr(error, "cause", None) or error  # a RayTaskError carries the exception
    text = str(error).strip().splitlines()[0] if str(error).strip() else "the trial failed"
    return f"{type(error).__name__}: {text}" if isinstance(error, BaseException) else text


# -- the report ----------------------------------------------------------------------------------
@dataclass
class SpecSummary:
    spec: str
    counts: dict  # status -> trials
    best: list[float]  # best held-out loss of each trial that ran to its end or was stopped
    kernel_first: float | None  # the wait of the first trial of the spec on each node (median)
    kernel_later: float | None  # the median wait of the others

    @property
    def quartiles(self) -> tuple[float, float, float] | None:
        if not self.best:
            return None
        q1, median, q3 = np.percentile(self.best, [25, 50, 75])
        return float(q1), float(median), float(q3)


def summarise(rows: list[dict]) -> list[SpecSummary]:
    """Per spec, in order of first appearance: trials by status, the best held-out losses and
    the kernel waits (the first trial of the spec to start on a node, and the others)."""
    out = []
    for spec in dict.fromkeys(r["spec"] for r in rows):
        mine = [r for r in rows if r["spec"] == spec]
        counts = {s: sum(r["status"] == s for r in mine) for s in STATUSES}
        best = [r["best_loss"] for r in mine
                if r["status"] in ("ok", "stopped") and r["best_loss"] is not None]
        first, later = [], []
        for node in dict.fromkeys(r["node"] for r in mine):
            waits = [r["kernel_seconds"] for r in sorted(mine, key=lambda r: r["started"] or 0)
                     if r["node"] == node and r["kernel_seconds"] is not None]
            first += waits[:1]
            later += waits[1:]
        out.append(SpecSummary(spec, counts, best,
                               float(np.median(first)) if first else None,
                               float(np.median(later)) if later else None))
    return out


def format_summary(rows: list[dict]) -> list[str]:
    lines = [f"  {'spec':<14} {'ok':>4} {'stopped':>7} {'failed':>6}  {'best held-out loss':>18}"
             f" {'IQR':>9}  {'kernels: first':>14} {'later':>7}"]
    for s in summarise(rows):
        q = s.quartiles
        median, iqr = (f"{q[1]:.4g}", f"{q[2] - q[0]:.3g}") if q else ("-", "-")
        first, later = (f"{v:.1f} s" if v is not None else "-"
                        for v in (s.kernel_first, s.kernel_later))
        failed = s.counts["diverged"] + s.counts["error"]
        lines.append(f"  {printable(s.spec):<14} {s.counts['ok']:>4} {s.counts['stopped']:>7} "
                     f"{failed:>6}  {median:>18} {iqr:>9}  {first:>14} {later:>7}")
    return lines


def plot(rows: list[dict], path, title: str) -> None:
    """A box plot of the best held-out loss per spec (matplotlib, an optional extra)."""
    import matplotlib
    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    summaries = [s for s in summarise(rows) if s.best]
    fig, ax = plt.subplots(figsize=(max(4, 0.8 * len(summaries) + 2), 4))
    ax.boxplot([s.best for s in summaries])
    ax.set_xticks(range(1, len(summaries) + 1), [s.spec for s in summaries])
    ax.set_yscale("log")
    ax.set_ylabel("best held-out loss")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
