"""Random valid specs for the differential fuzzer (tests/test_differential.py).

Each spec is built to make the shapes of plan the built-in cells do not: states and outputs
that are directly matrix products, products of values computed inside the step (phase
splits), row reductions before and after a product, softmax, scalar parameters, several
inputs and states, three sizes, every function of the language, and constants at the edges
of the float range. Every expression keeps its arguments inside the function's domain
(`log(1 + e * e)`, divisions by `2 + tanh(e)`), so the engines can be compared in float64
without NaN deciding the outcome.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

# (spelling, arity, how to keep the argument in the domain)
UNARY = ["sigmoid", "tanh", "relu", "exp", "log", "softplus", "hard_sigmoid", "abs", "sqrt",
         "neg", "softmax"]
BINARY = ["+", "-", "*", "/", "**", "min", "max"]
REDUCE = ["sum", "mean", "max"]
# multiplied by a value and divided by the same constant: large and tiny literals that must
# survive parsing, folding and the kernels' dtype without becoming inf or 0
EDGE = ["1e300", "1e-300", "6.02214076e23", "1e-5"]


@dataclass
class Gen:
    rng: random.Random
    sizes: list[str]
    pool: dict[str, list[str]]  # size -> names of vectors available (inputs, prev, earlier values)
    params: dict[str, list[str]] = field(default_factory=dict)  # name -> shape
    count: int = 0

    def fresh(self, prefix: str, shape: list[str]) -> str:
        self.count += 1
        name = f"{prefix}{self.count}"
        self.params[name] = shape
        return name

    def vector(self, size: str, depth: int) -> str:
        """An expression of size `size`."""
        r = self.rng.random()
        if depth <= 0 or r < 0.2:
            return self.leaf(size)
        if r < 0.4:
            return self.product(size, depth)
        if r < 0.6:
            return self.unary(self.vector(size, depth - 1), self.rng.choice(UNARY))
        if r < 0.85:
            return self.binary(self.vector(size, depth - 1), lambda: self.vector(size, depth - 1))
        # a per-row scalar spread over the vector: reductions before products
        return f"({self.scalar(depth - 1)}) * {self.vector(size, depth - 1)}"

    def leaf(self, size: str) -> str:
        r = self.rng.random()
        if r < 0.65 and self.pool[size]:
            return self.rng.choice(self.pool[size])
        if r < 0.85 or not self.pool[size]:
            return self.fresh("b", [size])
        return f"({self.fresh('a', [])} * {self.rng.choice(self.pool[size])})"

    def product(self, size: str, depth: int) -> str:
        src = self.rng.choice(self.sizes)
        w = self.fresh("W", [size, src])
        vec = self.vector(src, depth - 1) if self.rng.random() < 0.5 else self.leaf(src)
        return f"{w} @ ({vec})"

    def scalar(self, depth: int) -> str:
        size = self.rng.choice(self.sizes)
        r = self.rng.random()
        if r < 0.2:
            return self.fresh("a", [])
        op = self.rng.choice(REDUCE)
        inner = self.vector(size, depth)
        if op == "mean":
            return f"mean({inner})"
        return f"{op}(tanh({inner}))"  # bounded, so sums of many terms stay well conditioned

    def unary(self, e: str, f: str) -> str:
        if f == "log":
            return f"log(1 + ({e}) * ({e}))"
        if f == "sqrt":
            return f"sqrt(1 + ({e}) * ({e}))"
        if f == "exp":
            return f"exp(tanh({e}))"
        if f == "neg":
            return f"-({e})"
        return f"{f}({e})"

    def binary(self, a: str, second) -> str:
        """`second()` makes the other operand, only where one is used (so that every
        parameter made is used)."""
        op = self.rng.choice(BINARY)
        if op == "**" and self.rng.random() < 0.5:
            return f"(1 + ({a}) * ({a})) ** {self.rng.choice(['2', '0.5', '3', '-1', '1.5'])}"
        b = second()
        if op == "/":
            return f"({a}) / (2 + tanh({b}))"
        if op == "**":
            return f"(1 + sigmoid({a})) ** sigmoid({b})"
        if op in ("min", "max"):
            return f"{op}({a}, {b})"
        if self.rng.random() < 0.15:  # an edge constant and its inverse around a term
            c = self.rng.choice(EDGE)
            return f"(({a}) * {c}) / {c} {op} ({b})"
        return f"({a}) {op} ({b})"


def random_spec(seed: int) -> str:
    """The YAML text of a random valid cell."""
    rng = random.Random(seed)
    sizes = ["input", "hidden"] + (["output"] if rng.random() < 0.4 else [])
    inputs = {"x": "input"}
    if rng.random() < 0.3:
        inputs["u"] = rng.choice(sizes)
    states = {"h": "hidden"}
    if rng.random() < 0.5:
        states["c"] = rng.choice(sizes)
    pool: dict[str, list[str]] = {s: [] for s in sizes}
    for x, s in inputs.items():
        pool[s].append(x)
    for st, s in states.items():
        pool[s].append(f"{st}_prev")
    g = Gen(rng, sizes, pool)
    depth = rng.randint(1, 3)
    lines = []
    for k in range(rng.randint(0, 3)):  # intermediates that later equations may use
        size = rng.choice(sizes)
        lines.append(f"v{k} = {g.vector(size, depth)}")
        pool[size].append(f"v{k}")
    for st, s in states.items():
        rhs = g.product(s, depth) if rng.random() < 0.25 else g.vector(s, depth)
        lines.append(f"{st} = {rhs}")
        pool[s].append(st)
    outputs = list(states)
    if rng.random() < 0.5:  # an output that is not a state: often a linear readout
        s = rng.choice(sizes)
        rhs = g.product(s, depth) if rng.random() < 0.5 else g.vector(s, depth)
        if rng.random() < 0.5:
            rhs += f" + {g.fresh('b', [s])}"
        lines.append(f"y = {rhs}")
        outputs.append("y")
    if rng.random() < 0.5:
        outputs = outputs[1:] or outputs
    rng.shuffle(lines)  # order does not matter in a spec
    used = {*inputs.values(), *states.values(), *(s for shape in g.params.values() for s in shape)}
    sizes = [s for s in sizes if s in used]  # a size no array has cannot be read off
    params = "\n".join(f"  {p}: {{shape: [{', '.join(shape)}]}}" for p, shape in g.params.items())
    return "\n".join([
        f"name: fuzz{seed}",
        f"sizes: [{', '.join(sizes)}]",
        "inputs: {" + ", ".join(f"{x}: {s}" for x, s in inputs.items()) + "}",
        "states: {" + ", ".join(f"{x}: {s}" for x, s in states.items()) + "}",
        f"outputs: [{', '.join(outputs)}]",
        "params:" + ("\n" + params if params else " {}"),
        "equations: |",
        *(f"  {line}" for line in lines),
        "",
    ])
