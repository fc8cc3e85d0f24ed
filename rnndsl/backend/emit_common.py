"""What the CPU and CUDA emitters share: the compiler's names for what a spec names, the
module's constants and header legend, a writer of indented code, and the kernel text that
reads, computes and stores a plan's values (both targets index the plan's arrays the same way).
Each emitter (emit_cpu.py, emit_cuda.py) adds its own loop structure and glue."""
from __future__ import annotations

import math
from contextlib import contextmanager

import numpy as np

from rnndsl.language.errors import SpecError
from rnndsl.language.spec import SUM, state_shape
from rnndsl.symbolic.ir import Node
from rnndsl.symbolic.ops import OPS
from rnndsl.backend.kernel_lib import FASTMATH, kernel_functions
from rnndsl.backend.schedule import Plan, Program, ReadKind, Store, StoreKind


class Code:
    """Lines of generated Python, indented by blocks: `with code.block("for j in ..."):`."""

    def __init__(self, level: int = 0):
        self.lines: list[str] = []
        self.level = level

    def __call__(self, *lines: str) -> "Code":
        self.lines += ["    " * self.level + line for line in lines]
        return self

    @contextmanager
    def block(self, head: str):
        self(head)
        self.level += 1
        start = len(self.lines)
        try:
            yield self
        finally:
            if len(self.lines) == start:  # an empty block is not Python
                self("pass")
            self.level -= 1

    def text(self) -> str:
        return "\n".join(self.lines)


class Names:
    """Compiler-made identifiers for everything the spec names."""

    def __init__(self, plan: Plan):
        step = plan.step
        self.size = {s: f"n{k}" for k, s in enumerate(step.sizes)}
        self.input = {x: f"x{k}" for k, x in enumerate(step.inputs)}
        self.state = {s: f"s{k}" for k, s in enumerate(step.states)}
        self.output = {o: f"o{k}" for k, o in enumerate(step.outputs)}
        self.param = {p: f"p{k}" for k, p in enumerate(step.params)}
        self.consts: dict[float, str] = {0.0: "C0", 1.0: "C1", 0.5: "C05"}
        self.vars: dict[int, str] = {}

    def var(self, n: Node) -> str:
        """A computed value's local variable: numbered in the order the emitter asks, so the
        text depends on the spec alone, not on what was compiled before it."""
        return self.vars.setdefault(n.uid, f"v{len(self.vars)}")

    def const(self, value: float) -> str:
        if value not in self.consts:
            self.consts[value] = f"C{len(self.consts)}"
        return self.consts[value]

    def sizes(self, names: list[str]) -> str:
        """The sum of sizes as code ('1' stands for a scalar column)."""
        parts = [p if p == "1" else self.size[p] for p in names]
        return " + ".join(parts) if parts else "0"


def constant_lines(names: Names, dtype: str) -> str:
    """The module's constants, of its dtype. A constant that the dtype cannot hold is an
    error, not a silent inf."""
    lines = []
    for value, name in names.consts.items():
        if math.isfinite(value) and abs(value) > float(np.finfo(dtype).max):
            raise SpecError(f"the constant {value!r} does not fit in {dtype} (largest "
                            f"{float(np.finfo(dtype).max):.4g}); run the cell in float64")
        text = repr(value) if math.isfinite(value) else \
            "np.nan" if math.isnan(value) else ("np.inf" if value > 0 else "-np.inf")
        lines.append(f"{name} = DT({text})")
    return "\n".join(lines + ["CNEG = DT(-np.inf)"])


def legend(plan: Plan) -> list[str]:
    """Header comment lines: which generated name stands for which name in the spec."""
    names = Names(plan)
    step = plan.step
    out = []
    for title, table, shapes in (
            ("sizes", names.size, {s: () for s in step.sizes}),
            ("inputs", names.input, {x: (n,) for x, n in step.inputs.items()}),
            ("states", names.state, {s: state_shape(n) for s, n in step.states.items()}),
            ("outputs", names.output, {o: step.shape_of(o) for o in step.outputs}),
            ("params", names.param, {p: i.shape for p, i in step.params.items()})):
        items = ", ".join(f"{code}={name}{'(' + ','.join(shapes[name]) + ')' if shapes[name] else ''}"
                          for name, code in table.items())
        out.append(f"#   {title}: {items}")
    return out


