"""Stage 7, emit (cuda): a kernel plan becomes the text of a Python module of Numba CUDA kernels.

The same plan as the CPU target (schedule.py), emitted for a GPU:

* one `@cuda.jit` kernel per elementwise phase of each program (`forward_phase1`,
  `backward_phase0`, ...). A phase without row reductions runs one thread per (batch row,
  feature): grid (ceil(width / TPB), B), `j` from the x axis, `b` from the y axis, each fused
  loop of the plan an `if j < n:` block. A phase with row reductions runs one block per batch
  row: threads stride over the features, each reduction is a tree in shared memory
  (`block_sum`, `block_max`) and every thread then holds the row's value.
* the GEMMs the plan names (hoisted input GEMMs, per-step stacked GEMMs, deferred input
  gradients, weight gradients) are calls of `cs.gemm` (cuBLAS through PyTorch or CuPy, or the
  tiled Numba kernel in `cuda_support`); the time loop of the default mode is plain Python
  (`forward_steps`, `backward_steps`) that launches, per step, the GEMM of each stage and the
  phase kernel, run through `cuda_graphs.time_loop`: captured once as a CUDA graph and
  replayed where that can be done, else run as it is. Everything a pass enqueues (launches,
  copies, GEMMs) goes to the stream the glue is given.
* a persistent kernel per program (`forward_persistent`, `backward_persistent`), after
  Persistent RNNs (Diamos et al. 2016): one cooperative launch runs the whole time loop; each
  block keeps its slice of the output columns of every recurrent weight matrix in shared
  memory for the whole sequence, computes that slice of the per-step product itself, and the
  grid synchronises between stages. The glue chooses it at run time when the weights fit
  (`cs.persistent_blocks`) or when asked (`persistent=True`), and never with `False`.

The index expressions (which array, which column block, padding) come from
emit_common.KernelWriter, shared with the CPU target, so the two read and write the plan's
arrays identically. Every identifier
is made here; names from the spec appear only in the header's legend comment.
"""
from __future__ import annotations

from rnndsl.symbolic import ir
from rnndsl.backend.emit_common import (Code, KernelWriter, Names, as_tuple, backward_preamble,
                          constant_lines, function, stage_products, unpack)
from rnndsl.symbolic.ir import Node
from rnndsl.backend.kernel_lib import kernel_functions
from rnndsl.backend.schedule import REDUCTIONS, Loop, Phase, Plan, Program, Role, Scalar, StoreKind

DEVICE_FUNCTIONS = '''
@cuda.jit(device=True)
def block_sum(buf, x, tid):
    """The sum of x over the block's threads, in every thread (buf: TPB shared words)."""
    cuda.syncthreads()  # buf may still be read from the previous reduction
    buf[tid] = x
    cuda.syncthreads()
    half = TPB // 2
    while half > 0:
        if tid < half:
            buf[tid] += buf[tid + half]
        cuda.syncthreads()
        half //= 2
    return buf[0]


@cuda.jit(device=True)
def block_max(buf, x, tid):
    """The maximum of x over the block's threads, in every thread."""
    cuda.syncthreads()
    buf[tid] = x
    cuda.syncthreads()
    half = TPB // 2
    while half > 0:
        if tid < half:
            buf[tid] = maximum(buf[tid], buf[tid + half])
        cuda.syncthreads()
        half //= 2
    return buf[0]
'''


