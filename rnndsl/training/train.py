"""Training: a network of compiled cells with a head, trained by BPTT on a generated task.

`train(config)` builds the model, then repeats: sample a batch, run forward and backward
through the whole sequence, check the loss and gradients are finite, clip, take an optimizer
step. Runs are repeatable: the parameters come from `config.seed`, and the batch of step k
from a generator seeded with (seed, k), so a run resumed from a checkpoint at step k sees
exactly the batches the uninterrupted run would have seen, and ends with the same numbers.

A checkpoint is one NumPy .npz file: the parameters (`param/<name>`), the optimizer state
(`optim/<key>`), the step reached, the log so far and the configuration (as JSON). With `save`,
one is written every `save_every` steps and at the end, each time whole to a temporary file
that is then renamed over the last, so a run killed at any moment leaves its last checkpoint
intact. The path is tried before the first step, so a bad one costs no training.

Bad input is refused before any work, as a `UserError` naming it: every setting is checked
when a `TrainConfig` is made, and a checkpoint is read whole and checked entry by entry (the
zip's checksums catch flipped bits; shapes, step and settings are compared with the run), so
a damaged or foreign file is named as such instead of failing somewhere inside NumPy.
"""
from __future__ import annotations

import json
import math
import os
import time
import zipfile
import zlib
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

from rnndsl import compiler
from rnndsl.training.heads import Head
from rnndsl.training.layers import Network
from rnndsl.engines.cell import HIDDEN
from rnndsl.language.errors import UserError, printable
from rnndsl.backend import row_threads
from rnndsl.backend.blas import blas_threads
from rnndsl.backend.heap import keep_freed_memory
from rnndsl.training.optim import (OPTIMIZERS, SCHEDULES, Schedule, TrainingDiverged,
                                   check_finite, flatten, load_passes, make_optimizer)
from rnndsl.training.tasks import SEQUENCE_TASKS, TASKS, Batch, make_task

EVAL_SEED = 2**31 - 1  # the held-out batch's seed; training batches use (seed, step)
DTYPES = ("float32", "float64")
BIDIRECTIONAL = ("concat", "separate", "alternate")
DENSE = ("add", "concat")
CONDITIONS = ("state", "input", "both")  # how expand's decoder reads its vector
SAVE_EVERY = 100  # steps between checkpoints
# The kernels' threads during training (None: as many as their BLAS has, the cores). The time
# loops split the batch rows between them with no waiting inside a loop (row_threads.py), and
# idle BLAS threads sleep rather than spin, so a second core now pays: the adding task's LSTM
# trained at 99 steps/s on 2 threads against 72 on one (this 2-core machine, 2026-11-30).
KERNEL_THREADS = None


