"""Time to train: `rnndsl train` (in-process) against the PyTorch loop a user would write,
on the same task, model, initial weights, optimizer and batches.

For each case (task and sizes) and cell, rnndsl runs `rnndsl.training.train.train` as the
command line does, and PyTorch runs a plain loop: `nn.LSTM` / `nn.GRU` for the cells torch
has, and for the peephole LSTM, which it has not, an eager loop over time steps (the input
product of all gates hoisted out of the loop, one recurrent product per step), then the head
(`nn.Linear` and the task's loss), `clip_grad_norm_(1.0)` and `torch.optim.Adam`. Both start
from rnndsl's initial parameters and see the batches `rnndsl train` draws (PyTorch's made
ahead of its loop, as torch tensors). Steps/s of each (rnndsl's as `train` reports it, after
its kernels are loaded; PyTorch's after two warm-up steps on a copy of the model), their
ratio, with torch on its default threads and on one (medians of `--rounds` runs of each,
taken in turns, so that a slow spell of the machine falls on all of them), and the largest
relative difference between the two runs' losses, over the first ten
steps and over the whole run: the two runs compute the same numbers, so these stay at float32
rounding (a few 1e-6) at first and grow slowly as rounding differences feed back through the
training.

`rnndsl train` has glibc's malloc keep freed memory for the rest of the process
(rnndsl/backend/heap.py); this script does so before anything runs, so PyTorch's loops run
under the same allocator settings (they gain from them too).

    python benchmarks/train_bench.py                      # every case, a few minutes
    python benchmarks/train_bench.py --cases adding --specs lstm --steps 500
"""
from __future__ import annotations

import argparse
import copy
import time

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from rnndsl.backend.heap import keep_freed_memory
from rnndsl.bench import gemm_gflops
from rnndsl.summary import evaluate_poly, flops_per_step
from rnndsl.torch import TORCH_LAYOUT
from rnndsl.training.train import TrainConfig, batch_at, make_model, train

# task settings and the steps each case runs by default
CASES = {
    "adding": dict(task="adding", length=100, batch=32, hidden=64, layers=1, lr=1e-2, steps=300),
    "copy": dict(task="copy", batch=16, hidden=128, layers=1, lr=1e-3, steps=300),
    "charlm": dict(task="charlm", length=100, batch=32, hidden=256, layers=2, lr=2e-3,
                   steps=40),
}
SPECS = ("lstm", "gru", "peephole_lstm")
FIRST = 10  # steps over which the losses must agree to float32 rounding
AGREE = 1e-4  # relative difference allowed over those steps


class PeepholeLayer(nn.Module):
    """The peephole LSTM (specs/peephole_lstm.yaml) as a user writes a cell torch lacks: one
    parameter per spec parameter, an eager loop over time steps."""
    GATES = ("i", "f", "g", "o")

    def __init__(self, params: dict[str, np.ndarray]):
        super().__init__()
        self.p = nn.ParameterDict({k: nn.Parameter(torch.tensor(v)) for k, v in params.items()})

    def forward(self, x):
        p = self.p
        W_x = torch.cat([p[f"W_i{g}"] for g in self.GATES])
        W_h = torch.cat([p[f"W_h{g}"] for g in self.GATES])
        b = torch.cat([p[f"b_{g}"] for g in self.GATES])
        xw = torch.addmm(b, x.reshape(-1, x.shape[2]), W_x.t()).reshape(*x.shape[:2], -1)
        B, H = x.shape[1], W_h.shape[1]
        h = c = x.new_zeros(B, H)
        out = []
        for t in range(x.shape[0]):
            zi, zf, zg, zo = (xw[t] + h @ W_h.t()).chunk(4, dim=1)
            i = torch.sigmoid(zi + p["w_ci"] * c)
            f = torch.sigmoid(zf + p["w_cf"] * c)
            c = f * c + i * torch.tanh(zg)
            h = torch.sigmoid(zo + p["w_co"] * c) * torch.tanh(c)
            out.append(h)
        return torch.stack(out)