def emit_module(plan: Plan, dtype: str, header: str) -> str:
    names = Names(plan)
    progs = ([("pre", plan.pre)] if plan.pre is not None else []) + \
        [("forward", plan.forward), ("backward", plan.back)]
    phases = {kind: [_PhaseKernel(plan, names, prog, kind, ph) for ph in prog.phases if ph.steps]
              for kind, prog in progs}
    persistent = {kind: _PersistentKernel(plan, names, prog, kind)
                  for kind, prog in progs if kind != "pre"}
    kernels = [k.text() for kind, _ in progs for k in phases[kind]]
    kernels += [persistent[kind].text() for kind in ("forward", "backward")]
    glue = [_loop(plan, names, phases["forward"], plan.forward, "forward"),
            _loop(plan, names, phases["backward"], plan.back, "backward"),
            _forward_glue(plan, names, phases, persistent["forward"]),
            _backward_glue(plan, names, phases["backward"], persistent["backward"])]
    consts = constant_lines(names, dtype)
    return "\n".join([
        header,
        "import math",
        "",
        "import numpy as np",
        "",
        "from rnndsl.backend import cuda_graphs as cg",
        "from rnndsl.backend import cuda_support as cs",
        "from rnndsl.backend.cuda_support import cuda",
        "",
        f"DT = np.{dtype}",
        "TPB = cs.THREADS  # threads per block (a power of two)",
        "SHARED = cs.shared_words(np.dtype(DT).itemsize)  # shared words for recurrent weights",
        consts,
        kernel_functions(dtype, "cuda"),
        DEVICE_FUNCTIONS,
        *kernels,
        *glue,
    ])


# -- kernels --------------------------------------------------------------------------------
def _has_reduction(ph: Phase) -> bool:
    return any(isinstance(step, Loop) and any(n.op in REDUCTIONS for n in step.nodes)
               for step in ph.steps)


def _width(names: Names, ph: Phase) -> str:
    """The widest loop of a phase, as code: the extent of a flat phase's feature axis."""
    sizes = sorted({names.size[step.size] for step in ph.steps if isinstance(step, Loop)})
    if not sizes:
        return "1"
    return sizes[0] if len(sizes) == 1 else f"max({', '.join(sizes)})"


class _CudaKernel(KernelWriter):
    """Shared by the phase and persistent kernels: the elementwise work of one phase, for one
    (b, j) element (`flat`) or one batch row striped over a block's threads (`rows`)."""

    def text(self) -> str:
        head = ["@cuda.jit", f"def {self.name}({', '.join(self.args())}):"]
        return "\n".join(head + self.prologue + self.size_floats() + self.body) + "\n"

    def phase_lines(self, code: Code, ph: Phase, rows: bool):
        one = "tid == 0" if rows else "j == 0"  # the thread that writes a row's scalars
        code("live = t < lengths[b]")
        for k, step in enumerate(ph.steps):
            here = (ph.index, k)
            stores = self.stores_at.get(here, [])
            if isinstance(step, Scalar):  # every thread computes it; one writes it
                if step.node is not None:
                    code(f"{self.var(step.node)} = {self.expr(step.node, here)}")
                writes = self.spill(step.node) + \
                    [self.store(s, self.ref(s.node, here)) for s in stores]
                if writes:
                    with code.block(f"if {one}:"):
                        code(*writes)
                continue
            inits, body, after_all, after_one = [], [], [], []
            for n in step.nodes:
                if n.op in REDUCTIONS:
                    assert rows, "a phase with reductions runs one block per row"
                    inits.append(f"{self.var(n)} = {'C0' if n.op == 'rsum' else 'CNEG'}")
                    arg = self.ref(n.args[0], here)
                    body.append(f"{self.var(n)} += {arg}" if n.op == "rsum"
                                else f"{self.var(n)} = maximum({self.var(n)}, {arg})")
                    combine = "block_sum" if n.op == "rsum" else "block_max"
                    after_all.append(f"{self.var(n)} = {combine}({self.use_red()}, "
                                     f"{self.var(n)}, tid)")
                    after_one += self.spill(n)
                    continue
                body.append(f"{self.var(n)} = {self.expr(n, here)}")
                body += self.spill(n)
            for s in stores:
                if s.node.shape:
                    body.append(self.store(s, self.ref(s.node, here)))
                else:
                    after_one.append(self.store(s, self.ref(s.node, here)))
            n_j = self.names.size[step.size]
            code(*inits)
            with code.block(f"for j in range(tid, {n_j}, TPB):" if rows else f"if j < {n_j}:"):
                code(*body)
            code(*after_all)
            if after_one:
                with code.block(f"if {one}:"):
                    code(*after_one)
            if rows:
                code("cuda.syncthreads()")

    def use_red(self) -> str:
        self.needs_red = True
        return "red"


