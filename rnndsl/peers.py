"""PyTorch peers for the benchmarks (`rnndsl bench --against torch`, benchmarks/): the library
modules, the eager loop a practitioner writes for a cell, and the same loop with its step
under torch.compile. Imports torch: load it only when torch is wanted.

The eager loop of a built-in cell is written by hand (rnndsl.peer_cells): weights of all gates
stacked, the input products hoisted into one matmul over all T*B rows, one stacked matmul per
step over `x.unbind(0)`, gates cut by `chunk`, autograd doing the backward pass. Any other spec
gets `EagerLoop`, which evaluates the cell's step IR with torch ops in the same shape: hoisted
products, and the per-step products of one vector stacked into one matmul.
"""
from __future__ import annotations

from functools import partial
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F

from rnndsl.symbolic import ir
from rnndsl.bench import WORKLOADS, median_time
from rnndsl.engines.cell import _block_indices
from rnndsl.peer_cells import HandCell, hand_cell, stack

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


TORCH = SimpleNamespace(  # what rnndsl.peer_cells' hand-written cells call
    linear=F.linear, sigmoid=torch.sigmoid, tanh=torch.tanh, relu=torch.relu,
    chunk=lambda v, n: v.chunk(n, -1),
    layer_norm=lambda v, gain, shift=None: F.layer_norm(v, v.shape[-1:], gain, shift, 1e-5))


class HandLoop(torch.nn.Module):
    """A built-in cell as the eager loop a practitioner writes (rnndsl.peer_cells), its
    stacked parameters made from rnndsl's; with `compiled`, the step and the hoisted input
    side each under torch.compile (the loop stays in Python: compiling the whole loop would
    unroll all T steps into one graph)."""

    def __init__(self, hand: HandCell, params: dict, compiled: bool = False):
        super().__init__()
        self.hand = hand
        self.weights = torch.nn.ParameterDict(
            {k: torch.nn.Parameter(v) for k, v in
             stack(hand, {p: torch.tensor(v) for p, v in params.items()}, torch.cat).items()})
        pre = partial(hand.pre, TORCH)
        step = partial(hand.step, TORCH)
        self.pre, self.step = (torch.compile(pre), torch.compile(step)) if compiled else (pre, step)

    def forward(self, xs: dict, sizes: dict):
        x, = xs.values()
        T, B = x.shape[:2]
        w = dict(self.weights)
        pre = self.pre(w, x.reshape(T * B, -1)).reshape(T, B, -1)
        state = tuple(x.new_zeros(B, sizes["hidden"]) for _ in range(self.hand.states))
        hs = []
        for xt in pre.unbind(0):
            state = self.step(w, xt, state)
            hs.append(state[0])
        return {"h": torch.stack(hs)}


class EagerLoop(torch.nn.Module):
    """Any compiled cell as an eager PyTorch loop (forward on torch ops, backward by autograd):
    the peer of a spec that has no hand-written one."""

    def __init__(self, cell, params: dict):
        super().__init__()
        self.cell = cell
        self.weights = torch.nn.ParameterDict(
            {p: torch.nn.Parameter(torch.tensor(v)) for p, v in params.items()})
        self.hoisted = [g for g in cell.plan.hoisted if g.vector.op == "input"]
        self.per_step = cell.plan.forward.gemms  # products of one vector: one matmul a step
        self.gemm_of = {p.uid: g for g in self.per_step for p in g.products}
        self.order = ir.topo_order(cell.step.roots())

    def forward(self, xs: dict, sizes: dict):
        cell, w = self.cell, self.blocks(sizes)
        T, B = next(iter(xs.values())).shape[:2]
        pre = {}  # hoisted products: one matmul over all T*B rows, split per step
        for g in self.hoisted:
            x = xs[g.vector.attr].reshape(T * B, -1)
            out = (x @ torch.cat([w[p] for p in g.weights]).T).reshape(T, B, -1)
            for p, c in zip(g.products, self._split(out, g, sizes)):
                pre[p.uid] = c.unbind(0)
        stacked = {g.name: torch.cat([w[p] for p in g.weights]).T for g in self.per_step}
        states = {s: xs[next(iter(xs))].new_zeros(B, sizes[n]) for s, n in cell.states.items()}
        steps = {x: v.unbind(0) for x, v in xs.items()}
        outs = {o: [] for o in cell.outputs}
        for t in range(T):
            vals = {}
            for n in self.order:
                if n.uid in vals:  # a product of a stacked matmul made earlier in this step
                    continue
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
                elif n.uid in self.gemm_of:
                    g = self.gemm_of[n.uid]
                    out = vals[g.vector.uid] @ stacked[g.name]
                    vals.update((p.uid, c) for p, c in zip(g.products, self._split(out, g, sizes)))
                    continue
                elif n.op == "matvec":
                    v = vals[n.args[1].uid] @ w[n.args[0].attr].T
                else:
                    v = TORCH_OPS[n.op](*(vals[a.uid] for a in n.args))
                vals[n.uid] = v
            states = {s: vals[cell.step.values[s].uid] for s in cell.states}
            for o in cell.outputs:
                outs[o].append(vals[cell.step.values[o].uid])
        return {o: torch.stack(v) for o, v in outs.items()}

    def blocks(self, sizes: dict) -> dict:
        """The parameters by the names the step IR uses: a parameter that multiplies a
        concatenation as its blocks (views, so gradients reach the whole)."""
        w = dict(self.weights)
        for p, cut in self.cell.step.layout.cuts.items():
            whole = w.pop(p)
            w.update(zip(cut.names, (whole[i] for i in _block_indices(cut, whole.ndim, sizes))))
        return w

    @staticmethod
    def _split(out, gemm, sizes):
        return torch.split(out, [sizes[p.shape[0]] for p in gemm.products], dim=-1)


def eager_peer(cell, params: dict, compiled: bool = False) -> torch.nn.Module:
    """The strongest eager loop of `cell`: hand-written for a built-in cell, else EagerLoop;
    `compiled` puts it under torch.compile."""
    hand = hand_cell(cell)
    if hand is not None:
        return HandLoop(hand, params, compiled)
    model = EagerLoop(cell, params)
    return torch.compile(model) if compiled else model


def time_eager(cell, params: dict, xs: dict, sizes: dict, repeats: int = 7,
               compiled: bool = False, device: str = "cpu",
               timer=None) -> tuple[float, float]:
    """Median forward and forward+backward times of the eager loop of `cell` (eager_peer) on
    `device`, as `timer(fn, repeats)` gives them (median_time by default; a bench.Turns gives
    slots it times later). Compilation happens in the timer's warm-up, untimed."""
    timer = timer or median_time
    if compiled:
        torch._dynamo.reset()  # fresh graphs for these shapes (no recompile limit, no dynamic)
    model = eager_peer(cell, {p: v.copy() for p, v in params.items()}, compiled).to(device)
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
    torch has none), on `device`, as `timer(fn, repeats)` gives them (median_time by default;
    a bench.Turns gives slots it times later)."""
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