@dataclass
class TrainConfig:
    spec: str = "lstm"
    task: str = "adding"
    length: int | None = None  # sequence length; the task's default when None
    text: str | None = None  # charlm: the text file to model (a shipped text when None)
    hidden: int = 64
    sizes: dict | None = None  # the cell's other named sizes (an NTM's slots); hidden if absent
    layers: int = 1
    bidirectional: str | None = None  # concat, separate or alternate
    residual: bool = False
    dense: str | None = None  # add or concat
    orthogonal: bool = False  # orthogonal recurrent matrices at initialisation
    optimizer: str = "adam"
    lr: float | None = None  # the optimizer's default when None
    momentum: float = 0.0
    weight_decay: float | None = None  # adamw only (0.01 when None)
    # the learning rate's: constant, warmup or cosine (whose decay ends at `steps`: a run
    # resumed with more steps follows the longer curve from where it stands)
    schedule: str = "constant"
    warmup: int = 0  # steps of linear warm-up (warmup and cosine schedules)
    clip: float | None = 1.0  # global-norm threshold
    clip_value: float | None = None
    batch: int = 32
    steps: int = 1000
    seed: int = 0
    dtype: str = "float32"
    log_every: int = 50
    eval_batch: int = 256
    decoder: str | None = None  # sequence tasks: the decoder's spec (the encoder's when None)
    condition: str | None = None  # expand: state, input or both ("state" when None)

    def __post_init__(self):
        """Refuse any setting that cannot make a sound run, naming it."""
        for name, choices in (("task", TASKS), ("optimizer", OPTIMIZERS), ("dtype", DTYPES),
                              ("bidirectional", BIDIRECTIONAL), ("dense", DENSE),
                              ("schedule", SCHEDULES),
                              ("condition", CONDITIONS)):
            value = getattr(self, name)
            if not (value in choices or (value is None and name in ("bidirectional", "dense",
                                                                     "condition"))):
                raise UserError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
        if self.decoder is not None and self.task not in SEQUENCE_TASKS:
            raise UserError(f"decoder applies to the tasks where a decoder writes the target "
                            f"({', '.join(SEQUENCE_TASKS)}), not to {self.task}")
        if self.condition is not None and TASKS[self.task].head != "vector2seq":
            raise UserError(f"condition applies to the vector-to-sequence task (expand), not "
                            f"to {self.task}")
        if self.bidirectional and TASKS[self.task].head == "vector2seq":
            raise UserError(f"bidirectional applies to an encoder, and the task {self.task} "
                            "has none (its decoder writes left to right)")
        for name in ("hidden", "layers", "batch", "steps", "log_every", "eval_batch", "length"):
            value = getattr(self, name)
            if not (value is None and name == "length") and \
                    not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
                raise UserError(f"{name} must be a whole number of at least 1, got {value!r}")
        for name, value in (self.sizes or {}).items():
            if not (isinstance(name, str) and isinstance(value, int)
                    and not isinstance(value, bool) and value >= 1):
                raise UserError(f"sizes: {printable(name)} must be a whole number of at least 1, "
                                f"got {printable(value)}")
        if not (isinstance(self.seed, int) and 0 <= self.seed < 2**63):
            raise UserError(f"seed must be a whole number >= 0, got {self.seed!r}")
        _number("lr", self.lr, low=0, low_open=True, none_ok=True)
        _number("momentum", self.momentum, low=0, high=1)
        _number("clip", self.clip, low=0, none_ok=True)  # 0: no clipping
        _number("clip_value", self.clip_value, low=0, low_open=True, none_ok=True)
        if self.momentum and self.optimizer != "sgd":
            raise UserError("momentum applies to sgd only (adam keeps its own moment estimates)")
        _number("weight_decay", self.weight_decay, low=0, none_ok=True)
        if self.weight_decay is not None and self.optimizer != "adamw":
            raise UserError("weight_decay applies to the adamw optimizer only")
        if not (isinstance(self.warmup, int) and not isinstance(self.warmup, bool)
                and self.warmup >= 0):
            raise UserError(f"warmup must be a whole number >= 0, got {self.warmup!r}")
        try:
            Schedule(self.schedule, self.warmup, self.steps)
        except ValueError as exc:
            raise UserError(str(exc)) from None

    @property
    def label(self) -> str:
        """The spec's short name for tables, bars and legends: a file's stem, not its path."""
        return "<string>" if "\n" in self.spec else printable(Path(self.spec).stem)

    def describe(self) -> str:
        net = f"{self.layers}x{self.label} hidden {self.hidden}"
        net += "".join(f", {name} {n}" for name, n in (self.sizes or {}).items())
        for flag, word in ((self.bidirectional, f"bidirectional {self.bidirectional}"),
                           (self.residual, "residual"), (self.dense, f"dense {self.dense}")):
            if flag:
                net += f", {word}"
        if self.decoder:
            net += f", decoder {printable(Path(self.decoder).stem)}"
        if self.condition:
            net += f", condition {self.condition}"
        return f"{net}; task {self.task}" + (f" length {self.length}" if self.length else "")


def _number(name: str, value, low: float, high: float = math.inf, low_open: bool = False,
            none_ok: bool = False) -> None:
    if value is None and none_ok:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and \
        math.isfinite(value) and (value > low if low_open else value >= low) and value < high
    if not ok:
        bound = f"> {low:g}" if low_open else f">= {low:g}"
        if high != math.inf:
            bound += f" and < {high:g}"
        raise UserError(f"{name} must be a number {bound}, got {value!r}")


