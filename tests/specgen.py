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
    # with `block_rng`, most square products are block-diagonal (`blocks`: name -> count), an
    # rng of their own so that the rest of the spec is the one of the same seed without
    block_rng: random.Random | None = None
    blocks: dict[str, int] = field(default_factory=dict)

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

    def intermediates(self, depth: int, most: int) -> list[str]:
        """Up to `most` equations of named vectors that later equations may use."""
        lines = []
        for k in range(self.rng.randint(0, most)):
            size = self.rng.choice(self.sizes)
            lines.append(f"v{k} = {self.vector(size, depth)}")
            self.pool[size].append(f"v{k}")
        return lines

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
        if src == size and self.block_rng is not None and self.block_rng.random() < 0.85:
            self.blocks[w] = self.block_rng.choice(BLOCK_COUNTS)
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


def random_spec(seed: int, blocks: bool = False) -> str:
    """The YAML text of a random valid cell; with `blocks`, most of its square matrices are
    block-diagonal, with BLOCK_COUNTS blocks (sizes as BLOCK_SIZES makes them)."""
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
    g = Gen(rng, sizes, pool, block_rng=random.Random(-1 - seed) if blocks else None)
    depth = rng.randint(1, 3)
    lines = g.intermediates(depth, 3)
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
    return _spec_text(f"fuzz{seed}", sizes, inputs, states, outputs, g.params, lines, g.blocks)


# Block-diagonal matrices: the number of blocks, which divides every size that the problems of
# tests/engines.py have with these arguments (4, 8, 12), down to blocks 1 wide.
BLOCK_COUNTS = (2, 4)
BLOCK_SIZES = (4, 4)


def _spec_text(name: str, sizes: list[str], inputs: dict, states: dict, outputs: list[str],
               params: dict[str, list[str]], lines: list[str],
               blocks: dict[str, int] | None = None) -> str:
    declared = "\n".join(f"  {p}: {{shape: [{', '.join(shape)}]"
                         f"{f', blocks: {blocks[p]}' if p in (blocks or {}) else ''}}}"
                         for p, shape in params.items())
    return "\n".join([
        f"name: {name}",
        f"sizes: [{', '.join(sizes)}]",
        "inputs: {" + ", ".join(f"{x}: {s}" for x, s in inputs.items()) + "}",
        "states: {" + ", ".join(f"{x}: {s}" for x, s in states.items()) + "}",
        f"outputs: [{', '.join(outputs)}]",
        "params:" + ("\n" + declared if declared else " {}"),
        "equations: |",
        *(f"  {line}" for line in lines),
        "",
    ])


# -- cells with a matrix-valued state -----------------------------------------------------------
MATRIX_UNARY = [f for f in UNARY if f != "softmax"]  # softmax of a matrix names its axis
OTHER_AXIS = {"key": "value", "value": "key"}


class MatrixGen(Gen):
    """Expressions over a state M: [key, value] as well as vectors: products with M and its
    transpose, outer products, elementwise matrix arithmetic, broadcasts of vectors and
    per-row scalars, sums, means, norms and softmax over an axis, and the circular shift."""

    matrices: list[str]  # matrix names that an expression may read

    def vector(self, size: str, depth: int) -> str:
        r = self.rng.random()
        if depth > 0 and size in OTHER_AXIS and r < 0.3:
            return self.from_matrix(size, depth - 1)
        if depth > 0 and r < 0.4:
            return self.shifted(size, depth - 1)
        return super().vector(size, depth)

    def shifted(self, size: str, depth: int) -> str:
        """The NTM's circular shift of a vector by a distribution over the shifts -1, 0, 1."""
        src = self.rng.choice(self.sizes)
        w = self.fresh("W", ["3", src])
        return f"shift({self.vector(size, depth)}, softmax({w} @ ({self.leaf(src)})))"

    def from_matrix(self, size: str, depth: int) -> str:
        """A vector of `size` computed from a matrix: a product or a reduction."""
        m, other = self.matrix(depth), OTHER_AXIS[size]
        r = self.rng.random()
        if r < 0.5:
            v = self.vector(other, depth)
            return f"({m}) @ ({v})" if size == "key" else f"({m}).T @ ({v})"
        op = self.rng.choice(["sum", "mean", "norm"])
        inner = f"tanh({m})" if op == "sum" else m  # bounded, so sums stay well conditioned
        return f"{op}({inner}, {other})"

    def matrix(self, depth: int) -> str:
        """An expression of shape (key, value)."""
        r = self.rng.random()
        if depth <= 0 or r < 0.2:
            if self.rng.random() < 0.6:
                return self.rng.choice(self.matrices)
            return f"outer({self.leaf('key')}, {self.leaf('value')})"
        if r < 0.35:
            return f"outer({self.vector('key', depth - 1)}, {self.vector('value', depth - 1)})"
        if r < 0.5:
            return self.unary(self.matrix(depth - 1), self.rng.choice(MATRIX_UNARY))
        if r < 0.6:
            return f"softmax({self.matrix(depth - 1)}, {self.rng.choice(list(OTHER_AXIS))})"
        if r < 0.8:
            return self.binary(self.matrix(depth - 1), lambda: self.matrix(depth - 1))
        if r < 0.9:  # a vector spread along the axis of its size
            size = self.rng.choice(list(OTHER_AXIS))
            return f"({self.matrix(depth - 1)}) * ({self.vector(size, depth - 1)})"
        return f"({self.scalar(depth - 1)}) * ({self.matrix(depth - 1)})"


def random_matrix_spec(seed: int) -> str:
    """The YAML text of a random valid cell with a matrix state M: [key, value] and a vector
    state h: value (sizes differ, so no axis is ambiguous)."""
    rng = random.Random(seed)
    sizes = ["input", "key", "value"]
    pool: dict[str, list[str]] = {"input": ["x"], "key": [], "value": ["h_prev"]}
    g = MatrixGen(rng, sizes, pool)
    g.matrices = ["M_prev"]
    depth = rng.randint(1, 3)
    lines = g.intermediates(depth, 2)
    decay = rng.choice(["0.9 * M_prev + ", "M_prev * sigmoid(h_prev) + ", ""])
    lines.append(f"M = {decay}{g.matrix(depth)}")
    g.matrices.append("M")
    read = g.from_matrix("value", depth) if rng.random() < 0.7 else g.vector("value", depth)
    lines.append(f"h = tanh({read})")
    outputs = ["h"]
    if rng.random() < 0.4:
        size = rng.choice(sizes)
        lines.append(f"y = {g.vector(size, depth)}")
        outputs.append("y")
    if rng.random() < 0.2:
        outputs.append("M")
    rng.shuffle(lines)
    return _spec_text(f"mfuzz{seed}", sizes, {"x": "input"}, {"M": "[key, value]", "h": "value"},
                      outputs, g.params, lines)
