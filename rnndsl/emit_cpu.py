"""Stage 7, emit (cpu): a kernel plan becomes the text of a Python module of Numba kernels.

The module has two plain-Python entry points, `forward` and `backward`, that allocate arrays,
stack weights and run the big GEMMs with NumPy, and `@njit` kernels that run the whole time
loop in compiled code: per step, the stacked GEMMs of each stage (np.dot into preallocated
buffers) and one fused loop nest per elementwise phase. Every identifier in the text is made
here (p0, s1, x0, ...); the names from the spec appear only in the header's legend comment.
"""
from __future__ import annotations

import math

import numpy as np

from . import ir
from .errors import SpecError
from .ir import Node
from .kernel_lib import kernel_functions
from .ops import OPS
from .schedule import Buffer, Plan, Program

MAX_SIZE = 4096  # the largest size a fused loop's row buffer holds
ROW = MAX_SIZE + 64  # the row buffer's block stride (padded off the same cache sets)
FASTMATH = '{"nsz", "arcp", "contract", "afn"}'


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


def emit_module(plan: Plan, dtype: str, header: str) -> str:
    names = Names(plan)
    kernels = []
    if plan.pre is not None:
        kernels.append(_Kernel(plan, names, plan.pre, "pre").text())
    fwd = _Kernel(plan, names, plan.forward, "forward")
    inf = _Kernel(plan, names, plan.infer, "infer")
    bwd = _Kernel(plan, names, plan.back, "backward")
    kernels += [fwd.text(), inf.text(), bwd.text()]
    glue = [_forward_glue(plan, names, fwd, save=True), _forward_glue(plan, names, inf, save=False),
            _backward_glue(plan, names, bwd)]
    consts = constant_lines(names, dtype)
    return "\n".join([
        header,
        "import math",
        "",
        "import numpy as np",
        "from numba import njit",
        "",
        "from rnndsl.blas import gemm",
        "from rnndsl.scratch import empty",
        "",
        f"DT = np.{dtype}",
        f"FAST = {FASTMATH}",
        consts,
        kernel_functions(dtype, "cpu"),
        *kernels,
        *glue,
    ])


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
            ("states", names.state, {s: (n,) for s, n in step.states.items()}),
            ("outputs", names.output, {o: step.shape_of(o) for o in step.outputs}),
            ("params", names.param, {p: i.shape for p, i in step.params.items()})):
        items = ", ".join(f"{code}={name}{'(' + ','.join(shapes[name]) + ')' if shapes[name] else ''}"
                          for name, code in table.items())
        out.append(f"#   {title}: {items}")
    return out