@dataclass
class TrainResult:
    config: TrainConfig
    log: list[dict]  # one record per `log_every` steps
    final: dict  # the held-out evaluation at the end: loss and the head's metrics
    seconds: float  # wall time of the steps this process ran (all, unless resumed)
    steps_run: int
    params: dict = field(repr=False, default_factory=dict)


def task_for(config: TrainConfig):
    """The configuration's task (a `text` for any task but charlm is refused there)."""
    options = {"path": config.text} if config.text else {}
    return make_task(config.task, config.length, **options)


def network_for(config: TrainConfig, cell, input_size: int, one_way: bool = False) -> Network:
    """A Network of `cell` as the configuration says (every size but the input's is `sizes`'
    or else hidden); `one_way` (a decoder's) ignores `bidirectional`."""
    given = config.sizes or {}
    unknown = sorted(set(given) - set(cell.sizes))
    if unknown:
        raise UserError(f"sizes: {cell.name} has no size {printable(unknown[0])}; its sizes are "
                        f"{', '.join(cell.sizes)}")
    fixed = sorted(set(given) & {*cell.inputs.values(), HIDDEN, cell.width_size})
    if fixed:
        raise UserError(f"sizes: {printable(fixed[0])} follows the task's input or --hidden "
                        "and cannot be set")
    extra = {s: given.get(s, config.hidden) for s in cell.sizes if s not in ("input", HIDDEN)}
    return Network(cell, input_size, config.hidden, layers=config.layers,
                   bidirectional=None if one_way else config.bidirectional,
                   residual=config.residual, dense=config.dense, sizes=extra)


def make_model(config: TrainConfig):
    """The model a configuration trains: a Model, or for the sequence tasks a
    rnndsl.training.seq2seq.SequenceModel (an encoder-decoder or a conditioned decoder)."""
    if config.task in SEQUENCE_TASKS:
        from rnndsl.training.seq2seq import SequenceModel
        return SequenceModel(config)
    return Model(config)


class Model:
    """A network of cells and a head on its output; parameters in one flat dict."""

    def __init__(self, config: TrainConfig):
        self.task = task_for(config)
        self.network = network_for(config, compiler.compile(config.spec), self.task.input_size)
        self.head = Head(self.task.head, self.network.output_size, self.task.output_size)
        self.dtype = np.dtype(config.dtype)

    def init_params(self, seed: int, orthogonal: bool) -> dict[str, np.ndarray]:
        params = self.network.init_params(seed=seed, dtype=self.dtype, orthogonal=orthogonal)
        params.update(self.head.init_params(np.random.default_rng([seed, 1]), self.dtype))
        return params

    def loss(self, params: dict, batch: Batch, grads: bool = True):
        """The loss on a batch, the head's metrics, and (with `grads`) every gradient."""
        net = {k: params[k] for k in self.network.param_shapes()}
        y, tape = self.network.forward(net, batch.x, batch.lengths, save=grads)
        res = self.head.loss(params, y, batch.target, batch.lengths, batch.mask)
        if not grads:
            return res.loss, res.metrics, None
        net_grads, _ = self.network.backward(net, tape, res.dy, input_grads=False)
        return res.loss, res.metrics, {**net_grads, **res.grads}


def optimizer_for(config: TrainConfig):
    return make_optimizer(config.optimizer, config.lr, config.momentum, config.weight_decay)


@contextmanager
def kernel_threads(n: int | None):
    """Run the block with the kernels (BLAS and the time loops) on `n` threads (None: as they
    are), then restore."""
    if n is None:
        yield
        return
    before, loops = blas_threads(), row_threads.loop_setting()
    blas_threads(n)
    row_threads.set_loop_threads(n)
    try:
        yield
    finally:
        row_threads.set_loop_threads(loops)
        if before is not None:
            blas_threads(before)


def batch_at(task, seed: int, step: int, size: int, dtype) -> Batch:
    return task.sample(np.random.default_rng([seed, step]), size, dtype)