class TorchModel(nn.Module):
    """The network and head of a TrainConfig in PyTorch, holding rnndsl's initial weights."""

    def __init__(self, config: TrainConfig, head_kind: str, params: dict[str, np.ndarray]):
        super().__init__()
        self.head_kind = head_kind
        layers = range(config.layers)
        if config.spec in TORCH_LAYOUT:
            cls, _, layout = TORCH_LAYOUT[config.spec]
            W = params["layer0.fwd." + layout["weight_ih"][0]]
            self.rnn = cls(W.shape[1], config.hidden, config.layers)
            with torch.no_grad():
                for layer in layers:
                    for kind, names in layout.items():
                        getattr(self.rnn, f"{kind}_l{layer}").copy_(torch.tensor(np.concatenate(
                            [params[f"layer{layer}.fwd.{n}"] for n in names])))
        else:
            self.rnn = nn.Sequential(*[PeepholeLayer(
                {k.split(".")[-1]: v for k, v in params.items()
                 if k.startswith(f"layer{layer}.fwd.")}) for layer in layers])
        W = params["head.W"]
        self.head = nn.Linear(W.shape[1], W.shape[0])
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor(W))
            self.head.bias.copy_(torch.tensor(params["head.b"]))

    def forward(self, x):
        y = self.rnn(x)
        return y[0] if isinstance(y, tuple) else y

    def loss(self, batch: dict) -> torch.Tensor:
        """The mean over the counted items, as rnndsl.training.heads counts them."""
        y = self.forward(batch["x"])
        if self.head_kind == "mse_last":
            last = y[batch["lengths"] - 1, torch.arange(y.shape[1])]
            return F.mse_loss(self.head(last), batch["target"])
        z, counted = self.head(y), batch["counted"]
        if self.head_kind == "bits_step":
            per_bit = F.binary_cross_entropy_with_logits(z, batch["target"], reduction="none")
            return (per_bit * counted[..., None]).sum() / (counted.sum() * z.shape[2])
        per_step = F.cross_entropy(z.reshape(-1, z.shape[2]), batch["target"].reshape(-1),
                                   reduction="none").reshape(counted.shape)
        return (per_step * counted).sum() / counted.sum()


def product_gflop(config: TrainConfig) -> float:
    """The matrix products of one training step, GFLOP, averaged over the run's batches (all
    T*B rows, padding included, as both sides multiply them): each layer's forward products
    (from the cell's step IR) three times (the forward; in the backward the gradient through
    each product and its weight gradient), less the first layer's input gradient, which
    neither side computes, and the head's three products (over the last step's rows for a
    head on the last step). The elementwise work is not counted: a step's time beyond these
    products at the GEMM rate is everything else."""
    model = make_model(config)
    net, cell = model.network, model.network.cell
    x_size = next(iter(cell.inputs.values()))
    per_row = 0.0
    for layer in range(net.layers):
        sizes = net._layer_sizes(layer)
        products = {mono: k for mono, k in flops_per_step(cell.step.roots()).items()
                    if len(mono) == 2}  # a product's two sizes; elementwise terms have one
        forward = float(evaluate_poly(products, sizes))
        input_side = float(evaluate_poly({m: k for m, k in products.items() if x_size in m},
                                         sizes))
        per_row += 3 * forward - (input_side if layer == 0 else 0.0)
    head = 3 * 2 * net.output_size * model.task.output_size
    total = 0.0
    for step in range(config.steps):
        T, B = batch_at(model.task, config.seed, step, config.batch, model.dtype).x.shape[:2]
        total += T * B * per_row + (B if model.task.head.endswith("_last") else T * B) * head
    return total / config.steps / 1e9


def torch_batch(batch) -> dict:
    T = batch.x.shape[0]
    counted = np.arange(T)[:, None] < batch.lengths
    if batch.mask is not None:
        counted &= batch.mask
    return {"x": torch.from_numpy(batch.x), "target": torch.from_numpy(batch.target),
            "lengths": torch.from_numpy(batch.lengths),
            "counted": torch.from_numpy(counted.astype(batch.x.dtype))}


def torch_run(config: TrainConfig, threads: int) -> tuple[list[float], float]:
    """The per-step losses and steps/s of the PyTorch loop on `threads` threads."""
    torch.set_num_threads(threads)
    model_def = make_model(config)
    params = model_def.init_params(config.seed, config.orthogonal)
    batches = [torch_batch(batch_at(model_def.task, config.seed, step, config.batch,
                                    model_def.dtype)) for step in range(config.steps)]
    model = TorchModel(config, model_def.task.head, params)

    def loop(model, batches):
        opt = torch.optim.Adam(model.parameters(), lr=config.lr)
        losses = []
        for batch in batches:
            opt.zero_grad()
            loss = model.loss(batch)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), config.clip)
            opt.step()
            losses.append(loss.item())
        return losses

    loop(copy.deepcopy(model), batches[:2])  # warm-up, on a copy
    start = time.perf_counter()
    losses = loop(model, batches)
    return losses, config.steps / (time.perf_counter() - start)