class _PhaseKernel(_CudaKernel):
    """One elementwise phase of one program as its own kernel, launched once per time step
    (or, for `pre`, once over all T*B rows)."""

    def __init__(self, plan: Plan, names: Names, prog: Program, kind: str, ph: Phase):
        self.ph = ph
        self.rows = _has_reduction(ph)
        self.needs_red = False
        super().__init__(plan, names, prog, kind)

    @property
    def name(self) -> str:
        return f"{self.kind}_phase{self.ph.index}"

    def args(self) -> list[str]:
        t = [] if self.kind == "pre" else ["t"]
        return [*t, "B", *self.names.size.values(), "lengths", *sorted(self.arrays)]

    def launch(self) -> str:
        """The launch configuration, as code of the glue."""
        rows = "T * B" if self.kind == "pre" else "B"
        if self.rows:
            return f"{rows}, TPB"
        return f"(cs.blocks({_width(self.names, self.ph)}, TPB), {rows}), TPB"

    def _body(self) -> list[str]:
        y = "cuda.blockIdx.x" if self.rows else "cuda.blockIdx.y"
        head = Code(level=1)
        if self.kind == "pre":  # one launch over all T*B rows
            head(f"r = {y}", "t = r // B", "b = r % B")
        else:
            head(f"b = {y}")
        if self.rows:
            head("tid = cuda.threadIdx.x")
        else:
            head("j = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x")
        code = Code(level=1)
        self.phase_lines(code, self.ph, self.rows)
        if self.needs_red:
            head("red = cuda.shared.array(TPB, DT)")
        self.prologue = head.lines
        return code.lines


class _PersistentKernel(_CudaKernel):
    """The whole time loop of a program in one cooperative kernel. Block k of the grid owns
    columns [k*c, (k+1)*c) of each per-step GEMM's output (c = ceil(N / blocks)) and keeps
    those columns of the weights in shared memory; each stage computes its slice of the
    products, then the grid syncs; each phase runs grid-strided over (b, j) elements (or over
    batch rows, one block each, when it has reductions), then the grid syncs."""

    def __init__(self, plan: Plan, names: Names, prog: Program, kind: str):
        self.needs_red = False
        super().__init__(plan, names, prog, kind)

    @property
    def name(self) -> str:
        return f"{self.kind}_persistent"

    def products(self):
        """Per-step GEMMs: (name, vector array as code at [t, b, k], transposed weights?)."""
        out = []
        for g in self.prog.gemms:
            v = g.vector
            vec = self.names.state[v.attr] if v.op == "prev" else self.plan.vectors[v.uid].name
            out.append((g.name, g.stage, self.use(vec), True))
        for g in self.prog.gemm_ts:
            out.append((g.name, g.stage, self.use(g.buffer.name), False))
        return out

    def _body(self) -> list[str]:
        prods = self.products()
        head = Code(level=1)("grid = cuda.cg.this_grid()", "tid = cuda.threadIdx.x",
                             "blk = cuda.blockIdx.x", "nblk = cuda.gridDim.x")
        code = Code(level=1)
        if prods:
            code("sw = cuda.shared.array(SHARED, DT)",
                 "# this block's columns of the recurrent weights, kept for the whole sequence")
            base = "0"
            for k, (g, _, _, trans) in enumerate(prods):
                w = self.use("w_" + g)
                self.use("g_" + g)
                kk, nn = (f"{w}.shape[1]", f"{w}.shape[0]") if trans else \
                    (f"{w}.shape[0]", f"{w}.shape[1]")
                code(f"k{k} = {kk}", f"m{k} = {nn}", f"c{k} = (m{k} + nblk - 1) // nblk",
                     f"a{k} = {base}")
                with code.block(f"for e in range(tid, k{k} * c{k}, TPB):"):
                    code(f"col = blk * c{k} + e % c{k}")
                    with code.block(f"if col < m{k}:"):
                        code(f"sw[a{k} + e] = {w}[col, e // c{k}]" if trans else
                             f"sw[a{k} + e] = {w}[e // c{k}, col]")
                base = f"a{k} + k{k} * c{k}"
            code("cuda.syncthreads()")
        with code.block(f"for t in {'range(T - 1, -1, -1)' if self.prog.reverse else 'range(T)'}:"):
            for ph in self.prog.phases:
                staged = [(k, p) for k, p in enumerate(prods) if p[1] == ph.index]
                for k, (g, _, vec, _) in staged:
                    with code.block(f"for e in range(tid, B * c{k}, TPB):  # g_{g} = {vec}[t] @ W, "
                                    "this block's columns"):
                        code(f"b = e // c{k}", f"col = blk * c{k} + e % c{k}")
                        with code.block(f"if col < m{k}:"):
                            code("acc = C0")
                            with code.block(f"for i in range(k{k}):"):
                                code(f"acc += {vec}[t, b, i] * sw[a{k} + i * c{k} + e % c{k}]")
                            code(f"g_{g}[b, col] = acc")
                if staged:
                    code("grid.sync()")
                if not ph.steps:
                    continue
                if _has_reduction(ph):
                    with code.block("for b in range(blk, B, nblk):  # one block per batch row"):
                        self.phase_lines(code, ph, True)
                else:
                    w = _width(self.names, ph)
                    with code.block(f"for e in range(blk * TPB + tid, B * {w}, nblk * TPB):"):
                        code(f"b = e // {w}", f"j = e % {w}")
                        self.phase_lines(code, ph, False)
                code("grid.sync()")
        if self.needs_red:
            head("red = cuda.shared.array(TPB, DT)")
        self.prologue = head.lines
        return code.lines


