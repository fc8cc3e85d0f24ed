"""Training: a network of compiled cells with a head, trained by BPTT on a generated task.

`train(config)` builds the model, then repeats: sample a batch, run forward and backward
through the whole sequence, check the loss and gradients are finite, clip, take an optimizer
step. Runs are repeatable: the parameters come from `config.seed`, and the batch of step k
from a generator seeded with (seed, k), so a run resumed from a checkpoint at step k sees
exactly the batches the uninterrupted run would have seen, and ends with the same numbers.

A checkpoint is one NumPy .npz file: the parameters (`param/<name>`), the optimizer state
(`optim/<key>`), the step reached, the log so far and the configuration (as JSON).
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

from . import compiler
from .heads import Head
from .layers import Network
from .optim import check_finite, clip_global_norm, clip_value, make_optimizer
from .tasks import Batch, make_task

EVAL_SEED = 2**31 - 1  # the held-out batch's seed; training batches use (seed, step)


@dataclass
class TrainConfig:
    spec: str = "lstm"
    task: str = "adding"
    length: int | None = None  # sequence length; the task's default when None
    text: str | None = None  # charlm: the text file to model (a shipped text when None)
    hidden: int = 64
    layers: int = 1
    bidirectional: str | None = None  # concat, separate or alternate
    residual: bool = False
    dense: str | None = None  # add or concat
    orthogonal: bool = False  # orthogonal recurrent matrices at initialisation
    optimizer: str = "adam"
    lr: float | None = None  # the optimizer's default when None
    momentum: float = 0.0
    clip: float | None = 1.0  # global-norm threshold
    clip_value: float | None = None
    batch: int = 32
    steps: int = 1000
    seed: int = 0
    dtype: str = "float32"
    log_every: int = 50
    eval_batch: int = 256

    def describe(self) -> str:
        net = f"{self.layers}x{self.spec} hidden {self.hidden}"
        for flag, word in ((self.bidirectional, f"bidirectional {self.bidirectional}"),
                           (self.residual, "residual"), (self.dense, f"dense {self.dense}")):
            if flag:
                net += f", {word}"
        return f"{net}; task {self.task}" + (f" length {self.length}" if self.length else "")


@dataclass
class TrainResult:
    config: TrainConfig
    log: list[dict]  # one record per `log_every` steps
    final: dict  # the held-out evaluation at the end: loss and the head's metrics
    seconds: float  # wall time of the steps this process ran (all, unless resumed)
    steps_run: int
    params: dict = field(repr=False, default_factory=dict)


class Model:
    """A network of cells and a head on its output; parameters in one flat dict."""

    def __init__(self, config: TrainConfig):
        options = {"path": config.text} if config.text else {}
        self.task = make_task(config.task, config.length, **options)
        cell = compiler.compile(config.spec)
        extra = {s: config.hidden for s in cell.sizes if s not in ("input", "hidden")}
        self.network = Network(cell, self.task.input_size, config.hidden, layers=config.layers,
                               bidirectional=config.bidirectional, residual=config.residual,
                               dense=config.dense, sizes=extra)
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
        net_grads, _ = self.network.backward(net, tape, res.dy)
        return res.loss, res.metrics, {**net_grads, **res.grads}


def batch_at(task, seed: int, step: int, size: int, dtype) -> Batch:
    return task.sample(np.random.default_rng([seed, step]), size, dtype)


def train(config: TrainConfig, progress=None, save: str | Path | None = None,
          resume: str | Path | None = None) -> TrainResult:
    """Train as `config` says. `progress(step, record)` is called after every step (record is
    a log record on logging steps, else None). `save` writes a checkpoint at the end; `resume`
    continues from one."""
    model = Model(config)
    optimizer = make_optimizer(config.optimizer, config.lr, config.momentum)
    params = model.init_params(config.seed, config.orthogonal)
    start, log = 0, []
    if resume is not None:
        start, log = load_checkpoint(resume, config, params, optimizer)
    eval_batch = batch_at(model.task, EVAL_SEED, config.seed, config.eval_batch, model.dtype)
    model.loss(params, batch_at(model.task, EVAL_SEED, 0, 1, model.dtype))  # load the kernels
    t0 = time.perf_counter()  # so that steps/s measures training, not compilation
    window: list[tuple[float, dict, float]] = []
    for step in range(start, config.steps):
        batch = batch_at(model.task, config.seed, step, config.batch, model.dtype)
        loss, metrics, grads = model.loss(params, batch)
        check_finite(step, loss, grads)
        norm = clip_global_norm(grads, config.clip) if config.clip else _norm(grads)
        if config.clip_value:
            clip_value(grads, config.clip_value)
        optimizer.step(params, grads)
        window.append((loss, metrics, norm))
        record = None
        if (step + 1) % config.log_every == 0 or step + 1 == config.steps:
            record = _record(step + 1, window, time.perf_counter() - t0, start)
            log.append(record)
            window = []
        if progress is not None:
            progress(step + 1, record)
    seconds = time.perf_counter() - t0
    loss, metrics, _ = model.loss(params, eval_batch, grads=False)
    final = {"loss": float(loss), **_floats(metrics), "baseline": model.task.baseline}
    if save is not None:
        save_checkpoint(save, config, params, optimizer, config.steps, log)
    return TrainResult(config, log, final, seconds, config.steps - start, params)


def _norm(grads) -> float:
    return float(np.sqrt(sum(float(np.vdot(g, g)) for g in grads.values())))


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
def save_checkpoint(path, config: TrainConfig, params, optimizer, step: int, log) -> None:
    arrays = {f"param/{k}": v for k, v in params.items()}
    arrays.update({f"optim/{k}": np.asarray(v) for k, v in optimizer.state_dict().items()})
    arrays["step"] = np.array(step)
    arrays["config"] = np.array(json.dumps(asdict(config)))
    arrays["log"] = np.array(json.dumps(log))
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.npz")  # written whole, then renamed into place
    np.savez(tmp, **arrays)
    tmp.replace(path)


def load_checkpoint(path, config: TrainConfig, params, optimizer) -> tuple[int, list]:
    """Fill `params` and `optimizer` from a checkpoint made with the same configuration (the
    number of steps may differ); returns the step reached and the log so far."""
    try:
        data = np.load(Path(path), allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable checkpoint ({exc})") from None
    with data:
        saved = json.loads(str(data["config"]))
        differ = [f.name for f in fields(TrainConfig)
                  if f.name != "steps" and saved.get(f.name) != getattr(config, f.name)]
        if differ:
            raise ValueError(f"{path} was made with different settings: " + ", ".join(
                f"{k}={saved.get(k)!r} (now {getattr(config, k)!r})" for k in differ))
        for k in params:
            params[k][...] = data[f"param/{k}"]
        optimizer.load_state_dict({k.removeprefix("optim/"): data[k] for k in data.files
                                   if k.startswith("optim/")})
        return int(data["step"]), json.loads(str(data["log"]))


def plot_curves(results: list[TrainResult], path) -> None:
    """Training loss against steps, one curve per run (matplotlib, an optional extra)."""
    import matplotlib
    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in results:
        ax.plot([x["step"] for x in r.log], [x["loss"] for x in r.log], label=r.config.spec)
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
