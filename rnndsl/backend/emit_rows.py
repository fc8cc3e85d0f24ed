"""Stages 6 and 7 for cells with values of rank 2 (targets cpu and cuda): a plan, and the
text of a Python module of Numba kernels that run one batch row at a time.

A cell whose state is a matrix (fast weights, the delta rule's W) has no GEMM over the batch
inside its step: every batch row has a matrix of its own. So the kernels loop over batch rows
outside and over time inside; one row's whole sequence runs in compiled code, its matrices in
scratch arrays of one row. On the cpu a kernel runs a chunk of rows, a thread per chunk
(row_threads.run_rows); on cuda one GPU thread runs one row, with the same step code
(`_RowKernel`) and the same glue on device arrays (`_DeviceArrays`). A step computes its values
in the IR's order:
* a per-row scalar is a local variable (reductions are loops);
* a vector or matrix read by exactly one consumer that reads each of its elements once (an
  elementwise op, a sum, the matrix of `M @ v`) is computed in place inside that consumer's
  loop, so elementwise chains fuse into one loop nest; outer products, spreads and broadcasts
  (`INDEX_MAPS`) are index maps, computed where they are read and never stored;
* any other vector or matrix is written to a scratch array by a loop nest: elementwise ones
  generically, the others by their entry in `ROW_CODE` (one small function per operator).
An operator with neither an entry nor elementwise code makes the cpu target refuse the cell
by the operator's name (and tests/test_matrix_kernels.py fails until it has one).

The tape and its memory budget. The forward pass keeps every step's value of each vector
and scalar that backward reads (`RowPlan.saved`: the stored values a backward step or the
matrix states' recomputation would otherwise compute again, (B, T, n) each; the NTM's 77,
3,560 numbers a step and row at 128 slots x 20, hidden 100) and backward reads them instead of computing them and
everything they come from; it computes the rest (values computed in place, the matrices that
are not states) from the states before the step and the step's inputs, so it needs every
state's value before every step. Vector states keep all of them, (T + 1, B, n). A matrix
state's are T x B x rows x cols: they are all kept when they fit the tape budget
(`tape_budget`, in bytes: the argument of `rnndsl.compile`, else $RNNDSL_TAPE_BUDGET, else
1 GiB). Past it, they are kept every `every` steps, the interval that needs the least memory
(about sqrt(T B): the kept copies of all rows plus one row's segment), and backward runs
each segment of a row forward again from its kept copy (into a scratch of `every` matrices
of one row), from the saved vectors (the NTM's write weighting, erase and add vectors): the
matrix updates alone. Both paths compute the same numbers in the same order, so they give
identical gradients. Keeping the vectors instead of computing them again, the NTM (float32,
batch 16, T=40, one thread, alternated in one process): backward 24.7 -> 18.9 ms, forward
9.0 -> 9.9 ms copying them after each step, 9.4 ms computing them straight into the
kept arrays (`kept_in_place`).
"""
from __future__ import annotations

import os
import sys
from collections import defaultdict
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Callable

from rnndsl.backend.kernel_lib import FASTMATH as BASE_FASTMATH, kernel_functions
from rnndsl.backend.emit_common import Code, Names, as_tuple, constant_lines, cpu_module_head, \
    element_code, function, seed_terms, unpack
from rnndsl.language.errors import SpecError, UserError
from rnndsl.language.spec import state_shape
from rnndsl.symbolic import ir, rank2
from rnndsl.symbolic.grad import Backward
from rnndsl.symbolic.ir import Node, StepIR
from rnndsl.symbolic.ops import OPS

TAPE_BUDGET_ENV = "RNNDSL_TAPE_BUDGET"
DEFAULT_TAPE_BUDGET = 1 << 30  # bytes of kept matrix states
# The row kernels' sums (M @ v along a row) vectorise only if they may be reassociated: the
# rounding then differs from the reference's in the last bits, not from run to run. The flag
# covers every operation in the kernel, so LLVM may also fold constant factors: with `arcp`,
# `x * 1e-300 / 1e-300` becomes `x`, where NumPy's order (float64) loses digits for
# |x| < 2e-8 and gives 0 for |x| < 5e-24 (the differential fuzzer's matrix seed 15009: the
# norm of that zero has a NaN gradient in the reference engine, a finite one here). Only
# specs that scale by such constant pairs see it; the vector kernels keep NumPy's order
# (their sums go through simd.py instead).
FASTMATH = BASE_FASTMATH[:-1] + ', "reassoc"}'


# Numba's SSA pass recurses once per basic block along the dominator tree; a long cell (the
# NTM: hundreds of loops in backward) needs far more than Python's default depth to compile.
COMPILE_RECURSION = 30000


@contextmanager
def deep_recursion():
    """Room for Numba to compile a long row kernel (at its first call)."""
    before = sys.getrecursionlimit()
    sys.setrecursionlimit(max(before, COMPILE_RECURSION))
    try:
        yield
    finally:
        sys.setrecursionlimit(before)


# -- the memory budget ------------------------------------------------------------------------
def tape_budget(given: int | None) -> int:
    """The budget in bytes: `given`, else $RNNDSL_TAPE_BUDGET, else DEFAULT_TAPE_BUDGET."""
    if given is None:
        text = os.environ.get(TAPE_BUDGET_ENV)
        if text is None:
            return DEFAULT_TAPE_BUDGET
        try:
            given = int(text)
        except ValueError:
            raise UserError(f"${TAPE_BUDGET_ENV} must be a whole number of bytes, got "
                            f"{text!r}") from None
    if isinstance(given, bool) or not isinstance(given, int) or given < 0:
        raise UserError(f"the tape budget must be a whole number of bytes (0 or more), got "
                        f"{given!r}")
    return given