# -- kernels --------------------------------------------------------------------------------
class _Kernel:
    """One @njit function: the time loop of a program (or, for `pre`, a loop over all rows)."""

    def __init__(self, plan: Plan, names: Names, prog: Program, kind: str):
        self.plan, self.names, self.prog, self.kind = plan, names, prog, kind
        self.arrays: set[str] = set()
        self.sizes_used: set[str] = set()
        self.row_width = 0  # rows of the `row` buffer the fused loops need
        self.body = self._body()

    @property
    def name(self) -> str:
        return f"{self.kind}_loop"

    def args(self) -> list[str]:
        return ["T", "B", *self.names.size.values(), "lengths", *sorted(self.arrays)]

    def text(self) -> str:
        head = [f"@njit(cache=True, fastmath=FAST, error_model=\"numpy\")",
                f"def {self.name}({', '.join(self.args())}):"]
        floats = [f"    z_{self.names.size[s]} = DT({self.names.size[s]})"
                  for s in sorted(self.sizes_used)]
        return "\n".join(head + floats + self.body) + "\n"

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
        kind, array, block = self.prog.reads[n.uid]
        names = self.names
        if kind == "hoisted":
            g = next(g for g in self.plan.hoisted if g.name == array)
            off = names.sizes([p.shape[0] for p in g.products[:block]])
            return f"{self.use(array)}[t, b, {self.col(n, off)}]"
        if kind == "gemm":
            g = next(g for g in self.prog.gemms if g.name == array)
            off = names.sizes([p.shape[0] for p in g.products[:block]])
            return f"{self.use('g_' + array)}[b, {self.col(n, off)}]"
        if kind == "gemm_t":
            return f"{self.use('g_' + array)}[b, j]"
        if kind == "tape":
            off = names.sizes(self.plan.tape.offset(block))
            return f"{self.use('tape')}[t, b, {self.col(n, off)}]"
        assert kind == "vector"
        return f"{self.use(array)}[t, b, j]"

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
        names, name = self.names, n.attr
        idx = "j" if n.shape else "0"
        terms = []
        if name in names.state:
            terms.append(f"{self.use('d' + names.state[name])}[t + 1, b, {idx}]")
        if name in names.output:
            terms.append(f"{self.use('d' + names.output[name])}[t, b, {idx}]")
        return f"(({' + '.join(terms)}) if live else C0)"

    def expr(self, n: Node, here) -> str:
        if n.op == "bcast":
            return self.ref(n.args[0], here)
        args = [self.ref(a, here) for a in n.args]
        if n.op == "pow" and n.args[1].is_const(2.0):
            return f"({args[0]} * {args[0]})"
        if n.op == "pow" and n.args[1].is_const(0.5):
            return f"math.sqrt({args[0]})"
        return OPS[n.op].code(n.op).format(*args)

    # -- stores -------------------------------------------------------------------------------
    def store(self, s, value: str) -> str:
        names, n = self.names, s.node
        j = "j" if n.shape else "0"
        if s.kind == "state":
            a = self.use(names.state[s.target])
            return f"{a}[t + 1, b, {j}] = {value} if live else {a}[t, b, {j}]"
        if s.kind == "output":
            return f"{self.use(names.output[s.target])}[t, b, {j}] = {value} if live else C0"
        if s.kind == "dprev":
            a = self.use("d" + names.state[s.target])
            return f"{a}[t, b, {j}] = {value} if live else {a}[t + 1, b, {j}]"
        if s.target.startswith("dx:"):
            return f"{self.use('d' + names.input[s.target[3:]])}[t, b, j] = {value}"
        if s.target == "tape":
            buf = self.plan.tape
        else:
            buf = self._buffer(s.target)
        off = names.sizes(buf.offset(s.block))
        return f"{self.use(buf.name)}[t, b, {self.col(n, off)}] = {value}"

    def _buffer(self, name: str) -> Buffer:
        for b in self.plan.grad_buffers + list(self.plan.vectors.values()):
            if b.name == name:
                return b
        raise KeyError(name)

    # -- the loop nest --------------------------------------------------------------------------
    def _body(self) -> list[str]:
        prog = self.prog
        out = []
        time = "range(T - 1, -1, -1)" if prog.reverse else "range(T)"
        out.append(f"    for t in {time}:")
        for ph in prog.phases:
            for g in prog.gemms:
                if g.stage == ph.index:
                    out.append(f"        np.dot({self._gemm_vector(g.vector)}, "
                               f"{self.use('w_' + g.name)}, {self.use('g_' + g.name)})")
            for g in prog.gemm_ts:
                if g.stage == ph.index:
                    out.append(f"        np.dot({self.use(g.buffer.name)}[t], "
                               f"{self.use('w_' + g.name)}, {self.use('g_' + g.name)})")
            if not ph.steps:
                continue
            out.append("        for b in range(B):")
            out.append("            live = t < lengths[b]")
            stores_at = {}
            for s in prog.stores:
                stores_at.setdefault(prog.place[s.node.uid], []).append(s)
            for k, (kind, item) in enumerate(ph.steps):
                here = (ph.index, k)
                if kind == "scalar":
                    lines = []
                    if item is not None:
                        lines.append(f"{self.var(item)} = {self.expr(item, here)}")
                        lines += self._spill(item)
                    lines += [self.store(s, self.ref(s.node, here)) for s in stores_at.get(here, [])]
                    out += [" " * 12 + line for line in lines]
                    continue
                size, nodes = item
                inits, body, after = [], [], []  # a reduction is final only after the loop
                writes = []  # (value, how to write a value) of every vector result
                for n in nodes:
                    if n.op in ("rsum", "rmax"):
                        inits.append(f"{self.var(n)} = {'C0' if n.op == 'rsum' else 'CNEG'}")
                        arg = self.ref(n.args[0], here)
                        body.append(f"{self.var(n)} += {arg}" if n.op == "rsum"
                                    else f"{self.var(n)} = maximum({self.var(n)}, {arg})")
                        after += self._spill(n)
                        continue
                    body.append(f"{self.var(n)} = {self.expr(n, here)}")
                    if n.uid in self.prog.spills:
                        writes.append((self.var(n), lambda v, n=n: self._spill(n, v)[0]))
                for s in stores_at.get(here, []):
                    if s.node.shape:
                        writes.append((self.ref(s.node, here), lambda v, s=s: self.store(s, v)))
                    else:
                        after.append(self.store(s, self.ref(s.node, here)))
                n_j = self.names.size[size]
                if len(writes) <= 1:
                    body += [write(value) for value, write in writes]
                    out += [" " * 12 + line for line in inits]
                    out.append(f"            for j in range({n_j}):")
                    out += [" " * 16 + line for line in body]
                    out += [" " * 12 + line for line in after]
                    continue
                # LLVM vectorises the fused loop only if it can prove its stores independent:
                # so it fills one row buffer whose blocks lie a constant ROW apart, and simple
                # loops copy the blocks to where they belong.
                self.row_width = max(self.row_width, len(writes))
                body += [f"{self.use('row')}[{k * ROW} + j] = {value}"
                         for k, (value, _) in enumerate(writes)]
                out += [" " * 12 + line for line in inits]
                out.append(f"            for j in range({n_j}):")
                out += [" " * 16 + line for line in body]
                for k, (_, write) in enumerate(writes):
                    out.append(f"            for j in range({n_j}):")
                    out.append(" " * 16 + write(f"row[{k * ROW} + j]"))
                out += [" " * 12 + line for line in after]
        if len(out) == 1:
            out.append("        pass")
        return out

    def _spill(self, n: Node, value: str | None = None) -> list[str]:
        sp = self.prog.spills.get(n.uid)
        if sp is None:
            return []
        return [f"{self.use(sp)}[b{', j' if n.shape else ''}] = {value or self.var(n)}"]

    def _gemm_vector(self, v: Node) -> str:
        if v.op == "prev":
            return f"{self.use(self.names.state[v.attr])}[t]"
        buf = self.plan.vectors[v.uid]
        return f"{self.use(buf.name)}[t]"