def persistent_rule(plan: Plan) -> str:
    """When the persistent kernels run, in words (the compile summary prints it)."""
    from rnndsl.backend.cuda_support import PERSISTENT_MAX_BATCH, SHARED_BYTES

    def mats(gemms):
        return " + ".join(f"[{', '.join(ws)}]" for ws in gemms) or "none"

    fwd = mats(g.weights for g in plan.forward.gemms)
    bwd = mats(g.node.attr for g in plan.back.gemm_ts)
    return (f"one cooperative kernel per pass when B <= {PERSISTENT_MAX_BATCH} and the "
            f"recurrent weights (forward {fwd}; backward {bwd}) fit in "
            f"{SHARED_BYTES // 1024} KiB of shared memory per co-resident block; otherwise one "
            f"launch per step and phase with cuBLAS GEMMs")


def persistent_grids(plan: Plan, sizes: dict[str, int], batch: int, itemsize: int,
                     limit: int) -> dict[str, int]:
    """Per pass, the grid that the auto mode gives the persistent kernel at these sizes on a
    device of `limit` co-resident blocks (0: the per-step launches), by the rule that the
    generated code applies at run time to its stacked weights' shapes."""
    from rnndsl.backend.cuda_support import persistent_blocks
    from rnndsl.engines.cell import _dims

    def stack(weights) -> tuple[int, int]:  # (rows of all, columns)
        shapes = [_dims(plan.step.params[w].shape, sizes) for w in weights]
        return sum(s[0] for s in shapes), shapes[0][1]

    forward = [stack(g.weights)[::-1] for g in plan.forward.gemms]  # (K, N) of v @ w.T
    backward = [stack(g.node.attr) for g in plan.back.gemm_ts]  # (K, N) of G @ w
    return {"forward": persistent_blocks(forward, batch, itemsize, limit, 0),
            "backward": persistent_blocks(backward, batch, itemsize, limit, 0)}


# -- glue -----------------------------------------------------------------------------------
def _stack(names: Names, weights) -> str:
    return f"cs.stack(({', '.join(names.param[w] for w in weights)},), DT, stream)"


def _vector(plan: Plan, names: Names, v: Node) -> str:
    if v.op == "prev":
        return names.state[v.attr]
    if v.op == "input":
        return names.input[v.attr]
    return plan.vectors[v.uid].name