def held_out_batch(task, seed: int, size: int, dtype):
    """The evaluation batch; from the task's held-out inputs where it keeps some apart."""
    rng = np.random.default_rng([EVAL_SEED, seed])
    return getattr(task, "sample_held_out", task.sample)(rng, size, dtype)


def train(config: TrainConfig, progress=None, save: str | Path | None = None,
          resume: str | Path | None = None, save_every: int = SAVE_EVERY,
          threads: int | None = KERNEL_THREADS, held_out_log: bool = False) -> TrainResult:
    """Train as `config` says. `progress(step, record)` is called after every step (record is
    a log record on logging steps, else None). `save` writes a checkpoint every `save_every`
    steps (0: only at the end) and at the end; `resume` continues from one. `threads`: the
    kernels' threads during the run, for BLAS and the time loops (None: leave them as they
    are). `held_out_log` also evaluates the held-out batch at every log record
    (`record["held_out"]`), so runs can be compared along the way (rnndsl sweep); its time
    counts in steps/s. The process's malloc keeps freed memory from then on
    (backend/heap.py): the steps allocate the same arrays again and again."""
    if save is not None:
        check_writable(save, "checkpoint")
    if not (isinstance(save_every, int) and save_every >= 0):
        raise UserError(f"save_every must be a whole number >= 0, got {save_every!r}")
    if not (threads is None or (isinstance(threads, int) and threads >= 1)):
        raise UserError(f"threads must be a whole number of at least 1, got {threads!r}")
    keep_freed_memory()
    with kernel_threads(threads):
        return _train(config, progress, save, resume, save_every, held_out_log)


def _train(config, progress, save, resume, save_every, held_out_log) -> TrainResult:
    model = make_model(config)
    optimizer = optimizer_for(config)
    schedule = Schedule(config.schedule, config.warmup, config.steps)
    # one buffer, which the optimiser updates in a single pass
    params = flatten(model.init_params(config.seed, config.orthogonal))
    start, log = 0, []
    if resume is not None:
        start, log = load_checkpoint(resume, config, params, optimizer)
    eval_batch = held_out_batch(model.task, config.seed, config.eval_batch, model.dtype)
    model.loss(params, batch_at(model.task, EVAL_SEED, 0, 1, model.dtype))  # load the kernels
    load_passes(model.dtype)  # and the optimiser's
    t0 = time.perf_counter()  # so that steps/s measures training, not compilation
    window: list[tuple[float, dict, float]] = []
    for step in range(start, config.steps):
        batch = batch_at(model.task, config.seed, step, config.batch, model.dtype)
        loss, metrics, grads = model.loss(params, batch)
        if not math.isfinite(loss):
            check_finite(step, loss, {})
        norm = optimizer.step(params, grads, lr=optimizer.lr * schedule(step),
                              clip_norm=config.clip or None, clip_value=config.clip_value)
        if not math.isfinite(norm):  # nothing was updated
            check_finite(step, loss, grads)
            raise TrainingDiverged(f"step {step}: the gradients' global norm overflows", step)
        window.append((loss, metrics, norm))
        record = None
        if (step + 1) % config.log_every == 0 or step + 1 == config.steps:
            record = _record(step + 1, window, time.perf_counter() - t0, start)
            if held_out_log:
                record["held_out"] = evaluate(model, params, eval_batch)
            log.append(record)
            window = []
        if save is not None and save_every and (step + 1) % save_every == 0 and \
                step + 1 < config.steps:
            save_checkpoint(save, config, params, optimizer, step + 1, log)
        if progress is not None:
            progress(step + 1, record)
    seconds = time.perf_counter() - t0
    final = {**evaluate(model, params, eval_batch), "baseline": model.task.baseline}
    if save is not None:
        save_checkpoint(save, config, params, optimizer, config.steps, log)
    return TrainResult(config, log, final, seconds, config.steps - start, params)


def evaluate(model, params: dict, batch) -> dict:
    """The loss and the head's metrics on a batch, without gradients."""
    loss, metrics, _ = model.loss(params, batch, grads=False)
    return {"loss": float(loss), **_floats(metrics)}