# -- glue -----------------------------------------------------------------------------------
def _stack(plan_names: Names, weights, transpose: bool = False) -> str:
    parts = ", ".join(plan_names.param[w] for w in weights)
    stacked = f"np.concatenate(({parts},))"
    return f"np.ascontiguousarray({stacked}.T)" if transpose else stacked


def _unpack(names: list[str], source: str) -> str:
    if not names:
        return f"    assert not {source}"
    return f"    {', '.join(names)}{',' if len(names) == 1 else ''} = {source}"


def _tuple(items) -> str:
    items = list(items)
    return f"({', '.join(items)},)" if items else "()"


def _forward_glue(plan: Plan, names: Names, k: _Kernel, save: bool) -> str:
    """`forward` keeps what backward needs (the tape); `infer` does not."""
    step = plan.step
    L = [f"def {'forward' if save else 'infer'}(params, xs, state0, lengths, sizes):",
         _unpack(list(names.param.values()), "params"),
         _unpack(list(names.input.values()), "xs"),
         _unpack(list(names.size.values()), "sizes"),
         "    T, B = xs[0].shape[0], xs[0].shape[1]"]
    L += _scalar_params(plan, names)
    if plan.pre is not None:
        pre = _Kernel(plan, names, plan.pre, "pre")
        for v, buf in plan.vectors.items():
            if buf.name.startswith("pvec"):
                L.append(f"    {buf.name} = empty((T, B, {names.sizes(buf.width())}), DT)")
        L += _spill_allocs(plan, names, pre)
        L.append(f"    pre_loop({', '.join(pre.args())})")
    for g in plan.hoisted:
        v = g.vector
        src = names.input[v.attr] if v.op == "input" else plan.vectors[v.uid].name
        L.append(f"    {g.name} = gemm({src}.reshape(T * B, -1), {_stack(names, g.weights)}.T)"
                 f".reshape(T, B, -1)")
    for g in plan.forward.gemms:
        L.append(f"    w_{g.name} = {_stack(names, g.weights, transpose=True)}")
        L.append(f"    g_{g.name} = empty((B, w_{g.name}.shape[1]), DT)")
    for s, code in names.state.items():
        L.append(f"    {code} = empty((T + 1, B, {names.size[step.states[s]]}), DT)")
        L.append(f"    {code}[0] = state0[{list(names.state).index(s)}]")
    for o, code in names.output.items():
        L.append(f"    {code} = empty((T, B, {_width(names, step.shape_of(o))}), DT)")
    if save:
        L.append(f"    tape = empty((T, B, {names.sizes(plan.tape.width())}), DT)")
    for buf in plan.vectors.values():
        if not buf.name.startswith("pvec"):
            L.append(f"    {buf.name} = empty((T, B, {names.sizes(buf.width())}), DT)")
    L += _spill_allocs(plan, names, k)
    L.append(f"    {k.name}({', '.join(k.args())})")
    outs = ", ".join(names.output.values())
    finals = ", ".join(f"{c}[T]" for c in names.state.values())
    if not save:
        L.append(f"    return ({outs},), ({finals},)")
        return "\n".join(L) + "\n"
    saved = ", ".join([*names.state.values(), *(g.name for g in plan.hoisted), "tape",
                       *(b.name for b in plan.vectors.values())])
    L.append(f"    return ({outs},), ({finals},), ({saved},)")
    return "\n".join(L) + "\n"