class KernelWriter:
    """The text of one kernel of a program: how it reads each value the plan reads (inputs,
    states, parameters, hoisted and per-step products, the tape, spills), computes the others
    and stores what the plan stores. Subclasses write the loops (`_body`) and the header."""

    def __init__(self, plan: Plan, names: Names, prog: Program, kind: str):
        self.plan, self.names, self.prog, self.kind = plan, names, prog, kind
        self.arrays: set[str] = set()
        self.sizes_used: set[str] = set()
        self.stores_at: dict[tuple[int, int], list] = {}
        for s in prog.stores:
            self.stores_at.setdefault(prog.place[s.node.uid], []).append(s)
        self.body = self._body()

    def _body(self) -> list[str]:
        raise NotImplementedError

    def args(self) -> list[str]:
        """A kernel that runs the whole time loop takes every array its body uses."""
        return ["T", "B", *self.names.size.values(), "lengths", *sorted(self.arrays)]

    def size_floats(self) -> list[str]:
        """Sizes used as numbers in the arithmetic (mean's 1/n), in the module's dtype."""
        return Code(level=1)(*(f"z_{self.names.size[s]} = DT({self.names.size[s]})"
                               for s in sorted(self.sizes_used))).lines

    # -- references ---------------------------------------------------------------------------
    def var(self, n: Node) -> str:
        return self.names.var(n)

    def use(self, array: str) -> str:
        self.arrays.add(array)
        return array

    def col(self, n: Node, offset: str) -> str:
        """Column index of an element of n inside a block starting at `offset`."""
        if not n.shape:
            return offset
        return "j" if offset == "0" else f"{offset} + j"

    def read(self, n: Node) -> str:
        r, names = self.prog.reads[n.uid], self.names
        if r.kind is ReadKind.HOISTED:
            g = next(g for g in self.plan.hoisted if g.name == r.array)
            off = names.sizes([p.shape[0] for p in g.products[:r.block]])
            return f"{self.use(r.array)}[t, b, {self.col(n, off)}]"
        if r.kind is ReadKind.GEMM:
            g = next(g for g in self.prog.gemms if g.name == r.array)
            off = names.sizes([p.shape[0] for p in g.products[:r.block]])
            return f"{self.use('g_' + r.array)}[b, {self.col(n, off)}]"
        if r.kind is ReadKind.GEMM_T:
            return f"{self.use('g_' + r.array)}[b, j]"
        if r.kind is ReadKind.TAPE:
            off = names.sizes(self.plan.tape.offset(r.block))
            return f"{self.use('tape')}[t, b, {self.col(n, off)}]"
        assert r.kind is ReadKind.VECTOR
        return f"{self.use(r.array)}[t, b, j]"

    def ref(self, n: Node, here: tuple[int, int]) -> str:
        names, prog = self.names, self.prog
        if n.op == "const":
            return names.const(n.attr)
        if n.op == "size":
            self.sizes_used.add(n.attr)
            return f"z_{names.size[n.attr]}"
        if n.uid in prog.reads:
            return self.read(n)
        if n.op == "input":
            return f"{self.use(names.input[n.attr])}[t, b, j]"
        if n.op == "prev":
            return f"{self.use(names.state[n.attr])}[t, b, j]"
        if n.op == "param":
            return f"{self.use(names.param[n.attr])}[{'j' if n.shape else '0'}]"
        if n.op == "adj":
            return self.seed(n)
        where = prog.place[n.uid]
        if n.uid in prog.spills and (where != here if n.shape else where[0] != here[0]):
            return f"{self.use(prog.spills[n.uid])}[b{', j' if n.shape else ''}]"
        if n.op == "bcast":  # a per-row scalar read in place, unless spilled above
            return self.ref(n.args[0], here)
        return self.var(n)

    def seed(self, n: Node) -> str:
        """The adjoint arriving at this step: from step t+1 and from the loss, zero when
        padding."""
        idx = "j" if n.shape else "0"
        terms = seed_terms(self.names, self.use, n.attr, f"t + 1, b, {idx}", f"t, b, {idx}")
        return f"(({' + '.join(terms)}) if live else C0)"

    def expr(self, n: Node, here) -> str:
        if n.op == "bcast":
            return self.ref(n.args[0], here)
        return element_code(n, [self.ref(a, here) for a in n.args])

    # -- stores -------------------------------------------------------------------------------
    def store(self, s: Store, value: str) -> str:
        names, n = self.names, s.node
        j = "j" if n.shape else "0"
        if s.kind is StoreKind.STATE:
            a = self.use(names.state[s.target])
            return f"{a}[t + 1, b, {j}] = {value} if live else {a}[t, b, {j}]"
        if s.kind is StoreKind.OUTPUT:
            return f"{self.use(names.output[s.target])}[t, b, {j}] = {value} if live else C0"
        if s.kind is StoreKind.DPREV:
            a = self.use("d" + names.state[s.target])
            return f"{a}[t, b, {j}] = {value} if live else {a}[t + 1, b, {j}]"
        if s.kind is StoreKind.INPUT_GRAD:
            return f"{self.use('d' + names.input[s.target])}[t, b, j] = {value}"
        buf = s.target
        off = names.sizes(buf.offset(s.block))
        return f"{self.use(buf.name)}[t, b, {self.col(n, off)}] = {value}"

    def spill(self, n: Node | None, value: str | None = None) -> list[str]:
        """The write of a value that other loops or phases read (none if nobody does)."""
        sp = self.prog.spills.get(n.uid) if n is not None else None
        if sp is None:
            return []
        return [f"{self.use(sp)}[b{', j' if n.shape else ''}] = {value or self.var(n)}"]


