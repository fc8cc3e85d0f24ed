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
* two persistent kernels per program (`forward_grid` and `forward_block`, `backward_grid`
  and `backward_block`), after Persistent RNNs (Diamos et al. 2016) and FlashRNN (Pöppel et
  al. 2024): one launch runs the whole time loop, on a cooperative grid or on one block (see
  _PersistentKernel), on the same stream and never captured. The glue chooses per pass among
  them and the per-step launches by the cost model of `cs.choose_time_loop`, or as asked
  (`persistent=...`).
* a stack with block-diagonal weights (`blocks:`) is multiplied by its diagonal blocks alone,
  wherever the plan puts it (`cs.block_product` instead of `cs.gemm`), and its weights'
  gradients are their diagonal blocks (`cs.add_diagonal_block_grads`). Such a plan has no
  persistent kernels (they keep whole weight columns in shared memory): it runs per step.

The index expressions (which array, which column block, padding) come from
emit_common.KernelWriter, shared with the CPU target, so the two read and write the plan's
arrays identically. Every identifier
is made here; names from the spec appear only in the header's legend comment.
"""
from __future__ import annotations

from rnndsl.symbolic import ir
from rnndsl.symbolic.rank2 import block_diagonal
from rnndsl.backend.emit_common import (Code, KernelWriter, Names, as_tuple, backward_preamble,
                          constant_lines, function, stack_blocks, stage_products, unpack)
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
    persistent = {kind: [] if block_diagonal(plan.step) else
                  [_PersistentKernel(plan, names, prog, kind, grid) for grid in (True, False)]
                  for kind, prog in progs if kind != "pre"}
    kernels = [k.text() for kind, _ in progs for k in phases[kind]]
    kernels += [k.text() for kind in ("forward", "backward") for k in persistent[kind]]
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
        "from rnndsl.backend.cuda_support import cuda, lane_sum",
        "",
        f"DT = np.{dtype}",
        "DTYPE = np.dtype(DT)  # (the simulator's dynamic shared arrays want an instance)",
        "TPB = cs.THREADS  # threads per block (a power of two)",
        "LANES = cs.LANES  # threads that share one dot product of a persistent kernel",
        "GROUPS = TPB // LANES",
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
    """The whole time loop of a program in one kernel: `grid` (cooperative, synchronised with
    grid.sync()) or one block (block barriers only). Each dot product of the per-step products
    is split over LANES threads and summed with warp shuffles (`lane_sum`); the block's columns
    of the recurrent weights live in dynamic shared memory for the whole sequence (a column
    every cs.column_stride words, against bank conflicts), and the product's vector is staged
    there, `rows` batch rows at a time.

    Which columns a block owns: when every loop and every product of the program runs over one
    size (the hidden units: `unit_size`), block k owns hidden units [k*q, (k+1)*q) and every
    gate's column of those units, so it runs the pointwise math of its units right after its
    slice of the product, behind a block barrier: the grid synchronises only to publish a
    product's vector (the new state, which the (T + 1, B, n) state arrays keep per step, so
    that no block overwrites what another still reads), once per step for an LSTM, forward or
    backward (there the vector is the gates' gradients and the product the transposed one).
    Otherwise the block owns a contiguous slice of each product's columns, and every product
    and phase ends with a grid sync (the phases grid-strided over (b, j), or one block per
    batch row with reductions)."""

    def __init__(self, plan: Plan, names: Names, prog: Program, kind: str, grid: bool):
        self.grid = grid
        self.needs_red = False
        self.unit = unit_size(prog)
        self.grid_syncs = 0  # per time step
        self.barriers = 0  # block barriers per time step, besides the grid syncs
        self._synced = False
        super().__init__(plan, names, prog, kind)

    @property
    def name(self) -> str:
        return f"{self.kind}_{'grid' if self.grid else 'block'}"

    def args(self) -> list[str]:
        return [*super().args(), "rows"]

    def products(self):
        """Per-step products: (GEMM name, stage, vector array (at [t, b, k]), weights (N, K)?)."""
        out = []
        for g in self.prog.gemms:
            v = g.vector
            vec = self.names.state[v.attr] if v.op == "prev" else self.plan.vectors[v.uid].name
            out.append((g.name, g.stage, self.use(vec), True))
        for g in self.prog.gemm_ts:
            out.append((g.name, g.stage, self.use(g.buffer.name), False))
        return out

    def sync_grid(self, code: Code):
        """Everything every block wrote is visible to every block (skipped when nothing was
        written since the last one)."""
        if not self._synced:
            code("grid.sync()" if self.grid else "cuda.syncthreads()")
            self.grid_syncs += 1
            self._synced = True

    def _body(self) -> list[str]:
        prods = self.products()
        head = Code(level=1)
        if self.grid:
            head("grid = cuda.cg.this_grid()", "blk = cuda.blockIdx.x", "nblk = cuda.gridDim.x")
        else:
            head("blk = 0", "nblk = 1")
        head("tid = cuda.threadIdx.x", "lane = tid % LANES", "grp = tid // LANES",
             "smem = cuda.shared.array(0, DTYPE)  # dynamic: the weights, then the staged rows")
        code = Code(level=1)
        if self.unit is not None:
            code(f"q = ({self.names.size[self.unit]} + nblk - 1) // nblk  # hidden units per block",
                 "u0 = blk * q", f"nu = max(0, min(q, {self.names.size[self.unit]} - u0))")
        base = "0"
        for k, (g, _, _, trans) in enumerate(prods):
            w = self.use("w_" + g)
            self.use("g_" + g)
            kk, mm = (f"{w}.shape[1]", f"{w}.shape[0]") if trans else \
                (f"{w}.shape[0]", f"{w}.shape[1]")
            code(f"k{k} = {kk}", f"m{k} = {mm}",
                 f"kp{k} = ((k{k} + LANES - 1) // LANES) | 1  # odd groups of LANES words",
                 f"kp{k} *= LANES  # a column's stride (cs.column_stride)")
            if self.unit is not None:
                code(f"U{k} = {self.names.size[self.unit]}", f"u0{k} = u0", f"nu{k} = nu")
            else:
                code(f"U{k} = m{k}", f"q{k} = (U{k} + nblk - 1) // nblk", f"u0{k} = blk * q{k}",
                     f"nu{k} = max(0, min(q{k}, U{k} - u0{k}))")
            code(f"nc{k} = (m{k} // U{k}) * nu{k}  # this block's columns",
                 f"a{k} = {base}  # where they start in smem, kp{k} words each")
            with code.block(f"for f in range(tid, nc{k} * k{k}, TPB):"):
                code(f"e = f // k{k}", f"i = f % k{k}",
                     f"col = (e // nu{k}) * U{k} + u0{k} + e % nu{k}",
                     f"smem[a{k} + e * kp{k} + i] = {w}[col, i]" if trans else
                     f"smem[a{k} + e * kp{k} + i] = {w}[i, col]")
            base = f"a{k} + nc{k} * kp{k}"
        code(f"sv = {base}  # the staged rows of a product's vector")
        code("cuda.syncthreads()")
        end_sync = self._step_ends_with_sync()
        with code.block(f"for t in {'range(T - 1, -1, -1)' if self.prog.reverse else 'range(T)'}:"):
            self.grid_syncs = self.barriers = 0
            # as the previous step left it: the split layout ends every phase with a sync
            self._synced = end_sync or self.unit is None
            for ph in self.prog.phases:
                staged = [(k, p) for k, p in enumerate(prods) if p[1] == ph.index]
                if staged:
                    self.sync_grid(code)  # the vectors are complete
                    for k, (g, _, vec, _) in staged:
                        self.product_lines(code, k, g, vec)
                    if self.unit is None:
                        self.sync_grid(code)
                if not ph.steps:
                    continue
                if self.unit is not None:
                    with code.block("for e in range(tid, B * nu, TPB):  # this block's units"):
                        code("b = e // nu", "j = u0 + e % nu")
                        self.phase_lines(code, ph, False)
                    self._synced = False
                    continue
                self.sync_grid(code)
                if _has_reduction(ph):
                    with code.block("for b in range(blk, B, nblk):  # one block per batch row"):
                        self.phase_lines(code, ph, True)
                else:
                    w = _width(self.names, ph)
                    with code.block(f"for e in range(blk * TPB + tid, B * {w}, nblk * TPB):"):
                        code(f"b = e // {w}", f"j = e % {w}")
                        self.phase_lines(code, ph, False)
                self._synced = False
                self.sync_grid(code)
            if end_sync:
                self.sync_grid(code)
        if self.needs_red:
            head("red = cuda.shared.array(TPB, DT)")
        self.prologue = head.lines
        return code.lines

    def _step_ends_with_sync(self) -> bool:
        """In the units layout, whether a step must end with a grid sync: when the next step's
        first phase (before any product's sync) may read a row's scalar, which one thread
        wrote. (The split layout ends every phase with a sync anyway.)"""
        if self.unit is None or not self.prog.phases[0].steps:
            return False
        return any(not s.node.shape for s in self.prog.stores) or \
            any(not n.shape for n in _spilled(self.prog))

    def product_lines(self, code: Code, k: int, g: str, vec: str):
        """g_{g}[b, this block's columns] = {vec}[t] @ W, rows of the vector staged in shared
        memory, each dot product summed over a group of LANES threads."""
        with code.block(f"for b0 in range(0, B, rows):  # g_{g} = {vec}[t] @ W"):
            code("nb = min(rows, B - b0)")
            with code.block(f"for f in range(tid, nb * k{k}, TPB):"):
                code(f"smem[sv + f] = {vec}[t, b0 + f // k{k}, f % k{k}]")
            code("cuda.syncthreads()")
            with code.block(f"for first in range(0, nb * nc{k}, GROUPS):  # all threads go round"):
                code("item = first + grp", "acc = C0")
                with code.block(f"if item < nb * nc{k}:"):
                    code(f"vrow = sv + (item // nc{k}) * k{k}",
                         f"wcol = a{k} + (item % nc{k}) * kp{k}")
                    with code.block(f"for i in range(lane, k{k}, LANES):"):
                        code("acc += smem[vrow + i] * smem[wcol + i]")
                code("acc = lane_sum(acc)")
                with code.block(f"if lane == 0 and item < nb * nc{k}:"):
                    code(f"e = item % nc{k}", f"col = (e // nu{k}) * U{k} + u0{k} + e % nu{k}",
                         f"g_{g}[b0 + item // nc{k}, col] = acc")
            code("cuda.syncthreads()")
        self.barriers += 2
        self._synced = False


def _spilled(prog: Program) -> list[Node]:
    nodes = {n.uid: n for n in ir.topo_order([s.node for s in prog.stores] +
                                            [g.vector for g in prog.gemms] +
                                            [a for g in prog.gemm_ts for a in g.node.args])}
    return [nodes[uid] for uid in prog.spills]


def unit_size(prog: Program) -> str | None:
    """The one size (in the spec's names) over which every loop of the program's phases and
    every per-step product's gate blocks run, when there is one and no phase has row
    reductions: then a block can own hidden units across all gates. None otherwise."""
    sizes = {step.size for ph in prog.phases for step in ph.steps if isinstance(step, Loop)}
    sizes |= {p.shape[0] if p.shape else None for g in prog.gemms for p in g.products}
    sizes |= {g.node.shape[0] if g.node.shape else None for g in prog.gemm_ts}
    if len(sizes) != 1 or None in sizes or any(_has_reduction(ph) for ph in prog.phases):
        return None
    return next(iter(sizes))


def persistent_rule(plan: Plan) -> str:
    """When the persistent kernels run, in words (the compile summary prints it)."""
    if block_diagonal(plan.step):
        return (f"never ({BLOCKS_RUN_PER_STEP}): per step, cuBLAS GEMMs for dense stacks, "
                "cs.block_product for those with block-diagonal weights")
    def mats(gemms):
        return " + ".join(f"[{', '.join(ws)}]" for ws in gemms) or "none"

    fwd = mats(g.weights for g in plan.forward.gemms)
    bwd = mats(g.node.attr for g in plan.back.gemm_ts)
    layout = {kind: "units across gates" if unit_size(prog) else "column slices"
              for kind, prog in (("forward", plan.forward), ("backward", plan.back))}
    return (f"per pass, the cheapest time loop by the cost model of cuda_support.COST among "
            f"per-step launches (cuBLAS GEMMs), a single-block kernel and a multi-block "
            f"cooperative kernel (blocks own {layout['forward']} forward, "
            f"{layout['backward']} backward), the kernels where their block's share of the "
            f"recurrent weights (forward {fwd}; backward {bwd}) fits in shared memory")


def _pass_facts(k: _PersistentKernel) -> tuple[list[int], list[str]]:
    """What the plan fixes of a pass's cost (cs.choose_time_loop): grid syncs and block
    barriers per step, launches per step of the per-step path, phases with work; and the
    sizes (spec names) of those phases' loops, the widest of which times B times the phases
    is the pointwise work of a step."""
    prog = k.prog
    phases = sum(1 for ph in prog.phases if ph.steps)
    launches = len(prog.gemms) + len(prog.gemm_ts) + phases
    sizes = sorted({step.size for ph in prog.phases for step in ph.steps
                    if isinstance(step, Loop)})
    return [k.grid_syncs, k.barriers, launches, phases], sizes


def persistent_grids(plan: Plan, sizes: dict[str, int], batch: int, itemsize: int,
                     limit: int, shared: int) -> dict[str, tuple[str, int]]:
    """Per pass, the time loop that the auto mode takes at these sizes on a device of `limit`
    co-resident blocks and `shared` bytes of shared memory per block: (variant, blocks), by
    the rule (cs.choose_time_loop) that the generated code applies at run time."""
    from rnndsl.backend.cuda_support import choose_time_loop
    from rnndsl.engines.cell import _dims

    if block_diagonal(plan.step):
        return {"forward": ("per-step", 0), "backward": ("per-step", 0)}
    names = Names(plan)

    def stack(weights) -> tuple[int, int]:  # (rows of all, columns)
        shapes = [_dims(plan.step.params[w].shape, sizes) for w in weights]
        return sum(s[0] for s in shapes), shapes[0][1]

    out = {}
    for kind, prog in (("forward", plan.forward), ("backward", plan.back)):
        k = _PersistentKernel(plan, names, prog, kind, grid=True)
        products = [stack(g.weights)[::-1] for g in prog.gemms] + \
            [stack(g.node.attr) for g in prog.gemm_ts]  # (K, N) each
        (syncs, barriers, launches, phases), loops = _pass_facts(k)
        elements = phases * batch * max([sizes[s] for s in loops] + [1])
        variant, blocks, _, _ = choose_time_loop(
            None, products, sizes[k.unit] if k.unit else 0, batch, itemsize, syncs, barriers,
            launches, elements, limit, shared)
        out[kind] = (variant, blocks)
    return out


# -- block-diagonal weights ---------------------------------------------------------------
# A stack with block-diagonal weights is multiplied by its blocks alone (cs.block_product)
# wherever the plan puts it: per step, hoisted before the loop, deferred after it; its weight
# gradients are its diagonal blocks (cs.add_diagonal_block_grads), zero elsewhere. Such a plan
# has no persistent kernels: their shared-memory layout holds whole weight columns.
BLOCKS_RUN_PER_STEP = ("block-diagonal parameters run per step; the persistent kernels take "
                       "dense recurrent weights only")


def _parts(plan: Plan, names: Names, weights) -> str | None:
    """A stack's cs.block_parts as code (its weights' rows from the sizes, which the glue and
    the time loops both have), if any of its weights is block-diagonal; else None."""
    blocks = stack_blocks(plan, names, weights)
    return None if blocks is None else f"cs.block_parts({blocks})"


# -- glue -----------------------------------------------------------------------------------
def _stack(names: Names, weights) -> str:
    return f"cs.stack(({', '.join(names.param[w] for w in weights)},), DT, stream)"


def _forward_weights(plan: Plan, names: Names, weights) -> str:
    """A forward product's weights: the stack for a GEMM (v @ stack.T), its transpose for a
    block product (v @ M, cs.block_product reads M's rows coalesced)."""
    if _parts(plan, names, weights) is None:
        return _stack(names, weights)
    return f"cs.transpose({_stack(names, weights)}, stream)"


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


def _products(plan: Plan, names: Names, prog: Program, stage: int):
    """The per-step products before phase `stage`: (vector array, product name, transposed
    (the W.T @ g sums), the stack's block_parts as code or None for a dense GEMM)."""
    gemms, gemm_ts = stage_products(prog, stage)
    return [(_vector(plan, names, g.vector), g.name, False, _parts(plan, names, g.weights))
            for g in gemms] + \
        [(g.buffer.name, g.name, True, _parts(plan, names, g.node.attr)) for g in gemm_ts]


def _loop_arrays(plan: Plan, names: Names, phases: list[_PhaseKernel], prog: Program):
    """Every array of a time loop (sorted), and those its GEMMs take (in order of use); the
    block products take the arrays themselves."""
    gemm_arrays: list[str] = []
    block_arrays: set[str] = set()
    for ph in prog.phases:
        for vec, g, _, parts in _products(plan, names, prog, ph.index):
            if parts is None:
                gemm_arrays += [a for a in (vec, f"w_{g}", f"g_{g}") if a not in gemm_arrays]
            else:
                block_arrays |= {vec, f"w_{g}", f"g_{g}"}
    arrays = set(gemm_arrays).union(block_arrays, *(p.arrays for p in phases))
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
    for ph in prog.phases:
        for _, g, _, parts in _products(plan, names, prog, ph.index):
            if parts is not None:
                code(f"parts_{g} = {parts}")
    with code.block(f"for t in {'range(T - 1, -1, -1)' if prog.reverse else 'range(T)'}:"):
        for ph in prog.phases:
            for vec, g, transposed, parts in _products(plan, names, prog, ph.index):
                if parts is None:
                    code(f"cs.gemm(m_{vec}[t], m_w_{g}, m_g_{g}, stream"
                         f"{'' if transposed else ', trans_b=True'})")
                else:
                    code(f"cs.block_product({vec}[t], w_{g}, parts_{g}, g_{g}, stream, "
                         f"transposed={transposed})")
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


def _persistent_choice(code: Code, kernels: list[_PersistentKernel], prog: Program):
    """`variant, blocks, rows, nbytes`: the time loop of this pass (cs.choose_time_loop); the
    per-step launches where the plan has no persistent kernels."""
    if not kernels:
        code(f"variant, blocks = 'per-step', 0  # {BLOCKS_RUN_PER_STEP}")
        return
    grid = kernels[0]
    shapes = [f"(w_{g.name}.shape[1], w_{g.name}.shape[0])" for g in prog.gemms] + \
        [f"w_{g.name}.shape" for g in prog.gemm_ts]
    unit = grid.names.size[grid.unit] if grid.unit else "0"
    (syncs, barriers, launches, phases), loops = _pass_facts(grid)
    widest = f"max({', '.join(grid.names.size[s] for s in loops)}, 1)" if loops else "1"
    code(f"limit = cs.cooperative_blocks({grid.name}, TPB)",
         f"variant, blocks, rows, nbytes = cs.choose_time_loop(",
         f"    persistent, [{', '.join(shapes)}], {unit}, B, np.dtype(DT).itemsize, {syncs}, "
         f"{barriers}, {launches}, {phases} * B * {widest}, limit, cs.shared_limit())")


def _time_loop(code: Code, kernels: list[_PersistentKernel], run_per_step):
    """The pass's time loop as `variant` says: a persistent kernel, else per step."""
    for k in kernels:
        with code.block(f"{'if' if k.grid else 'elif'} variant == "
                        f"'{'multi-block' if k.grid else 'single-block'}':"):
            code(f"cs.launch_persistent({k.name}, blocks, nbytes, stream, "
                 f"{', '.join(k.args())})")
    if not kernels:
        run_per_step()
        return
    with code.block("else:"):
        run_per_step()


def _forward_glue(plan: Plan, names: Names, phases: dict, k: list[_PersistentKernel]) -> str:
    step = plan.step
    L = function("def forward(params, xs, state0, lengths, sizes, stream, persistent=None):")
    L("# arrays are device arrays; scalar parameters come as one-element arrays",
      unpack(list(names.param.values()), "params"),
      unpack(list(names.input.values()), "xs"),
      unpack(list(names.size.values()), "sizes"),
      "T, B = xs[0].shape[0], xs[0].shape[1]")
    for g in plan.forward.gemms:
        dense = _parts(plan, names, g.weights) is None
        L(f"w_{g.name} = {_forward_weights(plan, names, g.weights)}  # "
          f"{'(N, K): g = v @ w.T' if dense else '(K, N): g = v @ w'}")
        L(f"g_{g.name} = cs.empty((B, w_{g.name}.shape[{0 if dense else 1}]), DT)")
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
        parts = _parts(plan, names, g.weights)
        if parts is None:
            L(f"cs.gemm(cs.flat({src}), {_stack(names, g.weights)}, cs.flat({g.name}), "
              f"stream, trans_b=True)")
        else:
            L(f"cs.block_product(cs.flat({src}), "
              f"{_forward_weights(plan, names, g.weights)}, {parts}, "
              f"cs.flat({g.name}), stream, transposed=False)")
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
    _time_loop(L, k, lambda: _run_loop(L, "forward", phases["forward"], plan.forward, plan,
                                       names))
    outs = ", ".join(names.output.values())
    finals = ", ".join(f"{c}[T]" for c in names.state.values())
    saved = ", ".join([*names.state.values(), *(g.name for g in plan.hoisted), "tape",
                       *(b.name for b in plan.vectors.values())])
    L(f"return ({outs},), ({finals},), ({saved},), (variant, blocks)")
    return L.text() + "\n"


def _backward_glue(plan: Plan, names: Names, phases: list, k: list[_PersistentKernel]) -> str:
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
    _time_loop(L, k, lambda: _run_loop(L, "backward", phases, plan.back, plan, names))
    L("# after the loop: input and weight gradients as GEMMs over all T*B rows")
    for x, g in plan.deferred:
        parts = _parts(plan, names, g.node.attr)
        with L.block("if input_grads:"):
            if parts is None:
                L(f"cs.gemm(cs.flat({g.buffer.name}), {_stack(names, g.node.attr)}, "
                  f"cs.flat(d{names.input[x]}), stream, accumulate=True)")
            else:
                L(f"cs.block_product(cs.flat({g.buffer.name}), {_stack(names, g.node.attr)}, "
                  f"{parts}, cs.flat(d{names.input[x]}), stream, transposed=True, "
                  "accumulate=True)")
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
        if _parts(plan, names, w.weights) is not None:
            _block_weight_grads(L, plan, names, w, src, grads, uses)
            continue
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
    L(f"return ({dparams},), ({dxs},), ({d0},), (variant, blocks)")
    return L.text() + "\n"


def _block_weight_grads(L: Code, plan: Plan, names: Names, w, src: str, grads: dict,
                        uses: dict):
    """The weight gradients of a stack with block-diagonal weights, weight by weight: each
    block-diagonal one its diagonal blocks alone (zero elsewhere), each dense one a GEMM of its
    columns of the gradient buffer."""
    for k, wname in enumerate(w.weights):
        off = names.sizes(w.buffer.offset(k))
        code = names.param[wname]
        blocks = plan.step.params[wname].blocks
        if blocks > 1:
            if uses[wname] == 1:
                L(f"{grads[wname]} = cs.zeros({code}.shape, DT, stream)")
            L(f"cs.add_diagonal_block_grads({grads[wname]}, cs.flat({w.buffer.name}), {off}, "
              f"cs.flat({src}), {blocks}, stream)")
            continue
        if uses[wname] == 1:
            L(f"{grads[wname]} = cs.empty({code}.shape, DT)")
        L(f"cs.gemm(cs.flat({w.buffer.name})[:, {off}:{off} + {code}.shape[0]], "
          f"cs.flat({src}), {grads[wname]}, stream, trans_a=True"
          f"{'' if uses[wname] == 1 else ', accumulate=True'})")
