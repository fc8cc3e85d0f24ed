"""Stage 7, emit (cpu): a kernel plan becomes the text of a Python module of Numba kernels.

The module has two plain-Python entry points, `forward` and `backward`, that allocate arrays,
stack weights and run the big GEMMs with NumPy, and `@njit` kernels that run the whole time
loop in compiled code: per step, the stacked GEMMs of each stage and one fused loop nest per
elementwise phase.

The per-step products (h_prev @ the stacked recurrent weights forward, the stacked W.T @ g
backward) are small and multiply the same matrix T times, so the glue packs each stacked matrix
once per pass (`pack`: contiguous panels of a few columns) and the kernel calls `packed_dot`, a
register-blocked micro-kernel, into an output buffer as wide as the padded panels; the fused
loops read only its first columns. Blocks of more than `packed.MICRO_MAX_ROWS` rows go to BLAS
instead (the rule and its measurements: packed.py). Each loop kernel runs a chunk of the batch
rows, [b0, b1), and releases the GIL: the glue hands the chunks to row_threads.run_rows, one
thread each (rows never meet inside a time loop). What it shares with the CUDA target
(names, reads and stores, the code writer) is in emit_common.py. Every identifier in the text
is made by the compiler (p0, s1, x0, ...); the spec's names appear only in the header's legend
comment.
"""
from __future__ import annotations

from collections import Counter

from rnndsl.symbolic import ir
from rnndsl.backend.emit_common import (Code, KernelWriter, Names, as_tuple, backward_preamble,
                          cpu_module_head, function, stack_blocks, stage_products, unpack)
from rnndsl.symbolic.ir import Node
from rnndsl.backend.schedule import REDUCTIONS, Loop, Plan, Program, Role, Scalar

MAX_SIZE = 4096  # the largest size a fused loop's row buffer holds
ROW = MAX_SIZE + 64  # the row buffer's block stride (padded off the same cache sets)


def emit_module(plan: Plan, dtype: str, header: str) -> str:
    names = Names(plan)
    kernels = []
    if plan.pre is not None:
        kernels.append(_LoopKernel(plan, names, plan.pre, "pre").text())
    fwd = _LoopKernel(plan, names, plan.forward, "forward")
    inf = _LoopKernel(plan, names, plan.infer, "infer")
    bwd = _LoopKernel(plan, names, plan.back, "backward")
    kernels += [fwd.text(), inf.text(), bwd.text()]
    glue = [_forward_glue(plan, names, fwd, save=True), _forward_glue(plan, names, inf, save=False),
            _backward_glue(plan, names, bwd)]
    return "\n".join([
        *cpu_module_head(header, names, dtype,
                         "from rnndsl.backend.packed import (block_dot, block_product, pack, "
                         "pack_blocks,\n    packed_dot, packed_width, stacked_weight_grads)\n"
                         "from rnndsl.backend.panel_gemm import weight_product\n"
                         "from rnndsl.backend.row_threads import chunk_rows, row_chunks, run_rows\n"
                         "from rnndsl.backend.simd import row_max, row_sum"),
        *kernels,
        *glue,
    ])