def backward_preamble(plan: Plan, names: Names, extra_args: str = "") -> list[str]:
    """The opening of a generated `backward`: its signature and its arguments unpacked into
    the compiler's names (shared by the CPU and CUDA targets)."""
    saved = [*names.state.values(), *(g.name for g in plan.hoisted), "tape",
             *(b.name for b in plan.vectors.values())]
    return [f"def backward(params, xs, lengths, saved, d_outputs, d_final, sizes{extra_args}):",
            _unpack(list(names.param.values()), "params"),
            _unpack(list(names.input.values()), "xs"),
            _unpack(list(names.size.values()), "sizes"),
            _unpack(saved, "saved"),
            _unpack([f"d{c}" for c in names.output.values()], "d_outputs"),
            "    T, B = xs[0].shape[0], xs[0].shape[1]"]


def _backward_glue(plan: Plan, names: Names, k: _Kernel) -> str:
    step = plan.step
    L = backward_preamble(plan, names)
    L += _scalar_params(plan, names)
    for s, code in names.state.items():
        L.append(f"    d{code} = empty((T + 1, B, {names.size[step.states[s]]}), DT)")
        L.append(f"    d{code}[T] = d_final[{list(names.state).index(s)}]")
    for x, code in names.input.items():
        make = "empty" if x in plan.input_rest else "zeros"
        L.append(f"    d{code} = np.{make}((T, B, {names.size[step.inputs[x]]}), DT)")
    for buf in plan.grad_buffers:
        L.append(f"    {buf.name} = empty((T, B, {names.sizes(buf.width())}), DT)")
    for g in plan.back.gemm_ts:
        L.append(f"    w_{g.name} = {_stack(names, g.node.attr)}")
        L.append(f"    g_{g.name} = empty((B, w_{g.name}.shape[1]), DT)")
    L += _spill_allocs(plan, names, k)
    L.append(f"    backward_loop({', '.join(k.args())})")
    L.append("    # after the loop: input and weight gradients as GEMMs over all T*B rows")
    for x, g in plan.deferred:
        L.append(f"    d{names.input[x]} += gemm({g.buffer.name}.reshape(T * B, -1), "
                 f"{_stack(names, g.node.attr)}).reshape(T, B, -1)")
    grads = {p: f"d{code}" for p, code in names.param.items()}
    for p, code in names.param.items():
        L.append(f"    d{code} = np.zeros_like({code})")
    for w in plan.weight_grads:
        v = w.vector
        src = (f"{names.state[v.attr]}[:T]" if v.op == "prev" else
               names.input[v.attr] if v.op == "input" else plan.vectors[v.uid].name)
        L.append(f"    m = gemm({w.buffer.name}.reshape(T * B, -1).T, {src}.reshape(T * B, -1))")
        for k_, wname in enumerate(w.weights):
            node = w.buffer.columns[k_][0]
            off = names.sizes(w.buffer.offset(k_))
            L.append(f"    {grads[wname]} += m[{off}:{off} + {names.size[node.shape[0]]}]")
    summed = set()  # vector and scalar parameters: column sums of a gradient buffer
    for p, (buf, block) in plan.param_grads.items():
        if buf.name not in summed:
            summed.add(buf.name)
            L.append(f"    sum_{buf.name} = {buf.name}.reshape(T * B, -1).sum(axis=0)")
        node = buf.columns[block][0]
        off = names.sizes(buf.offset(block))
        end = f"{off} + {names.size[node.shape[0]]}" if node.shape else f"{off} + 1"
        L.append(f"    {grads[p]} += sum_{buf.name}[{off}:{end}]{'' if node.shape else '.sum()'}")
    dparams = _tuple(f"{grads[p]}.reshape({names.param[p]}_shape)" if not i.shape else grads[p]
                     for p, i in step.params.items())
    dxs = _tuple(f"d{c}" for c in names.input.values())
    d0 = _tuple(f"d{c}[0]" for c in names.state.values())
    L.append(f"    return {dparams}, {dxs}, {d0}")
    return "\n".join(L) + "\n"