def _spill_allocs(code: Code, plan: Plan, names: Names, prog: Program):
    nodes = {n.uid: n for n in ir.topo_order([s.node for s in prog.stores] +
                                            [g.vector for g in prog.gemms] +
                                            [a for g in prog.gemm_ts for a in g.node.args])}
    for uid, sp in prog.spills.items():
        n = nodes[uid]
        shape = f"(B, {names.size[n.shape[0]]})" if n.shape else "(B,)"
        code(f"{sp} = cs.empty({shape}, DT)")


def _products(plan: Plan, names: Names, prog: Program, stage: int) -> list[tuple[str, str, str]]:
    """The per-step GEMMs before phase `stage`: (vector array, GEMM name, transposition)."""
    gemms, gemm_ts = stage_products(prog, stage)
    return [(_vector(plan, names, g.vector), g.name, ", trans_b=True") for g in gemms] + \
        [(g.buffer.name, g.name, "") for g in gemm_ts]


def _loop_arrays(plan: Plan, names: Names, phases: list[_PhaseKernel], prog: Program):
    """Every array of a time loop (sorted), and those its GEMMs take (in order of use)."""
    gemm_arrays: list[str] = []
    for ph in prog.phases:
        for vec, g, _ in _products(plan, names, prog, ph.index):
            gemm_arrays += [a for a in (vec, f"w_{g}", f"g_{g}") if a not in gemm_arrays]
    arrays = set(gemm_arrays).union(*(p.arrays for p in phases))
    return sorted(arrays), gemm_arrays


def _loop(plan: Plan, names: Names, phases: list[_PhaseKernel], prog: Program, kind: str) -> str:
    """The default mode's time loop as its own function, `{kind}_steps`: per step, the GEMM of
    each stage and each phase's kernel, on `stream`. With it, `{KIND}_LOOP`: which arrays it
    takes, which of them the GEMMs take, and which it writes (cuda_graphs.Loop)."""
    launches = {p.ph.index: p for p in phases}
    arrays, gemm_arrays = _loop_arrays(plan, names, phases, prog)
    code = function(f"def {kind}_steps(stream, T, B, sizes, lengths, arrays, mats):")
    code(f'"""The {kind} time loop, one launch per step and phase: `arrays` in the order of',
         f'{kind.upper()}_LOOP.arrays, `mats` the GEMMs\' views of its `gemm` arrays."""',
         unpack(list(names.size.values()), "sizes"),
         unpack(arrays, "arrays"),
         unpack([f"m_{a}" for a in gemm_arrays], "mats"))
    with code.block(f"for t in {'range(T - 1, -1, -1)' if prog.reverse else 'range(T)'}:"):
        for ph in prog.phases:
            for vec, g, trans in _products(plan, names, prog, ph.index):
                code(f"cs.gemm(m_{vec}[t], m_w_{g}, m_g_{g}, stream{trans})")
            if ph.index in launches:
                p = launches[ph.index]
                code(f"{p.name}[{p.launch()}, stream.kernels]({', '.join(p.args())})")
    written = {_stored(names, st): st.kind for st in prog.stores}
    fresh = [a for a, k in written.items() if k not in (StoreKind.STATE, StoreKind.DPREV)]
    loop = (f"{kind.upper()}_LOOP = cg.Loop(arrays={as_tuple(map(repr, arrays))},\n"
            f"    gemm={as_tuple(map(repr, gemm_arrays))},\n"
            f"    fresh={as_tuple(map(repr, sorted(fresh)))},\n"
            f"    results={as_tuple(map(repr, sorted(written)))})")
    return code.text() + "\n\n\n" + loop + "\n"


def _stored(names: Names, st) -> str:
    """The array a store of the plan writes (as emit_common.KernelWriter.store names it)."""
    if st.kind is StoreKind.STATE:
        return names.state[st.target]
    if st.kind is StoreKind.OUTPUT:
        return names.output[st.target]
    if st.kind is StoreKind.DPREV:
        return "d" + names.state[st.target]
    if st.kind is StoreKind.INPUT_GRAD:
        return "d" + names.input[st.target]
    return st.target.name