# -- kernels --------------------------------------------------------------------------------
class _LoopKernel(KernelWriter):
    """One @njit function: the time loop of a program (or, for `pre`, a loop over all rows)."""

    def __init__(self, plan: Plan, names: Names, prog: Program, kind: str):
        self.row_width = 0  # rows of the `row` buffer the fused loops need
        super().__init__(plan, names, prog, kind)

    @property
    def name(self) -> str:
        return f"{self.kind}_loop"

    def text(self) -> str:
        head = [f"@njit(cache=True, fastmath=FAST, error_model=\"numpy\", nogil=True)",
                f"def {self.name}({', '.join(self.args())}):"]
        return "\n".join(head + self.size_floats() + self.body) + "\n"

    def args(self) -> list[str]:
        """The loop runs batch rows [b0, b1) (row_threads.run_rows), with its own `row`."""
        return ["T", "b0", "b1", "row", *self.names.size.values(), "lengths",
                *sorted(self.arrays - {"row"})]

    def call(self) -> str:
        """The glue's call: every chunk of the rows, each on a thread with its own `row`."""
        return (f"run_rows({self.name}, T, chunks, "
                f"(empty((len(chunks), {max(self.row_width * ROW, 1)}), DT),), "
                f"{', '.join(self.args()[4:])})")

    def _body(self) -> list[str]:
        prog, code = self.prog, Code(level=1)
        with code.block(f"for t in {'range(T - 1, -1, -1)' if prog.reverse else 'range(T)'}:"):
            for ph in prog.phases:
                gemms, gemm_ts = stage_products(prog, ph.index)
                for g in gemms:
                    code(f"{self._dot(g.weights)}({self._gemm_vector(g.vector)}, "
                         f"{self.use('w_' + g.name)}, {self.use('g_' + g.name)}[b0:b1])")
                for g in gemm_ts:
                    code(f"{self._dot(g.node.attr)}({self.use(g.buffer.name)}[t, b0:b1], "
                         f"{self.use('w_' + g.name)}, {self.use('g_' + g.name)}[b0:b1])")
                if ph.steps:
                    with code.block("for b in range(b0, b1):"):
                        code("live = t < lengths[b]")
                        for k, step in enumerate(ph.steps):
                            self._step(code, step, (ph.index, k))
        return code.lines

    def _step(self, code: Code, step: Loop | Scalar, here: tuple[int, int]):
        stores = self.stores_at.get(here, [])
        if isinstance(step, Scalar):
            if step.node is not None:
                code(f"{self.var(step.node)} = {self.expr(step.node, here)}", *self.spill(step.node))
            code(*(self.store(s, self.ref(s.node, here)) for s in stores))
            return
        body, after = [], []
        writes = []  # (value, how to write a value) of every vector result
        reductions = []  # row sums and maxima: final only after the loop
        for n in step.nodes:
            if n.op in REDUCTIONS:
                reductions.append(n)
                after += self.spill(n)
                continue
            body.append(f"{self.var(n)} = {self.expr(n, here)}")
            if n.uid in self.prog.spills:
                writes.append((self.var(n), lambda v, n=n: self.spill(n, v)[0]))
        for s in stores:
            if s.node.shape:
                writes.append((self.ref(s.node, here), lambda v, s=s: self.store(s, v)))
            else:
                after.append(self.store(s, self.ref(s.node, here)))
        size = self.names.size[step.size]
        loop = f"for j in range({size}):"
        if len(writes) <= 1 and not reductions:
            with code.block(loop):
                code(*body, *(write(value) for value, write in writes))
            code(*after)
            return
        # LLVM vectorises the fused loop only if it can prove its stores independent and
        # has no reduction to reorder: so it fills one row buffer whose blocks lie a constant
        # ROW apart (its results, then the terms of its reductions), simple loops copy the
        # results to where they belong, and simd.py sums the terms in a fixed order.
        terms = [self.ref(n.args[0], here) for n in reductions]
        blocks = [value for value, _ in writes] + terms
        self.row_width = max(self.row_width, len(blocks))
        with code.block(loop):
            code(*body, *(f"{self.use('row')}[{k * ROW} + j] = {value}"
                          for k, value in enumerate(blocks)))
        for k, (_, write) in enumerate(writes):
            with code.block(loop):
                code(write(f"row[{k * ROW} + j]"))
        for k, n in enumerate(reductions, len(writes)):
            reduce, first = ("row_sum", "C0") if n.op == "rsum" else ("row_max", "CNEG")
            code(f"{self.var(n)} = {reduce}(row, {k * ROW}, {size}, {first})")
        code(*after)

    def _dot(self, weights) -> str:
        """The per-step product of a stack: by its diagonal blocks if it has any."""
        return "block_dot" if stack_blocks(self.plan, self.names, weights) else "packed_dot"

    def _gemm_vector(self, v: Node) -> str:
        if v.op == "prev":
            return f"{self.use(self.names.state[v.attr])}[t, b0:b1]"
        buf = self.plan.vectors[v.uid]
        return f"{self.use(buf.name)}[t, b0:b1]"


# -- glue -----------------------------------------------------------------------------------
def _stack(plan_names: Names, weights) -> str:
    parts = ", ".join(plan_names.param[w] for w in weights)
    return f"np.concatenate(({parts},))"


def _product(plan: Plan, names: Names, weights, rows: str, transposed: bool) -> str:
    """`rows` (2-D) times the stack of `weights` as code: transposed, rows @ stack (the sum
    of W.T @ g), else rows @ stack.T; a stack with block-diagonal weights by its blocks."""
    parts = stack_blocks(plan, names, weights)
    stacked = _stack(names, weights) + ("" if transposed else ".T")
    if parts is None:
        return f"weight_product({rows}, {stacked})"
    return f"block_product({rows}, pack_blocks({stacked}, {parts}, {transposed}))"