def _scalar_params(plan: Plan, names: Names) -> list[str]:
    """Kernels read scalar parameters as one-element arrays."""
    out = []
    for p, info in plan.step.params.items():
        if not info.shape:
            c = names.param[p]
            out.append(f"    {c}_shape = np.shape({c})")
            out.append(f"    {c} = np.reshape({c}, 1)")
    return out


def _spill_allocs(plan: Plan, names: Names, k: _Kernel) -> list[str]:
    """Scratch arrays: spilled values, and the row buffer of the fused loops."""
    out = []
    if k.row_width:
        out.append(f"    if max(sizes) > {MAX_SIZE}:")
        out.append(f"        raise ValueError('sizes above {MAX_SIZE} are not supported')")
        out.append(f"    row = empty({k.row_width * ROW}, DT)")
    nodes = {n.uid: n for n in ir.topo_order([s.node for s in k.prog.stores] +
                                            [g.vector for g in k.prog.gemms] +
                                            [a for g in k.prog.gemm_ts for a in g.node.args])}
    for uid, sp in k.prog.spills.items():
        n = nodes[uid]
        shape = f"(B, {names.size[n.shape[0]]})" if n.shape else "(B,)"
        out.append(f"    {sp} = empty({shape}, DT)")
    return out


def _width(names: Names, shape: tuple[str, ...]) -> str:
    return names.size[shape[0]] if shape else "1"