def load_trained(path, ckpt: dict | None = None):
    """The model of a checkpoint and its parameters as trained: (model, params). `ckpt` is the
    checkpoint if already read (read_checkpoint)."""
    where = printable(path)
    ckpt = read_checkpoint(path) if ckpt is None else ckpt
    config = ckpt["config"]
    try:
        model = make_model(config)
    except UserError:
        raise
    except (OSError, ValueError) as exc:  # the text of a charlm run, e.g. moved or unreadable
        raise UserError(f"{where}: {printable(exc)}") from None
    saved = ckpt["entries"].get("param/head.W")
    if config.task == "charlm" and saved is not None and \
            saved.shape[0] != model.task.output_size:
        raise UserError(f"{where} was trained on a text of {saved.shape[0]} distinct "
                        f"characters; {printable(config.text or 'the built-in text')} now has "
                        f"{model.task.output_size}: the text changed since training")
    params = model.init_params(config.seed, config.orthogonal)
    load_checkpoint(path, config, params, optimizer_for(config))
    return model, params


def evaluate_lengths(path, lengths, batch: int = 256, seed: int = 0) -> tuple[dict, list[dict]]:
    """A trained model's loss and metrics on batches whose sequences all have one length, per
    length in `lengths` (how far a model trained on lengths up to 20 generalises to 60); and
    the checkpoint (read_checkpoint) it read."""
    ckpt = read_checkpoint(path)
    config = ckpt["config"]
    if config.task in SEQUENCE_TASKS or config.task == "charlm":
        raise UserError(f"{printable(path)} holds a model of the task '{config.task}'; lengths "
                        "are evaluated for the tasks with a head on the network (adding, copy, "
                        "repeat_copy, recall, sort)")
    model, params = load_trained(path, ckpt)
    rows = []
    for length in lengths:
        try:
            task = make_task(config.task, length, exact=True)
        except ValueError as exc:
            raise UserError(f"length {length}: {exc}") from None
        data = task.sample(np.random.default_rng([EVAL_SEED, seed, length]), batch, model.dtype)
        rows.append({"length": length, **evaluate(model, params, data)})
    return ckpt, rows


def _floats(metrics: dict) -> dict:
    return {k: float(v) for k, v in metrics.items() if v is not None}


def _record(step: int, window, elapsed: float, start: int) -> dict:
    """Means over the steps since the last record; steps/s over this process's run."""
    rec = {"step": step, "loss": float(np.mean([w[0] for w in window]))}
    for key in window[-1][1]:
        values = [w[1][key] for w in window if w[1].get(key) is not None]
        if values:
            rec[key] = float(np.mean(values))
    rec["grad_norm"] = float(np.mean([w[2] for w in window]))
    rec["steps_per_s"] = (step - start) / elapsed if elapsed > 0 else 0.0
    rec["seconds"] = elapsed
    return rec


