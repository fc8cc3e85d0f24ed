"""Stage 6, schedule: the forward and backward step IR become a kernel plan.

Decisions made here, once per cell, for every target:
* Matrix products whose vector does not depend on the previous step are hoisted: one GEMM over
  all T*B rows before the time loop. Products that share a vector are stacked into one GEMM,
  whatever their parameters are called (an LSTM's four gates: one (B,H)x(H,4H) product).
* In backward, sums of W.T @ g terms become one stacked GEMM (`gemm_t`); the ones that feed
  the input's gradient are deferred to one GEMM over all T*B rows after the loop, and weight
  gradients are one GEMM per shared vector over all T*B rows.
* Products of values computed inside the step (GRU's U @ (r * h_prev)) split the step into
  phases; the elementwise work of a phase is one fused loop nest per batch row, with row
  reductions as extra passes over the row (`Phase.loops`).
* What backward needs from forward: expensive values (transcendentals, reductions, GEMM
  results) are saved on the tape; cheap arithmetic on saved values is recomputed.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from enum import Enum

from rnndsl.symbolic import ir
from rnndsl.symbolic.grad import Backward
from rnndsl.symbolic.ir import Node, StepIR

CHEAP = ("add", "sub", "mul", "div", "neg", "bcast", "step", "sign", "relu", "abs")
REDUCTIONS = ("rsum", "rmax")


# -- rewriting for code generation ----------------------------------------------------------
class Rewriter:
    """Expands ops that kernels compute in passes (softmax, mean) and stacks W.T @ g sums.
    Memoised, so a forward node maps to the same node in the forward and backward plans."""

    def __init__(self):
        self.memo: dict[int, Node] = {}

    def __call__(self, n: Node) -> Node:
        done = self.memo.get(n.uid)
        if done is not None:
            return done
        for a in ir.topo_order([n]):
            if a.uid not in self.memo:
                self.memo[a.uid] = self._one(a, [self.memo[b.uid] for b in a.args])
        return self.memo[n.uid]

    def _one(self, n: Node, args: list[Node]) -> Node:
        if n.is_leaf:
            return n
        if n.op == "softmax":
            x = args[0]
            e = ir.apply("exp", ir.sub(x, ir.reduce("rmax", x)))
            return ir.div(e, ir.reduce("rsum", e))
        if n.op == "rmean":
            return ir.div(ir.reduce("rsum", args[0]), ir.size(n.args[0].shape[0]))
        if n.op in ("add", "matvec_t"):
            terms = [n] if n.op == "matvec_t" else _terms(n)
            products = [t for t in terms if t.op == "matvec_t"]
            if products:
                products.sort(key=lambda t: self(t.args[1]).uid)
                weights = tuple(t.args[0].attr for t in products)
                grads = tuple(self(t.args[1]) for t in products)
                stacked = ir.node("gemm_t", grads, weights, n.shape)
                rest = [self(t) for t in terms if t.op != "matvec_t"]
                return ir.add_all([stacked, *rest])
        return ir.node(n.op, tuple(args), n.attr, n.shape)


def _terms(n: Node) -> list[Node]:
    """The terms of a tree of additions."""
    return [t for a in n.args for t in (_terms(a) if a.op == "add" else [a])]


# -- the plan -------------------------------------------------------------------------------
class Role(Enum):
    """What a (T, B, K) buffer holds."""

    TAPE = "forward values saved for backward"
    PRE_VECTOR = "a hoisted product's computed vector, made before the time loop"
    VECTOR = "a per-step product's computed vector, kept for the weight gradients"
    GRADIENT = "per-step gradients stacked for GEMMs after the loop"


@dataclass
class Buffer:
    """A stored (T, B, K) array; K is a sum of column blocks, one per node."""

    name: str
    columns: list[tuple[Node, int]]  # node, index of its block (offsets are sums of sizes)
    role: Role

    def offset(self, index: int) -> list[str]:
        """Size names whose sum is the column offset of block `index` (scalars count 1)."""
        return [(n.shape[0] if n.shape else "1") for n, _ in self.columns[:index]]

    def width(self) -> list[str]:
        return self.offset(len(self.columns))

    def block(self, n: Node) -> int:
        for node, k in self.columns:
            if node is n:
                return k
        raise KeyError(n)


@dataclass
class Gemm:
    """out (rows, K) = vector (rows, cols) @ stack.T, stack = the weights stacked by rows.
    Forward products; `out` holds the products in the weights' order."""

    name: str
    weights: tuple[str, ...]
    vector: Node
    products: tuple[Node, ...]
    hoisted: bool
    stage: int = 0