def _packed_product(code: Code, plan: Plan, names: Names, name: str, weights,
                    transposed: bool):
    """The weights of a per-step product, packed once per pass, and its output buffer."""
    parts = stack_blocks(plan, names, weights)
    stacked = _stack(names, weights) + ("" if transposed else ".T")
    code(f"w_{name} = pack({stacked}, chunk_rows(chunks))" if parts is None else
         f"w_{name} = pack_blocks({stacked}, {parts}, {transposed})",
         f"g_{name} = empty((B, packed_width(w_{name})), DT)")


def _elementwise(plan: Plan, names: Names, products) -> str:
    """row_chunks' second argument for a pass with these per-step `products`: none if it has
    any, else its elements per row (T times the first state's width)."""
    if products:
        return ""
    first = next(iter(plan.step.states.values()))
    return f", T * {names.size[first]}"


def _forward_glue(plan: Plan, names: Names, k: _LoopKernel, save: bool) -> str:
    """`forward` keeps what backward needs (the tape); `infer` does not."""
    step = plan.step
    L = function(f"def {'forward' if save else 'infer'}(params, xs, state0, lengths, sizes):")
    L(unpack(list(names.param.values()), "params"),
      unpack(list(names.input.values()), "xs"),
      unpack(list(names.size.values()), "sizes"),
      "T, B = xs[0].shape[0], xs[0].shape[1]",
      f"chunks = row_chunks(B{_elementwise(plan, names, plan.forward.gemms)})")
    L(*_scalar_params(plan, names))
    if plan.pre is not None:
        pre = _LoopKernel(plan, names, plan.pre, "pre")
        for v, buf in plan.vectors.items():
            if buf.role is Role.PRE_VECTOR:
                L(f"{buf.name} = empty((T, B, {names.sizes(buf.width())}), DT)")
        _spill_allocs(L, plan, names, pre)
        L(pre.call())
    for g in plan.hoisted:
        v = g.vector
        src = names.input[v.attr] if v.op == "input" else plan.vectors[v.uid].name
        L(f"{g.name} = {_product(plan, names, g.weights, f'{src}.reshape(T * B, -1)', False)}"
          f".reshape(T, B, -1)")
    for g in plan.forward.gemms:
        _packed_product(L, plan, names, g.name, g.weights, False)
    for s, code in names.state.items():
        L(f"{code} = empty((T + 1, B, {names.size[step.states[s]]}), DT)")
        L(f"{code}[0] = state0[{list(names.state).index(s)}]")
    for o, code in names.output.items():
        L(f"{code} = empty((T, B, {_width(names, step.shape_of(o))}), DT)")
    if save:
        L(f"tape = empty((T, B, {names.sizes(plan.tape.width())}), DT)")
    for buf in plan.vectors.values():
        if buf.role is not Role.PRE_VECTOR:
            L(f"{buf.name} = empty((T, B, {names.sizes(buf.width())}), DT)")
    _spill_allocs(L, plan, names, k)
    L(k.call())
    outs = ", ".join(names.output.values())
    finals = ", ".join(f"{c}[T]" for c in names.state.values())
    if not save:
        L(f"return ({outs},), ({finals},)")
        return L.text() + "\n"
    saved = ", ".join([*names.state.values(), *(g.name for g in plan.hoisted), "tape",
                       *(b.name for b in plan.vectors.values())])
    L(f"return ({outs},), ({finals},), ({saved},)")
    return L.text() + "\n"


