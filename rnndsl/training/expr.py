"""A task where structure matters: the value of an arithmetic expression, read as a tree by a
tree cell or as a token sequence by a sequence cell (`rnndsl train SPEC --task expr`).

Expressions are generated in code: digits 0-9 joined by +, - and *, the value taken mod 10,
as full binary trees of a chosen depth (a digit has depth 0; an operator is one deeper than
its deeper operand). A tree cell reads the tree (an operator's node reads its operands'
states; each node's input is its token, one-hot); a sequence cell reads the same expression
written out with every operation in parentheses, `((3+4)*2)`, one token per step. Either way a
softmax over the 10 values reads the final state (the root's; the sequence's last step's) and
is trained by cross-entropy with Adam. Training sees depths 1 to `depth`; the held-out sets
(200 expressions per depth, fixed) go two deeper, so accuracy by depth shows what each reader
carries over to longer expressions.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from rnndsl.engines.tree import TreeBatch, TreeCell
from rnndsl.training.optim import Adam, clip_global_norm

OPS = ("+", "-", "*")
TOKENS = tuple("0123456789") + OPS + ("(", ")")  # the trees use the first 13
HELD_OUT = 200  # expressions per depth
EXTRA_DEPTH = 2  # held-out depths beyond training's


@dataclass(frozen=True)
class Expression:
    parent: list[int]  # pre-order, -1 for the root
    tokens: list[int]  # index into TOKENS, per node
    value: int
    text: str  # fully parenthesised infix, e.g. ((3+4)*2)


def expression(rng, depth: int) -> Expression:
    """A random expression of exactly `depth` (0: a digit)."""
    parent, tokens = [], []

    def grow(d: int, up: int) -> tuple[int, str]:
        me = len(parent)
        parent.append(up)
        if d == 0:
            digit = int(rng.integers(10))
            tokens.append(digit)
            return digit, str(digit)
        op = int(rng.integers(len(OPS)))
        tokens.append(10 + op)
        deep = int(rng.integers(2))  # which operand has depth d - 1
        sides = [d - 1 if k == deep else int(rng.integers(d)) for k in range(2)]
        (a, ta), (b, tb) = grow(sides[0], me), grow(sides[1], me)
        value = (a + b, a - b, a * b)[op] % 10
        return value, f"({ta}{OPS[op]}{tb})"

    value, text = grow(depth, -1)
    return Expression(parent, tokens, value, text)


def expressions(rng, count: int, depths) -> list[Expression]:
    return [expression(rng, int(rng.choice(depths))) for _ in range(count)]


def one_hot(indices, width: int) -> np.ndarray:
    return np.eye(width)[np.asarray(indices)]


class Reader:
    """A cell with a softmax over the 10 values on its final state, on batches of expressions."""

    def __init__(self, cell, hidden: int, seed: int, dtype):
        self.cell, self.dtype = cell, np.dtype(dtype)
        self.tree = isinstance(cell, TreeCell)
        if len(cell.inputs) != 1:
            raise ValueError(f"{cell.name} has {len(cell.inputs)} inputs; the expression task "
                             "gives one")
        self.width = 13 if self.tree else len(TOKENS)
        sizes = {s: {"hidden": hidden}.get(s, self.width) for s in cell.sizes}
        self.params = cell.init_params(seed=seed, dtype=self.dtype, **sizes)
        rng = np.random.default_rng(seed + 1)
        out = cell.outputs[0]
        h = int(np.prod(self._shape(out, sizes)))
        self.params["head.W"] = (rng.uniform(-1, 1, (10, h)) / np.sqrt(h)).astype(self.dtype)
        self.params["head.b"] = np.zeros(10, self.dtype)

    def _shape(self, name, sizes):
        info = self.cell.states.get(name)
        return (sizes[info],) if info else (sizes["hidden"],)

    def run(self, batch: list[Expression]):
        """(logits (B, 10), how to backpropagate a gradient of them)."""
        cell_params = {p: v for p, v in self.params.items() if not p.startswith("head.")}
        out = self.cell.outputs[0]
        if self.tree:
            trees = TreeBatch.from_parents(
                [e.parent for e in batch],
                [one_hot(e.tokens, self.width).astype(self.dtype) for e in batch])
            fwd = self.cell.forward(cell_params, trees)
            final = fwd.at_roots()

            def back(d_final):
                d = np.zeros_like(fwd.outputs[out])
                d[trees.roots] = d_final
                return self.cell.backward(cell_params, fwd, {out: d}).params
        else:
            seqs = [[TOKENS.index(c) for c in e.text] for e in batch]
            T, B = max(map(len, seqs)), len(seqs)
            x = np.zeros((T, B, self.width), self.dtype)
            for b, s in enumerate(seqs):
                x[np.arange(len(s)), b, s] = 1
            lengths = np.array([len(s) for s in seqs])
            fwd = self.cell.forward(cell_params, x, lengths=lengths)
            at_end = out in self.cell.states
            final = fwd.states[out] if at_end else fwd.outputs[out][lengths - 1, np.arange(B)]

            def back(d_final):
                if at_end:
                    return self.cell.backward(cell_params, fwd, d_states={out: d_final}).params
                d = np.zeros_like(fwd.outputs[out])
                d[lengths - 1, np.arange(B)] = d_final
                return self.cell.backward(cell_params, fwd, {out: d}).params
        logits = final @ self.params["head.W"].T + self.params["head.b"]
        return final, logits, back

    def step(self, batch: list[Expression], optimizer: Adam, clip: float) -> float:
        final, logits, back = self.run(batch)
        p = np.exp(logits - logits.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        y = np.array([e.value for e in batch])
        loss = float(-np.log(p[np.arange(len(y)), y] + 1e-12).mean())
        d_logits = p
        d_logits[np.arange(len(y)), y] -= 1
        d_logits /= len(y)
        grads = back(d_logits @ self.params["head.W"])
        grads["head.W"] = d_logits.T @ final
        grads["head.b"] = d_logits.sum(axis=0)
        clip_global_norm(grads, clip)
        optimizer.step(self.params, grads)
        return loss

    def accuracy(self, batch: list[Expression]) -> float:
        _, logits, _ = self.run(batch)
        return float((logits.argmax(axis=1) == [e.value for e in batch]).mean())


@dataclass(frozen=True)
class ExprResult:
    name: str
    reads: str  # "tree" or "sequence"
    accuracy: dict[int, float]  # depth -> held-out accuracy
    trained_depths: int
    loss: float  # mean training loss over the last 100 steps
    seconds: float


def train_expr(cell, steps: int = 2000, hidden: int = 64, batch: int = 32, lr: float = 3e-3,
               seed: int = 0, depth: int = 3, clip: float = 1.0, dtype="float32",
               progress=None) -> ExprResult:
    """Train `cell` (a tree or a sequence cell) on expressions of depth 1 to `depth`."""
    start = time.perf_counter()
    reader = Reader(cell, hidden, seed, dtype)
    optimizer = Adam(lr)
    rng = np.random.default_rng(seed)
    losses = []
    for k in range(steps):
        losses.append(reader.step(expressions(rng, batch, range(1, depth + 1)), optimizer, clip))
        if progress is not None:
            progress(k)
    held = np.random.default_rng(10_000)  # the same held-out sets for every run
    accuracy = {d: reader.accuracy(expressions(held, HELD_OUT, [d]))
                for d in range(1, depth + EXTRA_DEPTH + 1)}
    return ExprResult(cell.name, "tree" if reader.tree else "sequence", accuracy, depth,
                      float(np.mean(losses[-100:])), time.perf_counter() - start)


def table(results: list[ExprResult]) -> str:
    """Accuracy by depth, one row per cell, as a Markdown table."""
    depths = sorted(results[0].accuracy)
    head = "| cell | reads | " + " | ".join(
        f"depth {d}{'*' if d > results[0].trained_depths else ''}" for d in depths) + \
        " | loss | seconds |"
    rows = [head, "|" + "---|" * (len(depths) + 4)]
    for r in results:
        rows.append(f"| {r.name} | {r.reads} | " + " | ".join(f"{r.accuracy[d]:.2f}"
                                                             for d in depths) +
                    f" | {r.loss:.3f} | {r.seconds:.0f} |")
    rows.append(f"(* deeper than training's depths 1-{results[0].trained_depths}; "
                f"{HELD_OUT} held-out expressions per depth; chance 0.10)")
    return "\n".join(rows)


def plot(results: list[ExprResult], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    for r in results:
        depths = sorted(r.accuracy)
        ax.plot(depths, [r.accuracy[d] for d in depths], marker="o",
                label=f"{r.name} ({r.reads})")
    ax.axvline(results[0].trained_depths + 0.5, color="grey", linestyle=":")
    ax.set_xticks(sorted(results[0].accuracy))
    ax.set_xlabel("expression depth (right of the line: deeper than training)")
    ax.set_ylabel("held-out accuracy")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