@dataclass
class GemmT:
    """out (rows, cols) = G (rows, K) @ stack, G the buffer of gradients `grads`, stack the
    weights stacked by rows: the sum of W_k.T @ g_k."""

    name: str
    node: Node  # the gemm_t node
    buffer: Buffer
    deferred: bool  # over all T*B rows after the loop (input gradients)
    stage: int = 0


@dataclass
class WeightGrad:
    """dW_stack (K, cols) = G.T @ V over all T*B rows, split back into the weights."""

    buffer: Buffer
    weights: tuple[str, ...]  # one per column block of the buffer, in order
    vector: Node


@dataclass
class Loop:
    """One loop over the features of a batch row: every node of `nodes` is a vector of
    `size` (or a reduction over one, final after the loop)."""

    size: str
    nodes: list[Node]


@dataclass
class Scalar:
    """A per-row scalar computed between loops (`node` None: only stores happen here)."""

    node: Node | None


@dataclass
class Phase:
    """Elementwise work between two GEMM stages: per batch row, loops over features with
    per-row scalars computed between them."""

    index: int
    steps: list[Loop | Scalar] = field(default_factory=list)


class StoreKind(Enum):
    STATE = "a state's new value (frozen past a sequence's length)"
    OUTPUT = "an output (zero past a sequence's length)"
    DPREV = "the adjoint of a state's previous value (passed on past a sequence's length)"
    INPUT_GRAD = "the part of an input's gradient computed in the loop"
    BUFFER = "a column block of a buffer"


@dataclass
class Store:
    node: Node
    kind: StoreKind
    target: str | Buffer  # the spec's name of the state, output or input; or the buffer
    block: int = 0


class ReadKind(Enum):
    TAPE = "the tape, saved by the forward pass"
    HOISTED = "a hoisted product, computed before the time loop"
    VECTOR = "a buffered product vector"
    GEMM = "this step's product"
    GEMM_T = "this step's stacked W.T @ g sum"


@dataclass(frozen=True)
class Read:
    """Where a value is read from instead of computed: `array` at column block `block`."""

    kind: ReadKind
    array: str
    block: int = 0


@dataclass
class Program:
    """One time loop (or a loop over all rows when `steps` is False): GEMM stages and
    elementwise phases, alternating."""

    name: str
    reverse: bool
    stores: list[Store]
    reads: dict[int, Read]  # node uid -> where it is read from
    gemms: list[Gemm]
    gemm_ts: list[GemmT]
    phases: list[Phase]
    spills: dict[int, str]  # node uid -> scratch array (values used across loops or phases)
    place: dict[int, tuple[int, int]]  # node uid -> (phase, loop index) it is computed in


@dataclass
class Plan:
    step: StepIR
    backward: Backward
    pre: Program | None  # hoisted vectors that are not inputs, over all T*B rows
    hoisted: list[Gemm]
    forward: Program
    infer: Program  # the forward loop without the tape, for inference
    back: Program
    tape: Buffer  # forward values saved for backward
    vectors: dict[int, Buffer]  # per-step GEMM vectors kept for weight gradients
    grad_buffers: list[Buffer]
    deferred: list[tuple[str, GemmT]]  # input name, its stacked GEMM after the loop
    weight_grads: list[WeightGrad]
    param_grads: dict[str, tuple[Buffer, int]]  # vector/scalar param -> its gradient's block
    input_rest: dict[str, Node]  # input gradient terms computed in the loop

    def describe_groups(self) -> list[str]:
        out = []
        for g in self.hoisted:
            out.append(f"forward  {_vec(g.vector)} @ [{', '.join(g.weights)}].T  hoisted: one "
                       f"GEMM over all T*B rows{self._by_blocks(g.weights)}")
        for g in self.forward.gemms:
            out.append(f"forward  {_vec(g.vector)} @ [{', '.join(g.weights)}].T  per step, "
                       f"stage {g.stage}{self._by_blocks(g.weights)}")
        for g in self.back.gemm_ts:
            out.append(f"backward [{', '.join(g.node.attr)}].T-sum  per step, stage {g.stage}"
                       f"{self._by_blocks(g.node.attr)}")
        for x, g in self.deferred:
            out.append(f"backward d_{x} = [{', '.join(g.node.attr)}] stacked  after the loop, "
                       f"over all T*B rows{self._by_blocks(g.node.attr)}")
        for w in self.weight_grads:
            out.append(f"weights  d[{', '.join(w.weights)}] = G.T @ {_vec(w.vector)}  after "
                       f"the loop, over all T*B rows{self._by_blocks(w.weights)}")
        return out

    def _by_blocks(self, weights) -> str:
        """How a stack with block-diagonal weights is multiplied, for describe_groups."""
        if all(self.step.params[w].blocks == 1 for w in weights):
            return ""
        return ", by the diagonal blocks alone"