# -- checkpoints -------------------------------------------------------------------------------
def check_writable(path, what: str) -> None:
    """Refuse a path that cannot be written (no such folder, a folder, no permission) before
    any work is done, by writing and removing a temporary file beside it."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{what} {printable(path)} is a folder; give a file name")
    try:
        probe = _temporary(path)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"cannot write the {what} {printable(path)}: "
                        f"{exc.strerror or exc}") from None


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp.npz")


def save_checkpoint(path, config: TrainConfig, params, optimizer, step: int, log) -> None:
    arrays = {f"param/{k}": v for k, v in params.items()}
    arrays.update({f"optim/{k}": np.asarray(v) for k, v in optimizer.state_dict().items()})
    arrays["step"] = np.array(step)
    arrays["config"] = np.array(json.dumps(asdict(config)))
    arrays["log"] = np.array(json.dumps(log))
    path = Path(path)
    tmp = _temporary(path)  # written whole, then renamed into place
    try:
        np.savez(tmp, **arrays)
        tmp.replace(path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise UserError(f"cannot write the checkpoint {printable(path)}: "
                        f"{exc.strerror or exc}") from None


# What reading a damaged .npz can raise, from the zip layer up to NumPy's header parser.
_DAMAGE = (OSError, EOFError, ValueError, KeyError, TypeError, zipfile.BadZipFile, zlib.error)


def read_checkpoint(path) -> dict:
    """Every entry of a checkpoint, read whole and checked for form; a damaged file, or one
    that is not a checkpoint, is a UserError naming the file and what is wrong."""
    where = printable(path)
    if Path(path).is_dir():
        raise UserError(f"checkpoint {where} is a folder, not a file")
    try:
        with np.load(Path(path), allow_pickle=False) as data:
            entries = {k: data[k] for k in data.files}
    except FileNotFoundError:
        raise UserError(f"checkpoint {where} does not exist") from None
    except _DAMAGE as exc:
        raise UserError(f"{where} is not a readable checkpoint (damaged or not an .npz file: "
                        f"{printable(exc)})") from None
    missing = [k for k in ("step", "config", "log") if k not in entries]
    if missing:
        raise UserError(f"{where} is not an rnndsl checkpoint: no {', '.join(missing)} entry")
    try:
        settings = json.loads(str(entries["config"]))
        log = json.loads(str(entries["log"]))
        config = TrainConfig(**settings)
        step = entries["step"]
        if step.shape != () or step.dtype.kind not in "iu":
            raise ValueError("the step is not a whole number")
        if not isinstance(log, list) or not all(isinstance(r, dict) for r in log):
            raise ValueError("the log is not a list of records")
    except UserError as exc:
        raise UserError(f"{where} holds bad settings: {exc}") from None
    except (ValueError, TypeError) as exc:  # JSONDecodeError is a ValueError
        raise UserError(f"{where} is not a valid checkpoint: {printable(exc)}") from None
    if not 0 <= int(step) <= config.steps:
        raise UserError(f"{where} claims step {int(step)} of a {config.steps}-step run")
    return {"entries": entries, "config": config, "step": int(step), "log": log}


def load_checkpoint(path, config: TrainConfig, params, optimizer) -> tuple[int, list]:
    """Fill `params` and `optimizer` from a checkpoint made with the same configuration (the
    number of steps may differ, but not be below the checkpoint's step); returns the step
    reached and the log so far."""
    where = printable(path)
    ckpt = read_checkpoint(path)
    saved, entries, step = ckpt["config"], ckpt["entries"], ckpt["step"]
    differ = [f.name for f in fields(TrainConfig)
              if f.name != "steps" and getattr(saved, f.name) != getattr(config, f.name)]
    if differ:
        raise UserError(f"{where} was made with different settings: " + ", ".join(
            f"{k}={getattr(saved, k)!r} (now {getattr(config, k)!r})" for k in differ))
    if config.steps < step:
        raise UserError(f"{where} is at step {step}; steps ({config.steps}) must be at least "
                        "that to continue it")
    for k, p in params.items():
        value = entries.get(f"param/{k}")
        if value is None or value.shape != p.shape or not np.isfinite(value).all():
            problem = "missing" if value is None else f"shape {value.shape}, expected " \
                f"{p.shape}" if value.shape != p.shape else "not finite"
            raise UserError(f"{where}: parameter '{k}' is {problem}")
    state = {k.removeprefix("optim/"): v for k, v in entries.items() if k.startswith("optim/")}
    try:
        optimizer.load_state_dict(state, params)
    except ValueError as exc:
        raise UserError(f"{where}: optimizer state: {exc}") from None
    for k, p in params.items():
        p[...] = entries[f"param/{k}"]
    return step, ckpt["log"]


def plot_curves(results: list[TrainResult], path) -> None:
    """Training loss against steps, one curve per run (matplotlib, an optional extra)."""
    import matplotlib
    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in results:
        ax.plot([x["step"] for x in r.log], [x["loss"] for x in r.log], label=r.config.label)
    baseline = results[0].final.get("baseline")
    if baseline:
        ax.axhline(baseline, color="grey", linestyle=":", label="trivial baseline")
    ax.set_xlabel("step")
    ax.set_ylabel(f"training loss ({results[0].config.task})")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