def rnndsl_run(config: TrainConfig) -> tuple[list[float], float]:
    result = train(config)
    return [r["loss"] for r in result.log], config.steps / result.seconds


def relative_difference(a, b) -> float:
    a, b = np.asarray(a), np.asarray(b)
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-30)))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    ap.add_argument("--specs", nargs="*", default=list(SPECS), choices=list(SPECS))
    ap.add_argument("--steps", type=int, default=None, help="Steps of every case (default: "
                    + ", ".join(f"{k} {v['steps']}" for k, v in CASES.items()) + ").")
    ap.add_argument("--rounds", type=int, default=3, help="Runs of each side, taken in turns; "
                    "the medians are reported (default 3).")
    args = ap.parse_args()
    keep_freed_memory()  # for both, as `rnndsl train` does for itself
    default_threads = torch.get_num_threads()
    print(f"time to train (steps/s, medians of {args.rounds} runs taken in turns), float32, "
          "Adam, global-norm clip 1.0; torch "
          f"{torch.__version__} on its default {default_threads} threads and on 1; rnndsl as "
          "`rnndsl train` runs (its kernels on every core); ratio: rnndsl / the faster torch; "
          "GFLOP: a step's matrix products; their rate in rnndsl's and the faster torch's "
          f"steps (GFLOP/s); a 1024^3 GEMM through rnndsl's BLAS: {gemm_gflops():.0f} GFLOP/s "
          "(and again at the end)")
    print(f"  {'case':<30} {'cell':<14} {'rnndsl':>7} {f'torch {default_threads}t':>8} "
          f"{'torch 1t':>8} {'ratio':>6} {'dloss 10':>9} {'dloss all':>9} {'GFLOP':>6} "
          f"{'rates':>9}")
    failed = []
    for case in args.cases:
        settings = dict(CASES[case])
        steps = args.steps or settings.pop("steps")
        settings.pop("steps", None)
        for spec in args.specs:
            config = TrainConfig(spec=spec, steps=steps, log_every=1, eval_batch=32, **settings)
            speeds = {"default": [], "one": [], "rnndsl": []}
            for _ in range(args.rounds):  # in turns: a slow spell of the VM falls on all three
                speeds["default"].append(torch_run(config, default_threads)[1])
                theirs, one_speed = torch_run(config, 1)
                speeds["one"].append(one_speed)
                ours, our_speed = rnndsl_run(config)
                speeds["rnndsl"].append(our_speed)
            default_speed, one_speed, our_speed = (float(np.median(speeds[k]))
                                                   for k in ("default", "one", "rnndsl"))
            first = relative_difference(ours[:FIRST], theirs[:FIRST])
            whole = relative_difference(ours, theirs)
            name = (f"{case} T={settings.get('length', 'var')} B={config.batch} "
                    f"H={config.hidden} L={config.layers}")
            torch_name = "nn." + TORCH_LAYOUT[spec][0].__name__ if spec in TORCH_LAYOUT \
                else "eager"
            ratio = our_speed / max(default_speed, one_speed)
            gflop = product_gflop(config)
            rates = f"{gflop * our_speed:.0f}/{gflop * max(default_speed, one_speed):.0f}"
            print(f"  {name:<30} {spec:<14} {our_speed:7.1f} {default_speed:8.1f} "
                  f"{one_speed:8.1f} {ratio:5.2f}x {first:9.1e} {whole:9.1e} {gflop:6.2f} "
                  f"{rates:>9}  vs {torch_name}", flush=True)
            if first > AGREE:
                failed.append(f"{case}/{spec}")
    print(f"  a 1024^3 GEMM through rnndsl's BLAS at the end: {gemm_gflops():.0f} GFLOP/s")
    if failed:
        raise SystemExit(f"losses differ beyond float32 rounding in the first {FIRST} steps: "
                         + ", ".join(failed))


if __name__ == "__main__":
    main()