def _vec(n: Node) -> str:
    if n.op == "prev":
        return f"{n.attr}_prev"
    if n.op == "input":
        return str(n.attr)
    return f"({ir.render(n)})"


# -- planning -------------------------------------------------------------------------------
def plan(step: StepIR, bwd: Backward) -> Plan:
    """The passes, in order; each is a function below."""
    roots = _rewrite(step, bwd)
    hoisted, per_step = _group_products(roots)
    tape = _choose_tape(roots, hoisted)
    vectors, pre_vectors = _vector_buffers(hoisted, per_step)
    pre = None
    if pre_vectors:
        pre = _program("pre", False, [Store(v, StoreKind.BUFFER, vectors[v.uid])
                                      for v in pre_vectors], {}, [], [])
    fstores = [Store(n, StoreKind.STATE, s) for s, n in roots.states.items()]
    fstores += [Store(n, StoreKind.OUTPUT, o) for o, n in roots.outputs.items()]
    fstores += [Store(n, StoreKind.BUFFER, tape, k) for n, k in tape.columns]
    fstores += [Store(g.vector, StoreKind.BUFFER, vectors[g.vector.uid])
                for g in per_step if g.vector.uid in vectors]
    pre_names = {v.uid: vectors[v.uid].name for v in pre_vectors}
    forward = _program("forward", False, fstores, {}, per_step, [], pre_names, hoisted, vectors)
    infer = _program("infer", False, [s for s in fstores if s.target is not tape], {}, per_step,
                     [], pre_names, hoisted, vectors)

    grads = _gradient_buffers(roots)
    bstores = [Store(n, StoreKind.DPREV, s) for s, n in roots.d_prev.items()]
    bstores += [Store(n, StoreKind.INPUT_GRAD, x) for x, n in roots.input_rest.items()]
    for buf in grads.buffers:
        bstores += [Store(n, StoreKind.BUFFER, buf, k) for n, k in buf.columns]
    reads = {n.uid: Read(ReadKind.TAPE, "tape", k) for n, k in tape.columns}
    back = _program("backward", True, bstores, reads, [], grads.in_loop, hoisted=hoisted,
                    vectors=vectors)
    return Plan(step, bwd, pre, hoisted, forward, infer, back, tape, vectors, grads.buffers,
                grads.deferred, grads.weights, grads.params, roots.input_rest)


@dataclass
class _Roots:
    """What the programs compute, rewritten for code generation (`Rewriter`)."""

    states: dict[str, Node]
    outputs: dict[str, Node]
    d_prev: dict[str, Node]
    input_rest: dict[str, Node]  # input gradient terms computed in the loop
    deferred: list[tuple[str, Node]]  # input gradient products: (input, gemm_t) after the loop
    d_params: dict[str, Node]
    matrix_terms: dict[str, list[tuple[Node, Node]]]  # W -> (g, v) terms, dW += g v^T

    def forward(self) -> list[Node]:
        return [*self.states.values(), *self.outputs.values()]

    def backward(self) -> list[Node]:
        return [*self.d_prev.values(), *self.input_rest.values(), *self.d_params.values()] + \
            [n for terms in self.matrix_terms.values() for g, v in terms for n in (g, v)] + \
            [g for _, t in self.deferred for g in t.args]


def _rewrite(step: StepIR, bwd: Backward) -> _Roots:
    """Pass 1: the roots of both programs, rewritten; input gradients split into stacked
    products (deferred to one GEMM after the loop) and the rest (computed in the loop)."""
    rw = Rewriter()
    values = {name: rw(n) for name, n in step.values.items()}
    # (a constant or per-row adjoint, d_h_prev = 0, is spread over the state's features)
    d_prev = {s: rw(ir.bcast(n, (step.states[s],))) for s, n in bwd.d_prev.items()}
    deferred, input_rest = [], {}
    for x, n in bwd.d_inputs.items():
        r = rw(n if n.is_const(0.0) else ir.bcast(n, (step.inputs[x],)))
        terms = _terms(r) if r.op == "add" else [r]
        deferred += [(x, t) for t in terms if t.op == "gemm_t"]
        rest = [t for t in terms if t.op != "gemm_t" and not t.is_const(0.0)]
        if rest:  # (a per-row term, once the products are split off, is spread over x)
            input_rest[x] = ir.bcast(ir.add_all(rest), (step.inputs[x],))
    return _Roots({s: values[s] for s in step.states}, {o: values[o] for o in step.outputs},
                  d_prev, input_rest, deferred, {p: rw(n) for p, n in bwd.d_params.items()},
                  {w: [(rw(g), rw(v)) for g, v in terms] for w, terms in bwd.d_matrices.items()})