def seed_terms(names: Names, use, name: str, from_next: str, from_loss: str) -> list[str]:
    """The parts of the adjoint of `name` arriving at a step: the gradient array of a state
    (from step t+1) indexed by `from_next`, the loss's of an output by `from_loss`; `use`
    records each array a kernel reads."""
    terms = []
    if name in names.state:
        terms.append(f"{use('d' + names.state[name])}[{from_next}]")
    if name in names.output:
        terms.append(f"{use('d' + names.output[name])}[{from_loss}]")
    return terms


def cpu_module_head(header: str, names: Names, dtype: str, imports: str,
                    fastmath: str = FASTMATH, inline: bool = True) -> list[str]:
    """The opening of a generated CPU module: imports (and the emitter's own `imports`), the
    dtype, the fastmath flags, the constants and the kernel functions (`inline`: see
    kernel_lib.kernel_functions)."""
    return [header, "import math", "", "import numpy as np", "from numba import njit", "",
            imports, "from rnndsl.backend.scratch import empty", "", f"DT = np.{dtype}",
            f"FAST = {fastmath}", constant_lines(names, dtype),
            kernel_functions(dtype, "cpu", inline)]


def element_code(n: Node, args: list[str]) -> str:
    """One element of an elementwise node, given its arguments' elements as code."""
    if n.op == "pow" and n.args[1].is_const(2.0):
        return f"({args[0]} * {args[0]})"
    if n.op == "pow" and n.args[1].is_const(0.5):
        return f"math.sqrt({args[0]})"
    return OPS[n.op].code(n.op).format(*args)


def stage_products(prog: Program, stage: int):
    """The per-step products that run before phase `stage`: the stacked forward GEMMs, then
    the stacked W.T @ g sums (each target writes its own GEMM call)."""
    return ([g for g in prog.gemms if g.stage == stage],
            [g for g in prog.gemm_ts if g.stage == stage])


# -- glue -----------------------------------------------------------------------------------
def function(signature: str) -> Code:
    """A generated function: its `def` line, then a body one level in."""
    code = Code()
    code(signature)
    code.level = 1
    return code


def unpack(names: list[str], source: str) -> str:
    if not names:
        return f"assert not {source}"
    return f"{', '.join(names)}{',' if len(names) == 1 else ''} = {source}"


def as_tuple(items) -> str:
    items = list(items)
    return f"({', '.join(items)},)" if items else "()"


def stack_blocks(plan: Plan, names: Names, weights) -> str | None:
    """The (rows, diagonal blocks) of each weight of a stack as code, if any of them is
    block-diagonal; else None (a dense stack). The rows come from the sizes, which the glue
    and the time loops of both targets have."""
    params = [plan.step.params[w] for w in weights]
    if all(p.blocks == 1 for p in params):
        return None
    return as_tuple(f"({_dim(names, p.shape[0])}, {p.blocks})" for p in params)


def _dim(names: Names, dim: str) -> str:
    """A dimension of a shape (size names or numbers, maybe summed) as code."""
    terms = dim.split(SUM)
    assert all(t in names.size or t.isdigit() for t in terms), dim
    return " + ".join(names.size.get(t, t) for t in terms)


def backward_preamble(plan: Plan, names: Names, extra_args: str = "") -> Code:
    """The opening of a generated `backward`: its signature and its arguments unpacked into
    the compiler's names (shared by the CPU and CUDA targets). With `input_grads` false the
    caller does not want the inputs' gradients (a network's first layer): their GEMMs after
    the loop are skipped, and what is returned for them is incomplete."""
    saved = [*names.state.values(), *(g.name for g in plan.hoisted), "tape",
             *(b.name for b in plan.vectors.values())]
    code = function(f"def backward(params, xs, lengths, saved, d_outputs, d_final, "
                    f"sizes{extra_args}, input_grads=True):")
    return code(unpack(list(names.param.values()), "params"),
                unpack(list(names.input.values()), "xs"),
                unpack(list(names.size.values()), "sizes"),
                unpack(saved, "saved"),
                unpack([f"d{c}" for c in names.output.values()], "d_outputs"),
                "T, B = xs[0].shape[0], xs[0].shape[1]")
