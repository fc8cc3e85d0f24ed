"""PyTorch peers for the benchmarks (`rnndsl bench --against torch`, benchmarks/): the library
modules, and an eager loop of any spec. Imports torch: load it only when torch is wanted.

The eager loop is what a researcher writes today for a custom cell: the input products
hoisted into one matmul over all T*B rows, then a Python loop over `x.unbind(0)` that
evaluates the step with torch ops, autograd doing the backward pass.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from rnndsl.symbolic import ir
from rnndsl.bench import WORKLOADS, median_time

TORCH_OPS = {
    "add": torch.add, "sub": torch.sub, "mul": torch.mul, "div": torch.div, "neg": torch.neg,
    "pow": torch.pow, "sigmoid": torch.sigmoid, "tanh": torch.tanh, "relu": torch.relu,
    "exp": torch.exp, "log": torch.log, "softplus": F.softplus, "abs": torch.abs,
    "sqrt": torch.sqrt, "minimum": torch.minimum, "maximum": torch.maximum,
    "hard_sigmoid": lambda x: torch.clamp(0.2 * x + 0.5, 0.0, 1.0),
    "rsum": lambda x: x.sum(-1, keepdim=True), "rmean": lambda x: x.mean(-1, keepdim=True),
    "rmax": lambda x: x.amax(-1, keepdim=True), "softmax": lambda x: torch.softmax(x, -1),
}

LIBRARY = {  # built-in spec -> the torch module that computes the same cell
    "lstm": lambda i, h: torch.nn.LSTM(i, h),
    "gru": lambda i, h: torch.nn.GRU(i, h),
    "elman": lambda i, h: torch.nn.RNN(i, h),
    "elman_relu": lambda i, h: torch.nn.RNN(i, h, nonlinearity="relu"),
}


class EagerLoop(torch.nn.Module):
    """Any compiled cell as an eager PyTorch loop (forward on torch ops, backward by autograd)."""

    def __init__(self, cell, params: dict):
        super().__init__()
        self.cell = cell
        self.weights = torch.nn.ParameterDict(
            {p: torch.nn.Parameter(torch.tensor(v)) for p, v in params.items()})
        self.hoisted = [g for g in cell.plan.hoisted if g.vector.op == "input"]
        self.order = ir.topo_order(cell.step.roots())

    def forward(self, xs: dict, sizes: dict):
        cell, w = self.cell, self.weights
        T, B = next(iter(xs.values())).shape[:2]
        pre = {}  # hoisted products: one matmul over all T*B rows, split per step
        for g in self.hoisted:
            x = xs[g.vector.attr].reshape(T * B, -1)
            out = (x @ torch.cat([w[p] for p in g.weights]).T).reshape(T, B, -1)
            cols = torch.split(out, [sizes[p.shape[0]] for p in g.products], dim=-1)
            for p, c in zip(g.products, cols):
                pre[p.uid] = c.unbind(0)
        states = {s: xs[next(iter(xs))].new_zeros(B, sizes[n]) for s, n in cell.states.items()}
        steps = {x: v.unbind(0) for x, v in xs.items()}
        outs = {o: [] for o in cell.outputs}
        for t in range(T):
            vals = {}
            for n in self.order:
                if n.uid in pre:
                    v = pre[n.uid][t]
                elif n.op == "input":
                    v = steps[n.attr][t]
                elif n.op == "prev":
                    v = states[n.attr]
                elif n.op == "param":
                    v = w[n.attr]
                elif n.op == "const":
                    v = n.attr
                elif n.op == "size":
                    v = float(sizes[n.attr])
                elif n.op == "bcast":
                    v = vals[n.args[0].uid].expand(B, sizes[n.shape[0]])
                elif n.op == "matvec":
                    v = vals[n.args[1].uid] @ w[n.args[0].attr].T
                else:
                    v = TORCH_OPS[n.op](*(vals[a.uid] for a in n.args))
                vals[n.uid] = v
            states = {s: vals[cell.step.values[s].uid] for s in cell.states}
            for o in cell.outputs:
                outs[o].append(vals[cell.step.values[o].uid])
        return {o: torch.stack(v) for o, v in outs.items()}


def time_eager(cell, params: dict, xs: dict, sizes: dict, repeats: int = 7,
               compiled: bool = False, device: str = "cpu",
               timer=None) -> tuple[float, float]:
    """Median forward and forward+backward times of the eager loop of `cell` on `device`,
    timed by `timer(fn, repeats)` (median_time by default)."""
    timer = timer or median_time
    model = EagerLoop(cell, {p: v.copy() for p, v in params.items()}).to(device)
    if compiled:
        model = torch.compile(model)
    txs = {k: torch.as_tensor(v, device=device) for k, v in xs.items()}
    gxs = {k: v.clone().requires_grad_(True) for k, v in txs.items()}

    def forward():
        with torch.no_grad():
            return model(txs, sizes)

    def forward_backward():
        outs = model(gxs, sizes)
        sum(o.sum() for o in outs.values()).backward()

    return timer(forward, repeats), timer(forward_backward, repeats)


def time_library(name: str, workload: str, repeats: int = 7, device: str = "cpu",
                 timer=None) -> tuple[float, float] | None:
    """Median forward and forward+backward times of torch's own module for a spec (None when
    torch has none), on `device`, timed by `timer(fn, repeats)` (median_time by default)."""
    if name not in LIBRARY:
        return None
    timer = timer or median_time
    T, B, I, H = WORKLOADS[workload]
    model = LIBRARY[name](I, H).to(device)
    x = torch.tensor(np.random.default_rng(0).standard_normal((T, B, I)).astype(np.float32),
                     device=device)
    xg = x.clone().requires_grad_(True)

    def forward():
        with torch.no_grad():
            return model(x)

    def forward_backward():
        y, _ = model(xg)
        y.sum().backward()

    return timer(forward, repeats), timer(forward_backward, repeats)