def _group_products(roots: _Roots) -> tuple[list[Gemm], list[Gemm]]:
    """Pass 2: forward matrix products grouped by vector (one stacked GEMM each), hoisted
    when the vector does not depend on the previous step and needs no product itself."""
    bwd_roots = roots.backward()
    recurrent = _recurrent(ir.topo_order(roots.forward() + bwd_roots))
    adjoint = _adjoint_nodes(bwd_roots)
    all_fwd = [n for n in ir.topo_order(bwd_roots) if n.uid not in adjoint]
    groups: dict[int, list[Node]] = defaultdict(list)
    for n in ir.topo_order(roots.forward() + all_fwd):
        if n.op == "matvec":
            groups[n.args[1].uid].append(n)
    hoisted, per_step = [], []
    for k, (vuid, products) in enumerate(groups.items()):
        v = products[0].args[1]
        weights = tuple(dict.fromkeys(p.args[0].attr for p in products))
        products = tuple({p.args[0].attr: p for p in products}[w] for w in weights)
        hoist = vuid not in recurrent and not any(a.op == "matvec" for a in ir.topo_order([v]))
        (hoisted if hoist else per_step).append(Gemm(f"{'xp' if hoist else 'mm'}{k}", weights,
                                                     v, products, hoist))
    return hoisted, per_step


def _choose_tape(roots: _Roots, hoisted: list[Gemm]) -> Buffer:
    """Pass 3: what backward reads of forward values. Leaves and hoisted products are at hand;
    expensive values (transcendentals, reductions, GEMM results) are saved; cheap arithmetic
    on saved values is recomputed."""
    hoisted_uids = {p.uid for g in hoisted for p in g.products}
    saved: dict[int, Node] = {}

    def available(n: Node):
        if n.is_leaf or n.uid in hoisted_uids or n.uid in saved:
            return
        if n.op in CHEAP or (n.op == "pow" and n.args[1].is_const()):
            for a in n.args:
                available(a)
        else:
            saved[n.uid] = n

    for n in _backward_needs(roots.backward()):
        available(n)
    return Buffer("tape", [(n, k) for k, n in enumerate(saved.values())], Role.TAPE)


def _vector_buffers(hoisted: list[Gemm], per_step: list[Gemm]):
    """Pass 4: computed vectors of products, kept as (T, B, n) rows: per-step ones for the
    weight gradients; hoisted ones (and parameter vectors: the same product in every row,
    but the GEMMs over all T*B rows want rows) made before the loop by the `pre` program."""
    vectors = {g.vector.uid: Buffer(f"vec{k}", [(g.vector, 0)], Role.VECTOR)
               for k, g in enumerate(per_step) if not g.vector.is_leaf}
    pre_vectors = [g.vector for g in hoisted if g.vector.op != "input"]
    for k, v in enumerate(pre_vectors):
        vectors[v.uid] = Buffer(f"pvec{k}", [(v, 0)], Role.PRE_VECTOR)
    return vectors, pre_vectors


@dataclass
class _Gradients:
    buffers: list[Buffer]
    in_loop: list[GemmT]  # W.T @ g sums computed per step
    deferred: list[tuple[str, GemmT]]  # input name, its stacked GEMM after the loop
    weights: list[WeightGrad]
    params: dict[str, tuple[Buffer, int]]  # vector/scalar param -> its gradient's block