def checkpoint_every(T: int, B: int, matrix_elements: int, itemsize: int, budget: int) -> int:
    """Every how many steps the matrix states are kept: 1 (every step, no recomputation) when
    that fits `budget`, else the interval that needs the least memory. Any interval above 1
    costs one extra forward pass, so memory decides: the kept copies of all B rows plus
    backward's scratch of one row's segment, least near sqrt(T B)."""
    def needs(every: int) -> int:  # bytes
        return (-(-T // every) * B + every) * matrix_elements * itemsize

    if needs(1) <= budget:
        return 1
    return min(range(1, T + 1), key=needs)


# -- the plan ---------------------------------------------------------------------------------
@dataclass
class RowPlan:
    """What the row kernels compute: the forward step's roots, the backward step's, and which
    values are computed in place where they are read (`inline`, decided once over both steps,
    so that forward and the recomputation in backward run identical code)."""

    step: StepIR
    backward: Backward
    d_prev: dict[str, Node]  # each state's previous value's adjoint, in the state's shape
    d_inputs: dict[str, Node]  # the inputs with a gradient, in the input's shape
    inline: frozenset[int]
    stacked: dict[int, tuple[Node, ...]]  # a product's uid -> the products computed with it
    saved: dict[int, Node]  # forward values the forward pass keeps for backward, by uid

    @property
    def matrix_states(self) -> list[str]:
        return [s for s, size in self.step.states.items() if len(state_shape(size)) == 2]

    def new_matrices(self) -> list[Node]:
        """The matrix states' new values: what backward's recomputation of a segment runs."""
        return [self.step.values[s] for s in self.matrix_states]

    def backward_order(self, saved=None) -> list[Node]:
        """The nodes backward computes (the matrix states' recomputation and the backward
        step), each after its arguments, not looking past saved values."""
        saved = saved or (lambda n: n.uid in self.saved)
        return ir.topo_order_until(self.new_matrices() + self.backward_roots(), saved)

    def backward_roots(self) -> list[Node]:
        """What a backward step computes: the previous states' and the inputs' adjoints, the
        vector parameters' gradient terms, and both sides of every weight's outer product."""
        bwd = self.backward
        return [*self.d_prev.values(), *self.d_inputs.values(), *bwd.d_params.values()] + \
            [n for terms in bwd.d_matrices.values() for g, v in terms for n in (g, v)]

    def describe_groups(self) -> list[str]:
        """The products, for `rnndsl compile`'s summary."""
        out = ["per batch row: the whole time loop of one row in compiled code, no GEMM "
               "over the batch"]
        for n in ir.topo_order(self.step.roots()):
            if n.op in ("matvec", "mv", "mtv"):
                out.append(f"forward  {ir.render(n, self.step.names)}  loop nest per row")
        for w in self.backward.d_matrices:
            out.append(f"weights  d[{w}] += G^T V, one GEMM of the outer products' sides kept "
                       "over all steps and rows")
        return out


def row_plan(step: StepIR, bwd: Backward) -> RowPlan:
    """The plan of a cell with matrix values; an operator with no row kernel code is refused
    by name."""
    d_prev = {s: ir.bcast(n, state_shape(step.states[s])) for s, n in bwd.d_prev.items()}
    d_inputs = {x: ir.bcast(n, (step.inputs[x],)) for x, n in bwd.d_inputs.items()
                if not n.is_const(0.0)}
    for n in ir.topo_order(step.roots() + bwd.roots()):
        if not n.is_leaf and n.op not in ROW_CODE and n.op not in INDEX_MAPS and \
                OPS[n.op].structural:
            raise SpecError(f"{step.file}: the cpu target has no kernel code for the operator "
                            f"'{n.op}' in a cell with matrix values yet; use the reference "
                            "target (target='reference', --target reference)")
    # each read of a value: whether the reader reads each of its elements once
    reads: dict[int, list[bool]] = defaultdict(list)
    nodes = ir.topo_order(step.roots() + bwd.roots() + list(d_prev.values()) +
                          list(d_inputs.values()))
    for n in nodes:
        for k, a in enumerate(n.args):
            reads[a.uid].append(_reads_once(n, k))
    for r in step.roots() + list(d_prev.values()) + list(d_inputs.values()) + \
            list(bwd.d_params.values()):
        reads[r.uid].append(True)  # a store
    for terms in bwd.d_matrices.values():
        for g, v in terms:  # dW += g v^T reads each element of g and of v many times
            reads[g.uid].append(False)
            reads[v.uid].append(False)
    inline = {n.uid for n in nodes if n.shape and not n.is_leaf and (
        n.op in INDEX_MAPS or (not OPS[n.op].structural and reads[n.uid] == [True]))}
    plan = RowPlan(step, bwd, d_prev, d_inputs, frozenset(inline), {}, {})
    plan.saved.update(_saved_values(plan))
    plan.stacked.update(_stacked_products(plan))
    return plan


def _saved_values(plan: RowPlan) -> dict[int, Node]:
    """The forward step's stored values (vectors and scalars; not computed in place) that
    backward reads: the forward pass keeps them, every step's, and backward reads them
    instead of computing them again, along with everything they are computed from."""
    kept = {n.uid for n in ir.topo_order(plan.step.roots())
            if not n.is_leaf and n.uid not in plan.inline and len(n.shape) <= 1}
    return {n.uid: n for n in plan.backward_order(lambda n: n.uid in kept) if n.uid in kept}


def _stacked_products(plan: RowPlan) -> dict[int, tuple[Node, ...]]:
    """Products with a parameter that multiply the same vector the same way (W @ v, or M.T @
    u), computed together as one product with the parameters stacked (cpu): the NTM's
    controller multiplies x, r and h by each of its four gates' blocks of W_controller, twelve
    products of 100 outputs, each padded to the micro-kernel's panels, that are three products
    of 400. Only products that every step computing one of them computes all of (forward,
    the recomputation of the matrix states, backward), so no step computes one it does not
    need; each output column's sum is the same with or without its neighbours."""
    stop = lambda n: n.uid in plan.saved  # noqa: E731
    regions = [{n.uid for n in ir.topo_order(plan.step.roots())}] + [
        {n.uid for n in ir.topo_order_until(roots, stop)}
        for roots in (plan.new_matrices(), plan.backward_roots())]
    groups: dict[tuple, list[Node]] = defaultdict(list)
    order = {n.uid: n for n in ir.topo_order(plan.step.roots()) + plan.backward_order()}
    for n in order.values():
        if n.op in _PRODUCTS and n.args[0].op == "param":
            groups[(_PRODUCTS[n.op], n.args[1].uid,
                    tuple(n.uid in r for r in regions))].append(n)
    return {n.uid: tuple(g) for g in groups.values() if len(g) > 1 for n in g}


def _reads_once(user: Node, position: int) -> bool:
    """Whether `user` reads each element of its argument at `position` exactly once."""
    if user.op in INDEX_MAPS:
        return False
    return not OPS[user.op].structural or (user.op, position) in READ_ONCE


# -- per-operator kernel code -----------------------------------------------------------------
# Index maps: an element of the node as an expression of its arguments' elements at `idx`.
INDEX_MAPS: dict[str, Callable] = {
    "bcast": lambda k, n, idx: k.elem(n.args[0], ()),
    "spread": lambda k, n, idx: k.elem(n.args[0], (idx[n.attr],)),
    "outer": lambda k, n, idx: f"({k.elem(n.args[0], idx[:1])} * {k.elem(n.args[1], idx[1:])})",
    "roll": lambda k, n, idx: k.elem(n.args[0], (_rolled(k, n.shape[0], idx[0], n.attr),)),
}
# (op, argument) pairs that read each element of the argument once: it may be computed there
READ_ONCE = {("rsum", 0), ("rmean", 0), ("rmax", 0), ("axis_sum", 0), ("mv", 0), ("mtv", 0)}


def _row_sum(k: "_RowKernel", n: Node, code: Code, mean: bool = False):
    v, x = k.var(n), n.args[0]
    code(f"{v} = C0")
    with code.block(f"for j in range({k.size(x.shape[0])}):"):
        code(f"{v} += {k.elem(x, ('j',))}")
    if mean:
        code(f"{v} = {v} / {k.size_float(x.shape[0])}")


def _row_max(k: "_RowKernel", n: Node, code: Code):
    v, x = k.var(n), n.args[0]
    code(f"{v} = CNEG")
    with code.block(f"for j in range({k.size(x.shape[0])}):"):
        code(f"{v} = maximum({v}, {k.elem(x, ('j',))})")


def _softmax(k: "_RowKernel", n: Node, code: Code, over: int | None = None):
    """Softmax of a vector (over None), or of a matrix over axis `over`: per line, the max,
    then the exponentials and their sum, then the division."""
    out, x = k.var(n), n.args[0]
    if over is None:
        line, each, at = [], f"for j in range({k.size(x.shape[0])}):", ("j",)
    else:  # the loop over the other axis is outside, the one along `over` inside
        line = [f"for i in range({k.size(x.shape[1 - over])}):"]
        each = f"for j in range({k.size(x.shape[over])}):"
        at = ("i", "j") if over == 1 else ("j", "i")
    index = ", ".join(at)
    with _nest(code, line):
        code(f"{out}_top = CNEG")
        with code.block(each):
            code(f"{out}_top = maximum({out}_top, {k.elem(x, at)})")
        code(f"{out}_sum = C0")
        with code.block(each):
            code(f"{out}[{index}] = exp({k.elem(x, at)} - {out}_top)",
                 f"{out}_sum += {out}[{index}]")
        with code.block(each):
            code(f"{out}[{index}] = {out}[{index}] / {out}_sum")


def _matrix_sum(k: "_RowKernel", n: Node, code: Code, over: int, term: Callable[[], str]):
    """n[i] = the sum over j of term at (i, j) (over 1: along each row), or n[j] = the sum
    over i (over 0: down the rows, a row at a time, so the matrix is read in order); the
    matrix is n's first argument, a parameter or a matrix value."""
    out, m = k.var(n), n.args[0]
    rows, cols = k.size(m.shape[0]), k.size(m.shape[1])
    if over == 1:
        with code.block(f"for i in range({rows}):"):
            code(f"{out}_acc = C0")
            with code.block(f"for j in range({cols}):"):
                code(f"{out}_acc += {term()}")
            code(f"{out}[i] = {out}_acc")
        return
    with code.block(f"for j in range({cols}):"):
        code(f"{out}[j] = C0")
    with code.block(f"for i in range({rows}):"):
        with code.block(f"for j in range({cols}):"):
            code(f"{out}[j] += {term()}")


_PRODUCTS = {"matvec": False, "mv": False, "matvec_t": True, "mtv": True}  # op -> transposed


def _product(k: "_RowKernel", n: Node, code: Code, transpose: bool):
    """M @ v: the sum along each row of M times v; M.T @ u: down the rows, times u."""
    m, v = n.args
    if m.op != "param":
        _matrix_sum(k, n, code, 0 if transpose else 1, _product_term(k, n, transpose))
        return
    if k.target == "cpu" and n.uid in k.plan.stacked:
        _stacked_product(k, k.plan.stacked[n.uid], code, transpose)
        return
    # A product with a parameter whose output is at least as long as each sum goes through
    # the per-step product's micro-kernel (packed.py; cpu), its weights packed once a pass by
    # the glue: a row of output accumulated in vector registers over the sums. A shorter output
    # runs its vector lanes along the sums, on the parameter's transpose where it is
    # transposed (made once a pass by the glue): a sum along the lanes ends in a sum across
    # them, which costs less than a panel of mostly unused columns (at 20 x 100, 2.6x as
    # fast as lanes along the output). Against lanes along the output accumulated in
    # memory, the NTM (float32, one thread, alternated, quiet): forward rows 10.9-14.0 ->
    # 10.5 ms, backward rows 23.9-24.4 -> 22.2-22.9 ms; its float64 compile 107 -> 90 s.
    out_size, sum_size = _product_sizes(k, n, transpose)

    def longer_output():
        if k.target == "cpu":
            weights = k.packed((m.attr,), transpose)
            k.scratch[k.var(n)] = f"packed_width({weights})"
            code(f"packed_matvec({k.vector(v, code)}, {weights}, {k.var(n)})")
        else:
            _lanes_along_output(k, n, code, transpose)

    if out_size == sum_size:
        longer_output()
        return
    with code.block(f"if {out_size} >= {sum_size}:"):
        longer_output()
    with code.block("else:"):
        _lanes_along_sums(k, n, code, transpose)


def _product_sizes(k: "_RowKernel", n: Node, transpose: bool) -> tuple[str, str]:
    """A product's output size and the length of each of its sums, as code."""
    rows, cols = (k.size(d) for d in n.args[0].shape)
    return (cols, rows) if transpose else (rows, cols)


def _product_term(k: "_RowKernel", n: Node, transpose: bool) -> Callable[[], str]:
    m, v = n.args
    along = ("i",) if transpose else ("j",)
    return lambda: f"{k.elem(m, ('i', 'j'))} * {k.elem(v, along)}"


def _lanes_along_output(k: "_RowKernel", n: Node, code: Code, transpose: bool):
    """A product with a parameter as a GPU thread's row, which has no micro-kernel."""
    m, v = n.args
    out = k.var(n)
    if transpose:  # down M's rows, each times u's element
        _matrix_sum(k, n, code, 0, _product_term(k, n, transpose))
        return
    rows, cols = (k.size(d) for d in m.shape)
    with code.block(f"for i in range({rows}):"):
        code(f"{out}[i] = C0")
    with code.block(f"for j in range({cols}):"):  # down M.T's rows, each times v's element
        code(f"{out}_v = {k.elem(v, ('j',))}")
        with code.block(f"for i in range({rows}):"):
            code(f"{out}[i] += {k.transposed(m)}[j, i] * {out}_v")


def _lanes_along_sums(k: "_RowKernel", n: Node, code: Code, transpose: bool):
    """A product with a parameter, each output a sum in vector lanes (along M's rows, or along
    the rows of M's transpose)."""
    m, v = n.args
    if not transpose:
        _matrix_sum(k, n, code, 1, _product_term(k, n, transpose))
        return
    out = k.var(n)
    rows, cols = (k.size(d) for d in m.shape)
    with code.block(f"for j in range({cols}):"):
        code(f"{out}_acc = C0")
        with code.block(f"for i in range({rows}):"):
            code(f"{out}_acc += {k.transposed(m)}[j, i] * {k.elem(v, ('i',))}")
        code(f"{out}[j] = {out}_acc")


def _stacked_product(k: "_RowKernel", members: tuple[Node, ...], code: Code, transpose: bool):
    """Products that multiply one vector by several parameters (see _stacked_products), at the
    first of them that a step reaches: one micro-kernel product with the parameters stacked,
    each member's output a view of the stacked output (made by the glue). By the same rule as
    one product's: where the stacked output is shorter than each sum, each member runs its
    lanes along the sums instead."""
    if members[0].uid in k.stacked_done:
        return
    k.stacked_done.add(members[0].uid)
    stack = f"{k.names.var(members[0])}_stack"
    weights = k.packed(tuple(m.args[0].attr for m in members), transpose, stack)
    k.scratch[stack] = f"packed_width({weights})"
    k.arrays.add(stack)
    start, total = "0", []
    for m in members:
        size = _product_sizes(k, m, transpose)[0]
        end = f"{start} + {size}" if start != "0" else size
        k.views[k.names.var(m)] = (stack, start, end)
        k.arrays.add(k.names.var(m))
        start = end
        total.append(size)
    vector = k.vector(members[0].args[1], code)
    sum_size = _product_sizes(k, members[0], transpose)[1]
    if sum_size in total:  # a member as long as the sums: the stack is longer
        code(f"packed_matvec({vector}, {weights}, {stack})")
        return
    with code.block(f"if {' + '.join(total)} >= {sum_size}:"):
        code(f"packed_matvec({vector}, {weights}, {stack})")
    with code.block("else:"):
        for m in members:
            _lanes_along_sums(k, m, code, transpose)


def _rolled(k: "_RowKernel", size: str, i: str, offset: int) -> str:
    """The index that element i of a vector rolled by `offset` reads (np.roll: i - offset,
    modulo the size; Numba's % of integers is Python's, never negative)."""
    return f"(({i}) - ({offset})) % {k.size(size)}"


def _shift(k: "_RowKernel", n: Node, code: Code):
    """The circular convolution of w by the shift distribution (rank2.shift): out[i] is the
    sum over k of s_k w[i - o_k], o_k the k-th shift."""
    out, (w, *s) = k.var(n), n.args
    terms = [f"{k.elem(sk, ())} * {k.elem(w, (_rolled(k, w.shape[0], 'i', o),))}"
             for sk, o in zip(s, rank2.shift_offsets(len(s)))]
    with code.block(f"for i in range({k.size(w.shape[0])}):"):
        code(f"{out}[i] = {' + '.join(terms)}")


ROW_CODE: dict[str, Callable] = {
    "shift": _shift,
    "rsum": _row_sum,
    "rmean": lambda k, n, code: _row_sum(k, n, code, mean=True),
    "rmax": _row_max,
    "softmax": _softmax,
    "axis_softmax": lambda k, n, code: _softmax(k, n, code, over=n.attr),
    "matvec": lambda k, n, code: _product(k, n, code, transpose=False),
    "mv": lambda k, n, code: _product(k, n, code, transpose=False),
    "matvec_t": lambda k, n, code: _product(k, n, code, transpose=True),
    "mtv": lambda k, n, code: _product(k, n, code, transpose=True),
    "axis_sum": lambda k, n, code: _matrix_sum(k, n, code, n.attr,
                                               lambda: k.elem(n.args[0], ("i", "j"))),
}


def _nest(code: Code, heads: list[str]) -> ExitStack:
    """Loops around a block (none: the block itself)."""
    stack = ExitStack()
    for head in heads:
        stack.enter_context(code.block(head))
    return stack


# -- the kernels ------------------------------------------------------------------------------
_LOOPS = ("i", "j")
# A weight matrix's gradient is a sum over steps and rows of outer products g v^T. Adding each
# to dW in the row loop reads and writes all of dW per step and row (memory-bound); instead
# backward keeps every step's g and v, (T, B, n) each, and the glue adds G^T V as one GEMM
# (blas.weight_grad).
_OUTER_SIDES = ("g", "v")
_ALL_ROWS = "rows_"  # a cuda kernel's argument of every row's private array (B, ...)


def _outer_side(names: Names, weight: str, term: int, side: str) -> str:
    """The array of one side of one term of a weight matrix's gradient."""
    return f"w{side}{names.param[weight]}_{term}"


class _RowKernel:
    """One kernel over batch rows: `forward` (with the tape when `save`), `infer`, or
    `backward` (which recomputes the matrix states between kept copies). On the cpu target an
    @njit function over a chunk of rows [b0, b1); on cuda a `@cuda.jit` kernel of one thread
    per row b (`cuda.grid(1)`), whose private arrays (`private`) are (B, ...), the thread's
    own row of each taken as a view. The step code is the same on both. Both ask for Numba's
    file cache: compiled for sm_90, mlstm's backward kernel took 62 s and the NTM's 419 s."""

    def __init__(self, plan: RowPlan, names: Names, kind: str, save: bool = False,
                 target: str = "cpu"):
        self.plan, self.names, self.kind, self.save = plan, names, kind, save
        self.target = target
        self.arrays: set[str] = set()
        self.scratch: dict[str, str] = {}  # array -> its sizes as code, "n0, n1"
        self.transposes: dict[str, str] = {}  # a parameter's transpose -> the parameter
        # packed weights -> (parameters stacked, transposed)
        self.packs: dict[str, tuple[tuple[str, ...], bool]] = {}
        self.views: dict[str, tuple[str, str, str]] = {}  # array -> (array, start, end) it views
        self.stacked_done: set[int] = set()  # stacked products the step being written has
        self.sizes_used: set[str] = set()
        self.matrix = {s: f"m{k}" for k, s in enumerate(plan.step.states)
                       if s in plan.matrix_states}
        self.slot = ""  # the working slot of the matrix states before this step
        self.body = self._body()

    # -- names ----------------------------------------------------------------------------------
    def var(self, n: Node) -> str:
        name = self.names.var(n)
        if n.shape and name not in self.views:  # (a product's may be wider: see _product)
            self.scratch.setdefault(name, ", ".join(self.size(d) for d in n.shape))
            self.arrays.add(name)
        return name

    def use(self, array: str) -> str:
        self.arrays.add(array)
        return array

    def packed(self, params: tuple[str, ...], transpose: bool, stack: str = "") -> str:
        """Matrix parameters packed by the glue for `packed_matvec`: v @ W.T (W @ v), or with
        `transpose` g @ W (W.T @ g); several stacked along the output (`stack` names them)."""
        codes = tuple(self.names.param[p] for p in params)
        name = ("q" if transpose else "k") + (stack or codes[0])
        self.packs[name] = (codes, transpose)
        return self.use(name)

    def vector(self, n: Node, code: Code) -> str:
        """A vector of one row as a C-contiguous 1-D array: an input's or a vector state's
        row, a parameter, a value kept in scratch, else (a value computed in place, an
        adjoint) written into a scratch of its own first."""
        names = self.names
        if n.op == "input":
            return f"{self.use(names.input[n.attr])}[t, b]"
        if n.op == "prev" and n.attr not in self.matrix:
            return f"{self.use(names.state[n.attr])}[t, b]"
        if n.op == "param":
            return self.use(names.param[n.attr])
        if self.reads_saved(n):
            return f"{self.use(self.saved_name(n))}[b, t]"
        if not n.is_leaf and n.uid not in self.plan.inline:
            return self.var(n)
        held = f"{self.names.var(n)}_row"
        self.scratch[held] = self.size(n.shape[0])
        self.arrays.add(held)
        with code.block(f"for j in range({self.size(n.shape[0])}):"):
            code(f"{held}[j] = {self.elem(n, ('j',))}")
        return held

    def reads_saved(self, n: Node) -> bool:
        """Whether this kernel reads n from the forward pass's saved values (backward)."""
        return self.kind == "backward" and n.uid in self.plan.saved

    def kept_in_place(self) -> list[Node]:
        """The saved vectors the forward pass (cpu) computes straight into their arrays, the
        step's row of each taken as the value's scratch: all but the products with a
        parameter, whose scratch is as wide as their packed weights (these are copied)."""
        if not self.save or self.target != "cpu":
            return []
        return [n for n in self.plan.saved.values() if n.shape and
                not (n.op in _PRODUCTS and n.args[0].op == "param")]

    def saved_name(self, n: Node) -> str:
        """The array of a saved value's every step, (B, T, ...): a row's steps side by side,
        so that threads running different rows write different cache lines (one (T, B)
        array of a scalar has all rows' values of a step in one line)."""
        return "r" + self.names.var(n)

    def transposed(self, param: Node) -> str:
        """The C-contiguous transpose of a matrix parameter, which the glue makes."""
        name = "t" + self.names.param[param.attr]
        self.transposes[name] = self.names.param[param.attr]
        return self.use(name)

    def size(self, s: str) -> str:
        return self.names.size[s]

    def size_float(self, s: str) -> str:
        self.sizes_used.add(s)
        return f"z_{self.names.size[s]}"

    # -- elements -------------------------------------------------------------------------------
    def elem(self, n: Node, idx: tuple[str, ...]) -> str:
        """Code for the element of `n` at `idx` (one index per axis of n)."""
        names = self.names
        if n.op == "const":
            return names.const(n.attr)
        if n.op == "size":
            return self.size_float(n.attr)
        if n.op == "input":
            return f"{self.use(names.input[n.attr])}[t, b, {idx[0]}]"
        if n.op == "prev":
            if n.attr in self.matrix:
                return f"{self.use(self.matrix[n.attr])}[{self.slot}, {', '.join(idx)}]"
            return f"{self.use(names.state[n.attr])}[t, b, {self.at(idx)}]"
        if n.op == "param":
            return f"{self.use(names.param[n.attr])}[{', '.join(idx) if idx else '0'}]"
        if n.op == "adj":
            return self.seed(n, idx)
        if self.reads_saved(n):
            return f"{self.use(self.saved_name(n))}[b, t{''.join(', ' + i for i in idx)}]"
        if n.uid in self.plan.inline:
            return self.compute(n, idx)
        if not n.shape:
            return self.names.var(n)
        return f"{self.var(n)}[{', '.join(idx)}]"

    def compute(self, n: Node, idx: tuple[str, ...]) -> str:
        """The element of an index map or elementwise node, from its arguments'."""
        if n.op in INDEX_MAPS:
            return INDEX_MAPS[n.op](self, n, idx)
        return element_code(n, [self.elem(a, idx if a.shape else ()) for a in n.args])

    def seed(self, n: Node, idx: tuple[str, ...]) -> str:
        """The adjoint arriving at this step: from step t+1 (`d` arrays of one row) and the
        loss (the output's gradient); padded steps are never run."""
        at = self.at(idx)
        return f"({' + '.join(seed_terms(self.names, self.use, n.attr, at, f't, b, {at}'))})"

    # -- a step -------------------------------------------------------------------------------
    def step(self, code: Code, roots: list[Node]):
        """Every node the roots need, in order; each stored or local unless computed in
        place."""
        self.stacked_done = set()
        saved = (lambda n: n.uid in self.plan.saved) if self.kind == "backward" else \
            (lambda n: False)
        for n in ir.topo_order_until(roots, saved):
            if n.is_leaf or n.uid in self.plan.inline or saved(n):
                continue
            if n.op in ROW_CODE:
                ROW_CODE[n.op](self, n, code)
            elif not n.shape:
                code(f"{self.names.var(n)} = {self.compute(n, ())}")
            else:
                self.store_loop(code, n.shape, lambda idx, n=n: (
                    f"{self.var(n)}[{', '.join(idx)}] = {self.compute(n, idx)}"))

    def store_loop(self, code: Code, shape: tuple[str, ...], line: Callable):
        """A loop nest over `shape` around line(indices)."""
        idx = _LOOPS[2 - len(shape):] if shape else ()
        with _nest(code, [f"for {i} in range({self.size(s)}):" for i, s in zip(idx, shape)]):
            code(line(idx))

    def at(self, idx: tuple[str, ...]) -> str:
        return ", ".join(idx) if idx else "0"

    def dims(self, state: str) -> tuple[str, ...]:
        """The sizes of a state of one row, as code (a scalar state's one element: "1")."""
        return tuple(self.size(d) for d in state_shape(self.plan.step.states[state])) or ("1",)

    def copy(self, code: Code, dims: tuple[str, ...], dst: tuple[str, str],
             src: tuple[str, str] | str):
        """dst = src over every element of one row's state or output: each an (array, leading
        indices or "") pair, or src a constant. The cpu kernels assign slices; the cuda kernels
        loop over the elements (real CUDA may not lower a slice assignment that the simulator
        runs)."""
        if self.target == "cpu":
            left = f"{dst[0]}[{dst[1] or ', '.join(':' for _ in dims)}]"
            right = src if isinstance(src, str) else f"{src[0]}[{src[1]}]" if src[1] else src[0]
            code(f"{left} = {right}")
            return
        idx = _LOOPS[:len(dims)]

        def at(array: str, lead: str) -> str:
            return f"{array}[{', '.join(([lead] if lead else []) + list(idx))}]"

        with _nest(code, [f"for {i} in range({d}):" for i, d in zip(idx, dims)]):
            code(f"{at(*dst)} = {src if isinstance(src, str) else at(*src)}")

    @contextmanager
    def each_row(self, code: Code):
        """The rows a kernel runs: its chunk's on the cpu; on cuda the thread's one row, which
        the kernel's opening finds (`text`)."""
        if self.target == "cuda":
            yield
            return
        with code.block("for b in range(b0, b1):"):
            yield

    # -- the kernels' bodies --------------------------------------------------------------------
    def _body(self) -> list[str]:
        return self._backward() if self.kind == "backward" else self._forward()

    def _forward(self) -> list[str]:
        step, names, code = self.plan.step, self.names, Code(level=1)
        with self.each_row(code):
            code("L = lengths[b]")
            for s, m in self.matrix.items():
                self.copy(code, self.dims(s), (self.use(m), "0"),
                          (self.use("i" + names.state[s]), "b"))
            self.slot = "t % 2"
            with code.block("for t in range(L):"):
                if self.save:
                    with code.block("if t % every == 0:"):
                        for s, m in self.matrix.items():
                            self.copy(code, self.dims(s),
                                      (self.use("k" + names.state[s]), "t // every, b"),
                                      (m, "t % 2"))
                in_place = {n.uid: n for n in self.kept_in_place()}
                for n in in_place.values():
                    code(f"{self.var(n)} = {self.use(self.saved_name(n))}[b, t]")
                self.step(code, step.roots())
                if self.save:
                    for n in self.plan.saved.values():
                        if n.uid in in_place:
                            continue
                        kept = self.use(self.saved_name(n))
                        self.store_loop(code, n.shape, lambda idx, n=n, kept=kept: (
                            f"{kept}[b, t{''.join(', ' + i for i in idx)}] = "
                            f"{self.elem(n, idx)}"))
                for s in step.states:
                    n = step.values[s]
                    target = (f"{self.matrix[s]}[(t + 1) % 2, " if s in self.matrix else
                              f"{self.use(names.state[s])}[t + 1, b, ")
                    self.store_loop(code, n.shape, lambda idx, n=n, target=target: (
                        f"{target}{self.at(idx)}] = {self.elem(n, idx)}"))
                for o in step.outputs:
                    n = step.values[o]
                    self.store_loop(code, n.shape, lambda idx, n=n, o=o: (
                        f"{self.use(names.output[o])}[t, b, {self.at(idx)}] = "
                        f"{self.elem(n, idx)}"))
            with code.block("for t in range(L, T):"):  # padding: states frozen, outputs zero
                for s in step.states:
                    if s not in self.matrix:
                        c = self.use(names.state[s])
                        self.copy(code, self.dims(s), (c, "t + 1, b"), (c, "t, b"))
                for o in step.outputs:
                    dims = tuple(self.size(d) for d in step.shape_of(o)) or ("1",)
                    self.copy(code, dims, (self.use(names.output[o]), "t, b"), "C0")
            for s, m in self.matrix.items():
                self.copy(code, self.dims(s), (self.use("f" + names.state[s]), "b"),
                          (m, "L % 2"))
        return code.lines

    def _backward(self) -> list[str]:
        plan, step, names, code = self.plan, self.plan.step, self.names, Code(level=1)
        bwd = plan.backward
        with self.each_row(code):
            code("L = lengths[b]")
            for s, c in names.state.items():
                self.copy(code, self.dims(s), (self.use("d" + c), ""), (self.use("e" + c), "b"))
            with code.block("for t0 in range((L - 1) // every * every, -1, -every):"):
                code("t1 = min(t0 + every, L)")
                self.slot = "t - t0"
                for s, m in self.matrix.items():  # the segment's states, from its kept copy
                    self.copy(code, self.dims(s), (self.use(m), "0"),
                              (self.use("k" + names.state[s]), "t0 // every, b"))
                with code.block("for t in range(t0, t1 - 1):"):
                    news = plan.new_matrices()
                    self.step(code, news)
                    for s, n in zip(self.matrix, news):
                        self.store_loop(code, n.shape, lambda idx, n=n, s=s: (
                            f"{self.matrix[s]}[t - t0 + 1, {self.at(idx)}] = "
                            f"{self.elem(n, idx)}"))
                with code.block("for t in range(t1 - 1, t0 - 1, -1):"):
                    self._backward_step(code, bwd)
            for s, c in names.state.items():
                self.copy(code, self.dims(s), (self.use("g" + c), "b"), ("d" + c, ""))
        return code.lines

    def _backward_step(self, code: Code, bwd: Backward):
        plan, names = self.plan, self.names
        self.step(code, plan.backward_roots())
        for s, n in plan.d_prev.items():
            c = names.state[s]
            self.store_loop(code, n.shape, lambda idx, n=n, c=c: (
                f"{self.use('n' + c)}[{self.at(idx)}] = {self.elem(n, idx)}"))
        for x, n in plan.d_inputs.items():
            self.store_loop(code, n.shape, lambda idx, n=n, x=x: (
                f"{self.use('d' + names.input[x])}[t, b, {idx[0]}] = {self.elem(n, idx)}"))
        for p, n in bwd.d_params.items():
            self.store_loop(code, n.shape, lambda idx, n=n, p=p: (
                f"{self.use('d' + names.param[p])}[{self.at(idx)}] += {self.elem(n, idx)}"))
        for w, terms in bwd.d_matrices.items():  # dW += g v^T: g and v kept for one GEMM
            for k, (g, v) in enumerate(terms):
                for side, n in zip(_OUTER_SIDES, (g, v)):
                    kept = self.use(_outer_side(names, w, k, side))
                    self.store_loop(code, n.shape, lambda idx, n=n, kept=kept: (
                        f"{kept}[t, b, {idx[0]}] = {self.elem(n, idx)}"))
        for s, c in names.state.items():  # the previous state's adjoint is the next one's
            self.copy(code, self.dims(s), ("d" + c, ""), ("n" + c, ""))

    # -- the function ---------------------------------------------------------------------------
    def private(self) -> list[str]:
        """The arrays each chunk of rows (cpu: row_threads.run_rows) or each row (cuda) has its
        own of: one row's values and matrix states, the adjoints carried between steps, and
        the sums over the chunk's rows (the row's terms) of the gradients of vector
        parameters."""
        own = {*self.scratch, *self.views, *self.matrix.values()}
        if self.kind == "backward":
            own |= {f"{p}{c}" for c in self.names.state.values() for p in ("d", "n")}
            own |= {"d" + self.names.param[p] for p in self.plan.backward.d_params}
        return sorted(own & self.arrays)

    def shared(self) -> list[str]:
        """The kernel's arguments after its rows and private arrays."""
        return [*self.names.size.values(), "lengths", "every",
                *sorted(self.arrays - set(self.private()))]

    def args(self) -> list[str]:
        if self.target == "cuda":  # all rows' private arrays, (B, ...) each
            return ["T", "B", *(_ALL_ROWS + a for a in self.private()), *self.shared()]
        return ["T", "b0", "b1", *self.private(), *self.shared()]

    def call(self) -> str:
        """The glue's line that runs the kernel over all rows."""
        private = self.private()
        if self.target == "cuda":
            return (f"{self.kind}_rows[cs.blocks(B, cs.ROW_THREADS), cs.ROW_THREADS, "
                    f"stream.kernels]({', '.join(['T', 'B', *private, *self.shared()])})")
        return (f"run_rows({self.kind}_rows, T, chunks, {as_tuple(private)}, "
                f"{', '.join(self.shared())})")

    def text(self) -> str:
        floats = [f"    z_{self.names.size[s]} = DT({self.names.size[s]})"
                  for s in sorted(self.sizes_used)]
        if self.target == "cpu":
            head = ['@njit(cache=True, fastmath=FAST, error_model="numpy", nogil=True)',
                    f"def {self.kind}_rows({', '.join(self.args())}):"]
            return "\n".join(head + floats + self.body) + "\n"
        head = ["@cuda.jit(cache=True)", f"def {self.kind}_rows({', '.join(self.args())}):",
                "    b = cuda.grid(1)", "    if b >= B:", "        return",
                *(f"    {a} = {_ALL_ROWS}{a}[b]" for a in self.private())]
        return "\n".join(head + floats + self.body) + "\n"


# -- the module -------------------------------------------------------------------------------
def emit_module(plan: RowPlan, dtype: str, header: str, target: str = "cpu") -> str:
    """The module of a row plan for `target` ("cpu": NumPy arrays, chunks of rows on threads;
    "cuda": device arrays, one GPU thread per row)."""
    names = Names(plan)
    fwd = _RowKernel(plan, names, "forward", save=True, target=target)
    inf = _RowKernel(plan, names, "infer", target=target)
    bwd = _RowKernel(plan, names, "backward", target=target)
    kernels = [fwd.text(), inf.text(), bwd.text()]
    arrays = _DEVICE if target == "cuda" else _HOST
    if target == "cuda":
        head = [header, "import math", "", "import numpy as np", "",
                "from rnndsl.backend import cuda_support as cs",
                "from rnndsl.backend.cuda_support import cuda",
                "from rnndsl.backend.emit_rows import checkpoint_every, deep_recursion", "",
                f"DT = np.{dtype}", constant_lines(names, dtype), kernel_functions(dtype, "cuda")]
    else:
        imports = ("from rnndsl.backend.blas import weight_grad\n"
                   "from rnndsl.backend.emit_rows import checkpoint_every, deep_recursion\n"
                   "from rnndsl.backend.packed import pack, packed_matvec, packed_width\n"
                   "from rnndsl.backend.row_threads import row_chunks, run_rows")
        head = cpu_module_head(header, names, dtype, imports, FASTMATH,
                               inline=False)  # hundreds of call sites: see kernel_functions
    return "\n".join([
        *head,
        *kernels,
        _forward_glue(plan, names, fwd, arrays, save=True),
        _forward_glue(plan, names, inf, arrays, save=False),
        _backward_glue(plan, names, bwd, arrays),
    ])


class _HostArrays:
    """How the cpu glue makes and combines arrays: NumPy, a private array per chunk of rows."""

    copies = "len(chunks)"  # of each private array
    stream = ""  # the glue's extra argument
    ran = ""  # what a pass returns after its results

    def empty(self, shape: str) -> str:
        return f"empty({shape}, DT)"

    def zeros(self, shape: str) -> str:
        return f"np.zeros({shape}, DT)"

    def zeros_like(self, a: str) -> str:
        return f"np.zeros_like({a})"

    def contiguous(self, a: str) -> str:
        return f"np.ascontiguousarray({a})"

    def transpose(self, a: str) -> str:
        return f"np.ascontiguousarray({a}.T)"

    def assign(self, dst: str, src: str) -> str:
        return f"{dst} = {src}"

    def sum_copies(self, a: str) -> list[str]:
        """A private sum's copies added up, into `a`."""
        return [f"{a} = {a}.sum(axis=0)"]

    def add_weight_grad(self, d: str, g: str, v: str) -> str:
        """d += the sum over steps and rows of outer(g, v): one GEMM."""
        return f"{d} += weight_grad({g}, {v})"


class _DeviceArrays(_HostArrays):
    """How the cuda glue makes and combines arrays: device arrays (cuda_support), work on the
    glue's stream, a private array per batch row."""

    copies = "B"
    stream = ", stream"
    ran = ", ('per-row', cs.blocks(B, cs.ROW_THREADS))"

    def empty(self, shape: str) -> str:
        return f"cs.empty({shape}, DT)"

    def zeros(self, shape: str) -> str:
        return f"cs.zeros({shape}, DT, stream)"

    def zeros_like(self, a: str) -> str:
        return self.zeros(f"{a}.shape")

    def contiguous(self, a: str) -> str:  # kernels index device arrays of any strides
        return a

    def transpose(self, a: str) -> str:
        return f"cs.transpose({a}, stream)"

    def assign(self, dst: str, src: str) -> str:
        return f"cs.copy({dst}, {src}, stream)"

    def sum_copies(self, a: str) -> list[str]:
        return [f"{a}_rows = {a}", f"{a} = {self.zeros(f'{a}_rows.shape[1:]')}",
                f"cs.add_column_sums({a}, {a}_rows.reshape(B, {a}.size), 0, stream)"]

    def add_weight_grad(self, d: str, g: str, v: str) -> str:
        return f"cs.gemm(cs.flat({g}), cs.flat({v}), {d}, stream, trans_a=True, accumulate=True)"


_HOST, _DEVICE = _HostArrays(), _DeviceArrays()


def _opening(plan: RowPlan, names: Names, signature: str, arrays: _HostArrays) -> Code:
    L = function(signature)
    L(unpack(list(names.param.values()), "params"),
      unpack(list(names.input.values()), "xs"),
      unpack(list(names.size.values()), "sizes"),
      "T, B = xs[0].shape[0], xs[0].shape[1]")
    if arrays is _DEVICE:  # the engine gives scalar parameters as one-element arrays
        return L
    L("chunks = row_chunks(B)")
    for p, info in plan.step.params.items():  # kernels read scalar parameters as arrays
        if not info.shape:
            c = names.param[p]
            L(f"{c}_shape = np.shape({c})", f"{c} = np.reshape({c}, 1)")
    return L


def _scratch(L: Code, k: _RowKernel, arrays: _HostArrays):
    """The kernel's arrays besides the pass's own: parameters packed for the micro-kernel
    (cpu), private scratch (a product's as wide as its packed weights; the members of a
    stacked product views of its output), parameters' transposes."""
    for name, (params, transpose) in sorted(k.packs.items()):
        w = params[0] if len(params) == 1 else \
            f"np.concatenate({as_tuple(params)}, axis={1 if transpose else 0})"
        L(f"{name} = pack({w if transpose else w + '.T'}, 1)")
    for name, shape in sorted(k.scratch.items()):
        L(f"{name} = {arrays.empty(f'({arrays.copies}, {shape})')}")
    for name, (stack, start, end) in sorted(k.views.items()):
        L(f"{name} = {stack}[:, {start}:{end}]")
    for name, param in sorted(k.transposes.items()):
        L(f"{name} = {arrays.transpose(param)}")


def _forward_glue(plan: RowPlan, names: Names, k: _RowKernel, arrays: _HostArrays,
                  save: bool) -> str:
    step = plan.step
    L = _opening(plan, names, f"def {'forward' if save else 'infer'}(params, xs, state0, "
                              f"lengths, sizes{arrays.stream}{', budget' if save else ''}):",
                 arrays)
    matrices = [names.state[s] for s in plan.matrix_states]
    elements = " + ".join(f"i{c}[0].size" for c in matrices) or "0"
    for s, c in names.state.items():
        shape, given = state_shape(step.states[s]), f"state0[{list(names.state).index(s)}]"
        if s in plan.matrix_states:
            dims = ", ".join(names.size[d] for d in shape)
            L(f"i{c} = {arrays.contiguous(given)}",
              f"f{c} = {arrays.empty(f'(B, {dims})')}",
              f"{k.matrix[s]} = {arrays.empty(f'({arrays.copies}, 2, {dims})')}")
        else:  # a per-sequence scalar state is (B, 1), as the reference engine's
            L(f"{c} = {arrays.empty(f'(T + 1, B, {names.size[shape[0]] if shape else 1})')}",
              arrays.assign(f"{c}[0]", given))
    if save:
        L(f"every = checkpoint_every(T, B, {elements}, DT(0).itemsize, budget)")
        for c in matrices:
            L(f"k{c} = {arrays.empty(f'((T - 1) // every + 1, *i{c}.shape)')}")
        for n in plan.saved.values():
            dims = "".join(", " + names.size[d] for d in n.shape)
            L(f"{k.saved_name(n)} = {arrays.empty(f'(B, T{dims})')}")
    else:
        L("every = T")
    for o, c in names.output.items():
        dims = ", ".join(names.size[d] for d in step.shape_of(o)) or "1"
        L(f"{c} = {arrays.empty(f'(T, B, {dims})')}")
    _scratch(L, k, arrays)
    with L.block("with deep_recursion():"):
        L(k.call())
    outs = as_tuple(names.output.values())
    finals = as_tuple(f"f{c}" if s in plan.matrix_states else f"{c}[T]"
                      for s, c in names.state.items())
    if not save:
        L(f"return {outs}, {finals}{arrays.ran}")
        return L.text() + "\n"
    saved = as_tuple([*(c for s, c in names.state.items() if s not in plan.matrix_states),
                      *(k.saved_name(n) for n in plan.saved.values()),
                      *(f"k{c}" for c in matrices), "every"])
    L(f"return {outs}, {finals}, {saved}{arrays.ran}")
    return L.text() + "\n"


def _backward_glue(plan: RowPlan, names: Names, k: _RowKernel, arrays: _HostArrays) -> str:
    step = plan.step
    # input_grads as the vector kernels take it: the rows' loop computes them either way
    L = _opening(plan, names, "def backward(params, xs, lengths, saved, d_outputs, d_final, "
                              f"sizes{arrays.stream}, input_grads=True):", arrays)
    L(unpack([*(c for s, c in names.state.items() if s not in plan.matrix_states),
              *(k.saved_name(n) for n in plan.saved.values()),
              *(f"k{names.state[s]}" for s in plan.matrix_states), "every"], "saved"),
      unpack([f"d{c}" for c in names.output.values()], "d_outputs"))
    for s, c in names.state.items():
        dims = ", ".join(names.size[d] for d in state_shape(step.states[s])) or "1"
        L(f"e{c} = {arrays.contiguous(f'd_final[{list(names.state).index(s)}]')}")
        L(f"g{c} = {arrays.empty(f'(B, {dims})')}")
        L(f"d{c} = {arrays.empty(f'({arrays.copies}, {dims})')}")
        L(f"n{c} = {arrays.empty(f'({arrays.copies}, {dims})')}")
        if s in plan.matrix_states:
            L(f"{k.matrix[s]} = {arrays.empty(f'({arrays.copies}, every, {dims})')}")
    for x, c in names.input.items():
        L(f"d{c} = {arrays.zeros(f'(T, B, {names.size[step.inputs[x]]})')}")
    summed = {names.param[p] for p in plan.backward.d_params}  # per chunk, added up after
    for c in names.param.values():
        L(f"d{c} = {arrays.zeros(f'({arrays.copies}, *np.shape({c}))')}" if c in summed else
          f"d{c} = {arrays.zeros_like(c)}")
    kept = [(names.param[w], g, v, *(_outer_side(names, w, t, side) for side in _OUTER_SIDES))
            for w, terms in plan.backward.d_matrices.items() for t, (g, v) in enumerate(terms)]
    for _, g, v, g_kept, v_kept in kept:  # zeros at padded steps
        L(f"{g_kept} = {arrays.zeros(f'(T, B, {names.size[g.shape[0]]})')}",
          f"{v_kept} = {arrays.zeros(f'(T, B, {names.size[v.shape[0]]})')}")
    _scratch(L, k, arrays)
    with L.block("with deep_recursion():"):
        L(k.call())
    for c in sorted(summed):
        L(*arrays.sum_copies(f"d{c}"))
    for c, _, _, g_kept, v_kept in kept:
        L(arrays.add_weight_grad(f"d{c}", g_kept, v_kept))
    dparams = as_tuple(f"d{names.param[p]}.reshape({names.param[p]}_shape)"
                       if not i.shape and arrays is _HOST else f"d{names.param[p]}"
                       for p, i in step.params.items())
    L(f"return {dparams}, {as_tuple('d' + c for c in names.input.values())}, "
      f"{as_tuple('g' + c for c in names.state.values())}{arrays.ran}")
    return L.text() + "\n"