def _run_loop(code: Code, kind: str, phases: list[_PhaseKernel], prog: Program, plan: Plan,
              names: Names):
    """The glue's call of the time loop, with the arrays in its Loop's order."""
    arrays, _ = _loop_arrays(plan, names, phases, prog)
    code(f"cg.time_loop({kind}_steps, {kind.upper()}_LOOP, stream, T, B, sizes, lengths, "
         f"{as_tuple(arrays)})")


def _persistent_choice(code: Code, k: _PersistentKernel, prog: Program):
    """`blocks`: the persistent kernel's grid, or 0 for the per-step launches."""
    shapes = [f"(w_{g.name}.shape[1], w_{g.name}.shape[0])" for g in prog.gemms] + \
        [f"w_{g.name}.shape" for g in prog.gemm_ts]
    code("blocks = 0")
    with code.block("if persistent is not False:"):
        code(f"limit = cs.cooperative_blocks({k.name}, TPB)",
             f"blocks = cs.persistent_blocks([{', '.join(shapes)}], B, "
             f"np.dtype(DT).itemsize, limit, {_widest(k)})")
        with code.block("if persistent and not blocks:"):
            code("raise ValueError('the persistent kernel does not fit: the recurrent weights '",
                 "                 'need more shared memory than the resident blocks have, '",
                 "                 f'or the batch is above {cs.PERSISTENT_MAX_BATCH}')")


def _widest(k: _PersistentKernel) -> str:
    """Elements per step of the widest phase (B times a size), to spread over the blocks."""
    sizes = sorted({k.names.size[step.size] for ph in k.prog.phases for step in ph.steps
                    if isinstance(step, Loop)})
    return f"B * max({', '.join(sizes)}, 1)" if sizes else "B"


def _forward_glue(plan: Plan, names: Names, phases: dict, k: _PersistentKernel) -> str:
    step = plan.step
    L = function("def forward(params, xs, state0, lengths, sizes, stream, persistent=None):")
    L("# arrays are device arrays; scalar parameters come as one-element arrays",
      unpack(list(names.param.values()), "params"),
      unpack(list(names.input.values()), "xs"),
      unpack(list(names.size.values()), "sizes"),
      "T, B = xs[0].shape[0], xs[0].shape[1]")
    for g in plan.forward.gemms:
        L(f"w_{g.name} = {_stack(names, g.weights)}  # (N, K): g = v @ w.T")
        L(f"g_{g.name} = cs.empty((B, w_{g.name}.shape[0]), DT)")
    _persistent_choice(L, k, plan.forward)
    if plan.pre is not None:
        for buf in plan.vectors.values():
            if buf.role is Role.PRE_VECTOR:
                L(f"{buf.name} = cs.empty((T, B, {names.sizes(buf.width())}), DT)")
        _spill_allocs(L, plan, names, plan.pre)
        for p in phases["pre"]:
            L(f"{p.name}[{p.launch()}, stream.kernels]({', '.join(p.args())})")
    for g in plan.hoisted:
        src = _vector(plan, names, g.vector)
        L(f"{g.name} = cs.empty((T, B, {names.sizes([p.shape[0] for p in g.products])})"
          f", DT)")
        L(f"cs.gemm(cs.flat({src}), {_stack(names, g.weights)}, cs.flat({g.name}), "
          f"stream, trans_b=True)")
    for s, code in names.state.items():
        L(f"{code} = cs.empty((T + 1, B, {names.size[step.states[s]]}), DT)")
        L(f"cs.copy({code}[0], state0[{list(names.state).index(s)}], stream)")
    for o, code in names.output.items():
        shape = step.shape_of(o)
        L(f"{code} = cs.empty((T, B, {names.size[shape[0]] if shape else '1'}), DT)")
    L(f"tape = cs.empty((T, B, {names.sizes(plan.tape.width())}), DT)")
    for buf in plan.vectors.values():
        if buf.role is not Role.PRE_VECTOR:
            L(f"{buf.name} = cs.empty((T, B, {names.sizes(buf.width())}), DT)")
    _spill_allocs(L, plan, names, plan.forward)
    with L.block("if blocks:"):
        L(f"{k.name}[blocks, TPB, stream.kernels]({', '.join(k.args())})")
    with L.block("else:"):
        _run_loop(L, "forward", phases["forward"], plan.forward, plan, names)
    outs = ", ".join(names.output.values())
    finals = ", ".join(f"{c}[T]" for c in names.state.values())
    saved = ", ".join([*names.state.values(), *(g.name for g in plan.hoisted), "tape",
                       *(b.name for b in plan.vectors.values())])
    L(f"return ({outs},), ({finals},), ({saved},), blocks")
    return L.text() + "\n"