def _gradient_buffers(roots: _Roots) -> _Gradients:
    """Pass 5: per-step gradients stored for GEMMs after the loop, one buffer per distinct
    tuple of stacked gradients; which W.T @ g sums run in the loop."""
    buffers: dict[tuple[int, ...], Buffer] = {}

    def buffer_for(grads: tuple[Node, ...]) -> Buffer:
        key = tuple(g.uid for g in grads)
        if key not in buffers:
            buffers[key] = Buffer(f"dg{len(buffers)}", [(g, k) for k, g in enumerate(grads)],
                                  Role.GRADIENT)
        return buffers[key]

    weights = []
    by_vector: dict[int, list[tuple[str, Node, Node]]] = defaultdict(list)
    for w, terms in roots.matrix_terms.items():
        for g, v in terms:
            by_vector[v.uid].append((w, g, v))
    for items in by_vector.values():
        items.sort(key=lambda item: item[1].uid)
        buf = buffer_for(tuple(g for _, g, _ in items))
        weights.append(WeightGrad(buf, tuple(w for w, _, _ in items), items[0][2]))
    in_loop = []  # every W.T @ g sum that a value stored in the loop needs
    loop_roots = [*roots.d_prev.values(), *roots.input_rest.values(),
                  *roots.d_params.values()] + \
        [g for terms in roots.matrix_terms.values() for g, _ in terms] + \
        [g for _, t in roots.deferred for g in t.args]
    for n in ir.topo_order(loop_roots):
        if n.op == "gemm_t":
            in_loop.append(GemmT(f"gt{len(in_loop)}", n, buffer_for(n.args), False))
    deferred = [(x, GemmT(f"dx{k}", t, buffer_for(t.args), True))
                for k, (x, t) in enumerate(roots.deferred)]

    params, extra = {}, []
    for p, n in roots.d_params.items():
        for buf in buffers.values():
            if any(node is n for node, _ in buf.columns):
                params[p] = (buf, buf.block(n))
                break
        else:
            extra.append((p, n))
    if extra:
        buf = buffer_for(tuple(n for _, n in extra))
        for p, n in extra:
            params[p] = (buf, buf.block(n))
    return _Gradients(list(buffers.values()), in_loop, deferred, weights, params)


def _adjoint_nodes(roots: list[Node]) -> set[int]:
    """Nodes that depend on an adjoint: backward work, not forward values."""
    adj: set[int] = set()
    for n in ir.topo_order(roots):
        if n.op in ("adj", "gemm_t") or any(a.uid in adj for a in n.args):
            adj.add(n.uid)
    return adj


def _recurrent(order: list[Node]) -> set[int]:
    rec: set[int] = set()
    for n in order:
        if n.op in ("prev", "adj", "gemm_t") or any(a.uid in rec for a in n.args):
            rec.add(n.uid)
    return rec


def _backward_needs(roots: list[Node]) -> list[Node]:
    """Forward values the backward step uses directly: arguments of adjoint-dependent nodes
    that are forward values, and forward values that are themselves roots."""
    adj = _adjoint_nodes(roots)
    out = {}
    for n in ir.topo_order(roots):
        if n.uid in adj:
            out.update((a.uid, a) for a in n.args if a.uid not in adj)
    out.update((r.uid, r) for r in roots if r.uid not in adj)
    return list(out.values())


