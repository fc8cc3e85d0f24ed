"""A training step through rnndsl.torch.RNN against the same step through torch.nn.LSTM, with
the process's default settings (no environment variables, torch's default threads).

The model is a 2-layer bidirectional recurrent network under a linear head, float32, at S
(T=100, B=16, I=H=128); a step is forward, mean-squared-error loss, backward and an Adam
update. Each model runs `--repeats` steps in turn with the others (so load from other
processes falls on all of them alike) after two warm-up steps; medians and minima in ms, and
their ratios to nn.LSTM's (below 1: faster than nn.LSTM).

    python benchmarks/bridge_step.py
    python benchmarks/bridge_step.py --specs lstm gru peephole_lstm --repeats 20
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torch import nn

from rnndsl.torch import RNN

T, B, I, H = 100, 16, 128, 128


class Model(nn.Module):
    def __init__(self, rnn: nn.Module):
        super().__init__()
        self.rnn, self.head = rnn, nn.Linear(2 * H, 1)

    def forward(self, x):
        return self.head(self.rnn(x)[0])


def step_function(rnn: nn.Module):
    torch.manual_seed(0)
    model = Model(rnn)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = torch.randn(T, B, I), torch.randn(T, B, 1)

    def step():
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return step


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--specs", nargs="*", default=["lstm", "peephole_lstm"])
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    steps = {"nn.LSTM": step_function(nn.LSTM(I, H, 2, bidirectional=True))}
    for spec in args.specs:
        steps[f"rnndsl {spec}"] = step_function(RNN(spec, I, H, 2, bidirectional=True))
    for fn in steps.values():
        fn(), fn()  # warm-up (compiles the kernels)
    times = {name: [] for name in steps}
    for _ in range(args.repeats):
        for name, fn in steps.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    base_med, base_min = float(np.median(times["nn.LSTM"])), min(times["nn.LSTM"])
    print(f"training step, 2 layers bidirectional, T={T} B={B} I=H={I}, float32, torch "
          f"{torch.__version__}, {torch.get_num_threads()} torch threads; {args.repeats} steps")
    print(f"  {'':<24} {'median ms':>10} {'min ms':>10} {'ratio median':>13} {'ratio min':>10}")
    for name, t in times.items():
        med, low = float(np.median(t)), min(t)
        print(f"  {name:<24} {med * 1e3:10.2f} {low * 1e3:10.2f} {med / base_med:12.2f}x "
              f"{low / base_min:9.2f}x")


if __name__ == "__main__":
    main()