def _backward_glue(plan: Plan, names: Names, phases: list, k: _PersistentKernel) -> str:
    step = plan.step
    L = backward_preamble(plan, names, ", stream, persistent=None")
    for g in plan.back.gemm_ts:
        L(f"w_{g.name} = {_stack(names, g.node.attr)}  # (K, N): g = G @ w")
        L(f"g_{g.name} = cs.empty((B, w_{g.name}.shape[1]), DT)")
    _persistent_choice(L, k, plan.back)
    for s, code in names.state.items():
        L(f"d{code} = cs.empty((T + 1, B, {names.size[step.states[s]]}), DT)")
        L(f"cs.copy(d{code}[T], d_final[{list(names.state).index(s)}], stream)")
    for x, code in names.input.items():
        make = "empty" if x in plan.input_rest else "zeros"
        L(f"d{code} = cs.{make}((T, B, {names.size[step.inputs[x]]}), DT, stream)")
    for buf in plan.grad_buffers:
        L(f"{buf.name} = cs.empty((T, B, {names.sizes(buf.width())}), DT)")
    _spill_allocs(L, plan, names, plan.back)
    with L.block("if blocks:"):
        L(f"{k.name}[blocks, TPB, stream.kernels]({', '.join(k.args())})")
    with L.block("else:"):
        _run_loop(L, "backward", phases, plan.back, plan, names)
    L("# after the loop: input and weight gradients as GEMMs over all T*B rows")
    for x, g in plan.deferred:
        L(f"cs.gemm(cs.flat({g.buffer.name}), {_stack(names, g.node.attr)}, "
          f"cs.flat(d{names.input[x]}), stream, accumulate=True)")
    grads = {p: f"d{code}" for p, code in names.param.items()}
    # a weight whose gradient comes from one stacked GEMM only is a row block of its result
    uses: dict[str, int] = {}
    for w in plan.weight_grads:
        for wname in w.weights:
            uses[wname] = uses.get(wname, 0) + 1
    for p, code in names.param.items():
        if uses.get(p, 0) != 1:
            L(f"d{code} = cs.zeros({code}.shape, DT, stream)")
    for k_w, w in enumerate(plan.weight_grads):
        v = w.vector
        src = f"{names.state[v.attr]}[:T]" if v.op == "prev" else _vector(plan, names, v)
        L(f"m{k_w} = cs.empty(({names.sizes(w.buffer.width())}, {src}.shape[2]), DT)")
        L(f"cs.gemm(cs.flat({w.buffer.name}), cs.flat({src}), m{k_w}, stream, trans_a=True)")
        for k_, wname in enumerate(w.weights):
            node = w.buffer.columns[k_][0]
            off = names.sizes(w.buffer.offset(k_))
            block = f"m{k_w}[{off}:{off} + {names.size[node.shape[0]]}]"
            if uses[wname] == 1:
                L(f"{grads[wname]} = {block}")
            else:
                L(f"cs.add_into({grads[wname]}, {block}, stream)")
    for p, (buf, block) in plan.param_grads.items():
        off = names.sizes(buf.offset(block))
        L(f"cs.add_column_sums({grads[p]}, cs.flat({buf.name}), {off}, stream)")
    dparams = ", ".join(grads[p] for p in step.params)
    dxs = ", ".join(f"d{c}" for c in names.input.values())
    d0 = ", ".join(f"d{c}[0]" for c in names.state.values())
    L(f"return ({dparams},), ({dxs},), ({d0},), blocks")
    return L.text() + "\n"