def _program(name: str, reverse: bool, stores: list[Store], reads: dict, gemms: list[Gemm],
             gemm_ts: list[GemmT], pre_vectors: dict | None = None,
             hoisted: list[Gemm] = (), vectors: dict | None = None) -> Program:
    """Assign every node the stores need to a phase (between GEMM stages), as late as its
    uses allow, and within a phase to a loop over features; a value used outside the loop
    that computes it goes through a scratch array."""
    reads = dict(reads)
    for g in hoisted:
        for k, p in enumerate(g.products):
            reads.setdefault(p.uid, Read(ReadKind.HOISTED, g.name, k))
    for v, buf in (pre_vectors or {}).items():
        reads.setdefault(v, Read(ReadKind.VECTOR, buf))
    for v, buf in (vectors or {}).items():
        if name == "backward":
            reads.setdefault(v, Read(ReadKind.VECTOR, buf.name))
    product_of = {p.uid: g for g in gemms for p in g.products}
    for g in gemms:
        for k, p in enumerate(g.products):
            reads[p.uid] = Read(ReadKind.GEMM, g.name, k)
    for g in gemm_ts:
        reads[g.node.uid] = Read(ReadKind.GEMM_T, g.name)
    gemm_t_of = {g.node.uid: g for g in gemm_ts}

    # GEMM stages a node waits for: a product comes one stage after its vector.
    depth_of: dict[int, int] = {}
    everything = [s.node for s in stores] + [g.vector for g in gemms] + \
        [a for g in gemm_ts for a in g.node.args]
    for n in ir.topo_order(everything):
        if n.uid in product_of:
            d = depth_of[product_of[n.uid].vector.uid] + 1
        elif n.uid in gemm_t_of:
            d = max(depth_of[a.uid] for a in n.args) + 1
        elif n.uid in reads or n.is_leaf:
            d = 0
        else:
            d = max((depth_of[a.uid] for a in n.args), default=0)
        depth_of[n.uid] = d

    def depth(n: Node) -> int:
        return depth_of[n.uid]

    for g in gemms:
        g.stage = depth(g.vector) + 1
    for g in gemm_ts:
        g.stage = depth(g.node)
    needs: dict[int, int] = defaultdict(lambda: BIG)  # latest phase a value may be ready in
    for g in gemms:
        needs[g.vector.uid] = min(needs[g.vector.uid], g.stage - 1)
    for g in gemm_ts:
        for a in g.node.args:
            needs[a.uid] = min(needs[a.uid], g.stage - 1)
    last = max([depth(s.node) for s in stores] + [g.stage for g in gemms + gemm_ts] + [0])
    for s in stores:  # stored as soon as computed, so its arguments need not wait
        needs[s.node.uid] = min(needs[s.node.uid], depth(s.node))

    roots = [s.node for s in stores] + [g.vector for g in gemms] + \
        [a for g in gemm_ts for a in g.node.args]
    computed = [n for n in ir.topo_order_until(roots, lambda n: n.uid in reads)
                if n.uid not in reads and not n.is_leaf]
    consumers: dict[int, list[Node]] = defaultdict(list)
    for n in computed:
        for a in n.args:
            consumers[a.uid].append(n)
    phase: dict[int, int] = {}
    for n in reversed(computed):
        late = min([needs[n.uid]] + [phase[c.uid] for c in consumers[n.uid]])
        phase[n.uid] = max(depth(n), late if late < BIG else last)

    phases = [Phase(i) for i in range(last + 1)]
    place: dict[int, tuple[int, int]] = {}
    for p in phases:
        _loops(p, [n for n in computed if phase[n.uid] == p.index], place)
    for s in stores:  # a store of a value that is read, not computed, gets a copy loop
        if s.node.uid not in place:  # as soon as it is ready: a GEMM of this step may read it
            p = phases[min(needs[s.node.uid], last)]
            size = s.node.shape[0] if s.node.shape else None
            p.steps.append(Loop(size, []) if size else Scalar(None))
            place[s.node.uid] = (p.index, len(p.steps) - 1)
    spills: dict[int, str] = {}
    for n in computed:
        users = {place[c.uid] for c in consumers[n.uid]}
        crosses = users - {place[n.uid]}
        if n.shape:
            crosses = crosses or ({"gemm"} if needs[n.uid] < BIG and n.uid not in
                                  {s.node.uid for s in stores} else set())
        else:
            crosses = {u for u in crosses if u[0] != place[n.uid][0]}
        if crosses:
            spills[n.uid] = f"{name}_sp{len(spills)}"
    return Program(name, reverse, stores, reads, gemms, gemm_ts, phases, spills, place)


BIG = 10 ** 9


def _loops(p: Phase, members: list[Node], place: dict):
    """Within one phase, per batch row: each vector node goes to the loop over its size at its
    level; a reduction is accumulated in its operand's loop and usable one level later;
    per-row scalars are computed between loops, as soon as their arguments are ready."""
    local = {n.uid for n in members}
    lvl: dict[int, int] = {}
    ready: dict[int, int] = {}
    for n in members:
        arg_ready = [ready[a.uid] for a in n.args if a.uid in local]
        if n.op in REDUCTIONS:
            lvl[n.uid] = ready[n.args[0].uid] if n.args[0].uid in local else 0
            ready[n.uid] = lvl[n.uid] + 1
        else:
            lvl[n.uid] = ready[n.uid] = max(arg_ready, default=0)
    steps: list[Loop | Scalar] = []
    for L in range(max(lvl.values(), default=-1) + 1):
        for n in members:
            if lvl[n.uid] == L and not n.shape and n.op not in REDUCTIONS:
                place[n.uid] = (p.index, len(steps))
                steps.append(Scalar(n))
        by_size: dict[str, list[Node]] = defaultdict(list)
        for n in members:
            if lvl[n.uid] == L and (n.shape or n.op in REDUCTIONS):
                by_size[n.shape[0] if n.shape else n.args[0].shape[0]].append(n)
        for size, nodes in by_size.items():
            for n in nodes:
                place[n.uid] = (p.index, len(steps))
            steps.append(Loop(size, nodes))
    p.steps = steps