def _backward_glue(plan: Plan, names: Names, k: _LoopKernel) -> str:
    step = plan.step
    L = backward_preamble(plan, names)
    L(f"chunks = row_chunks(B{_elementwise(plan, names, plan.back.gemm_ts)})")
    L(*_scalar_params(plan, names))
    for s, code in names.state.items():
        L(f"d{code} = empty((T + 1, B, {names.size[step.states[s]]}), DT)")
        L(f"d{code}[T] = d_final[{list(names.state).index(s)}]")
    deferred = Counter(x for x, _ in plan.deferred)
    # an input gradient that is one product after the loop is that product (or nothing, with
    # input_grads false: Cell.backward drops it), not zeros it is added to
    only_product = {x for x, n in deferred.items() if n == 1 and x not in plan.input_rest}
    for x, code in names.input.items():
        if x in only_product:
            continue
        make = "empty" if x in plan.input_rest else "np.zeros"
        L(f"d{code} = {make}((T, B, {names.size[step.inputs[x]]}), DT)")
    for buf in plan.grad_buffers:
        L(f"{buf.name} = empty((T, B, {names.sizes(buf.width())}), DT)")
    for g in plan.back.gemm_ts:
        _packed_product(L, plan, names, g.name, g.node.attr, True)
    _spill_allocs(L, plan, names, k)
    L(k.call())
    L("# after the loop: input and weight gradients as GEMMs over all T*B rows")
    for x, g in plan.deferred:
        code = names.input[x]
        product = _product(plan, names, g.node.attr, f"{g.buffer.name}.reshape(T * B, -1)", True)
        value = f"{product}[:, :{names.size[step.inputs[x]]}].reshape(T, B, -1)"
        if x in only_product:
            L(f"d{code} = {value} if input_grads else None")
            continue
        with L.block("if input_grads:"):
            L(f"d{code} += {value}")
    grads = {p: f"d{code}" for p, code in names.param.items()}
    # a gradient with one contribution is that contribution (a GEMM's rows, a copied column
    # sum): zeroing an array and adding it in cost a pass over every weight (at B=16,
    # I=H=128 a tenth of a one-step LSTM backward's 350 us)
    terms = Counter([p for w in plan.weight_grads for p in w.weights] +
                    [p for p in plan.param_grads])
    single = {p for p, n in terms.items() if n == 1 and step.params[p].shape}
    for p, code in names.param.items():
        if p not in single:
            L(f"d{code} = np.zeros_like({code})")

    def add(p: str, value: str):
        L(f"{grads[p]} = {value}" if p in single else f"{grads[p]} += {value}")
    for w in plan.weight_grads:
        v = w.vector
        src = (f"{names.state[v.attr]}[:T]" if v.op == "prev" else
               names.input[v.attr] if v.op == "input" else plan.vectors[v.uid].name)
        parts = as_tuple(f"({names.param[p]}.shape[0], {step.params[p].blocks})"
                         for p in w.weights)
        L(f"m = stacked_weight_grads({w.buffer.name}.reshape(T * B, -1), "
          f"{src}.reshape(T * B, -1), {parts})")
        for k_, wname in enumerate(w.weights):
            add(wname, f"m[{k_}]")
    summed = set()  # vector and scalar parameters: column sums of a gradient buffer
    for p, (buf, block) in plan.param_grads.items():
        if buf.name not in summed:
            summed.add(buf.name)
            L(f"sum_{buf.name} = {buf.name}.reshape(T * B, -1).sum(axis=0)")
        node = buf.columns[block][0]
        off = names.sizes(buf.offset(block))
        end = f"{off} + {names.size[node.shape[0]]}" if node.shape else f"{off} + 1"
        # a copy: parameters that share a column sum (an LSTM's two biases per gate) must
        # not share one array, which an optimiser would update in place twice
        add(p, f"sum_{buf.name}[{off}:{end}]" + (".copy()" if node.shape else ".sum()"))
    dparams = as_tuple(f"{grads[p]}.reshape({names.param[p]}_shape)" if not i.shape else grads[p]
                     for p, i in step.params.items())
    dxs = as_tuple(f"d{c}" for c in names.input.values())
    d0 = as_tuple(f"d{c}[0]" for c in names.state.values())
    L(f"return {dparams}, {dxs}, {d0}")
    return L.text() + "\n"


def _scalar_params(plan: Plan, names: Names) -> list[str]:
    """Kernels read scalar parameters as one-element arrays."""
    out = []
    for p, info in plan.step.params.items():
        if not info.shape:
            c = names.param[p]
            out.append(f"{c}_shape = np.shape({c})")
            out.append(f"{c} = np.reshape({c}, 1)")
    return out


def _spill_allocs(code: Code, plan: Plan, names: Names, k: _LoopKernel):
    """Scratch arrays: spilled values (run_rows makes the fused loops' row buffers)."""
    if k.row_width:
        with code.block(f"if max(sizes) > {MAX_SIZE}:"):
            code(f"raise ValueError('sizes above {MAX_SIZE} are not supported')")
    nodes = {n.uid: n for n in ir.topo_order([s.node for s in k.prog.stores] +
                                            [g.vector for g in k.prog.gemms] +
                                            [a for g in k.prog.gemm_ts for a in g.node.args])}
    for uid, sp in k.prog.spills.items():
        n = nodes[uid]
        shape = f"(B, {names.size[n.shape[0]]})" if n.shape else "(B,)"
        code(f"{sp} = empty({shape}, DT)")


def _width(names: Names, shape: tuple[str, ...]) -> str:
    return names.size[shape[0]] if shape else "1"
