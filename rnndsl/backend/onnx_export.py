"""The ONNX target: a cell, or a `Network` of cells with its head, as an ONNX graph for
inference (ONNX Runtime, TensorRT, browsers: wherever Python and PyTorch do not run).

The forward step IR becomes the body of one `Scan` over time: the states are carried, the
outputs scanned. Whatever does not depend on a state is computed before the loop over all
T*B rows: the input products (`W_ii @ x`, `W_if @ x`, ...) as one MatMul per vector, their
weights stacked, and what follows them before a state enters (`W_ii @ x + b_ii`); inside
the body, the products of one vector (`W_hi @ h_prev`, `W_hf @ h_prev`, ...) are one MatMul
as well. Per-sequence lengths are a mask computed before the loop: past a
sequence's length its states freeze and its outputs are zero, as in every other engine. The
graph does not depend on T (nor on B): time and batch are symbolic dimensions.

Each primitive of `rnndsl/symbolic/ops.py` has one lowering in `LOWERINGS`, a function of
the graph being written and the argument tensors; the lowering mirrors the NumPy rule of the
reference engine (NaN propagates through `min` and `max` as in NumPy). `tests/test_onnx.py`
checks that every primitive has one and runs each against its NumPy rule; an operator
without one is refused by name when a cell using it is exported.

Conventions inside the graph: a vector per sequence is (B, n) in the loop and (T, B, n)
outside it, a per-row scalar (B, 1) or (T, B, 1), parameters as they are except matrices,
which are stored transposed, (cols, rows), as the right operand of `v @ W.T`. Graph names
never clash with the spec's names: inputs are `input.<x>`, `state0.<s>` and `lengths`,
outputs `output.<o>` and `state.<s>`, parameters `param.<p>` (a Network: `x`, `lengths`,
`y`, and `prediction` with a head; its parameters keep their names, `layer0.fwd.W_ii`).

`onnx` is an optional dependency (`pip install "rnndsl[onnx]"`); it is imported when an
export runs, not when rnndsl is.
"""
from __future__ import annotations

import itertools
from collections import defaultdict
from pathlib import Path

import numpy as np

from rnndsl.language.errors import UserError, printable
from rnndsl.symbolic import ir
from rnndsl.symbolic.ir import Node, StepIR
from rnndsl.symbolic.ops import block_diagonal

OPSET = 18  # ReduceSum/Mean/Max take their axes as an input; ONNX Runtime >= 1.14


def _onnx():
    try:
        import onnx
    except ImportError:
        raise UserError("exporting to ONNX needs the onnx package: "
                        "pip install 'rnndsl[onnx]'") from None
    return onnx


class Graph:
    """An ONNX graph being written: nodes go to the current body (the main graph, or a Scan's
    body while one is written); initializers (parameters, constants) always go to the main
    graph, where a Scan body sees them as outer-scope values."""

    def __init__(self, dtype, function: bool = False):
        self.onnx = _onnx()
        self.dtype = np.dtype(dtype)
        self.elem = self.onnx.helper.np_dtype_to_tensor_dtype(self.dtype)
        self.sizes: dict[str, int] = {}  # of the cell being written
        self.nodes: list = []
        self.initializers: dict[str, np.ndarray] = {}
        # An ONNX function has no initializers: its constants (and what it computes once from
        # its inputs, such as transposed weights) are nodes at its top, where every nested
        # Scan body sees them.
        self.function = function
        self.preamble: list = []
        self._names = itertools.count()
        self._consts: dict[tuple, str] = {}

    def fresh(self) -> str:
        return f"t{next(self._names)}"

    def op(self, op_type: str, *inputs: str, outputs: int = 1, **attrs):
        """One node; its output name (a list of names when outputs > 1)."""
        names = [self.fresh() for _ in range(outputs)]
        self.nodes.append(self.onnx.helper.make_node(op_type, list(inputs), names, **attrs))
        return names[0] if outputs == 1 else names

    def top_op(self, op_type: str, *inputs: str, **attrs) -> str:
        """One node computed once, before anything that may read it (a function's top)."""
        if not self.function:
            return self.op(op_type, *inputs, **attrs)
        name = self.fresh()
        self.preamble.append(self.onnx.helper.make_node(op_type, list(inputs), [name], **attrs))
        return name

    def rename(self, tensor: str, name: str) -> str:
        """The tensor under a name of the graph's interface."""
        self.nodes.append(self.onnx.helper.make_node("Identity", [tensor], [name]))
        return name

    def const(self, value, dtype=None) -> str:
        """A constant array (the graph's float type unless `dtype` is given), one per value."""
        array = np.asarray(value, dtype=dtype or self.dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._consts:
            self._consts[key] = (
                self.top_op("Constant", value=self.onnx.numpy_helper.from_array(array))
                if self.function else self.initializer(f"const{len(self._consts)}", array))
        return self._consts[key]

    def initializer(self, name: str, array: np.ndarray) -> str:
        self.initializers[name] = np.array(array, order="C")  # (ascontiguousarray makes 0-d 1-d)
        return name

    def weight(self, name: str, array) -> str:
        """A parameter of the graph's float type (a matrix transposed, see the docstring)."""
        if name not in self.initializers:
            array = np.asarray(array, dtype=self.dtype)
            self.initializer(name, array.T if array.ndim == 2 else array)
        return name

    def value_info(self, name: str, shape, elem=None):
        return self.onnx.helper.make_tensor_value_info(name, elem or self.elem, shape)

    def subgraph(self, nodes: list, name: str, inputs: list, outputs: list):
        return self.onnx.helper.make_graph(nodes, name, inputs, outputs)

    def model(self, inputs: list, outputs: list, name: str):
        onnx = self.onnx
        inits = [onnx.numpy_helper.from_array(a, n) for n, a in self.initializers.items()]
        graph = onnx.helper.make_graph(self.nodes, name, inputs, outputs, initializer=inits)
        model = onnx.helper.make_model(graph, producer_name="rnndsl",
                                       opset_imports=[onnx.helper.make_opsetid("", OPSET)])
        onnx.checker.check_model(model, full_check=True)
        return model


class Weights:
    """A cell's parameters as its graph reads them (matrices transposed, see the module's
    docstring): initializers made from arrays, named `prefix + name`."""

    def __init__(self, g: Graph, arrays: dict, prefix: str = ""):
        self.g, self.arrays, self.prefix = g, arrays, prefix

    def rows(self, name: str) -> int:
        return np.shape(self.arrays[name])[0]

    def get(self, name: str) -> str:
        return self.g.weight(self.prefix + name, self.arrays[name])

    def stacked(self, names: list[str], blocks: list[int] | None = None) -> str:
        """The matrices one above the other, as one (transposed) matrix; of a block-diagonal
        one (`blocks` > 1) its diagonal blocks alone, zeros elsewhere, as every engine reads
        it."""
        whole = np.concatenate([block_diagonal(np.asarray(self.arrays[n]), b) for n, b in
                                zip(names, blocks or [1] * len(names))], axis=0)
        return self.g.weight(self.prefix + "+".join(names), whole)


class TensorWeights(Weights):
    """A cell's parameters read from tensors of the graph (a function's inputs), each as the
    user holds it, (rows, cols) for a matrix; transposed and stacked once, at the top."""

    def __init__(self, g: Graph, tensors: dict[str, str], shapes: dict[str, tuple]):
        self.g, self.tensors, self.shapes = g, tensors, shapes
        self._made: dict[str, str] = {}

    def rows(self, name: str) -> int:
        return self.shapes[name][0]

    def get(self, name: str) -> str:
        if len(self.shapes[name]) != 2:
            return self.tensors[name]
        return self.stacked([name])

    def stacked(self, names: list[str], blocks: list[int] | None = None) -> str:
        key = "+".join(names)
        if key not in self._made:
            # a block-diagonal one's blocks alone, zeros elsewhere: selected, as 0 * inf is NaN
            parts = [self.tensors[n] if b == 1 else self.g.top_op(
                         "Where", self.g.const(block_diagonal(np.ones(self.shapes[n], bool), b),
                                               dtype=bool),
                         self.tensors[n], self.g.const(0.0))
                     for n, b in zip(names, blocks or [1] * len(names))]
            whole = parts[0] if len(parts) == 1 else self.g.top_op("Concat", *parts, axis=0)
            self._made[key] = self.g.top_op("Transpose", whole)
        return self._made[key]


# -- one lowering per primitive of symbolic/ops.py ----------------------------------------------
def _where_first(compare: str):
    """min/max as NumPy computes them: the first argument where it wins or is NaN, else the
    second (so a NaN in either propagates)."""
    def lower(g: Graph, n: Node, a: str, b: str) -> str:
        first = g.op("Or", g.op(compare, a, b), g.op("IsNaN", a))
        return g.op("Where", first, a, b)
    return lower


def _cast(g: Graph, boolean: str) -> str:
    return g.op("Cast", boolean, to=g.elem)


def _softplus(g: Graph, n: Node, x: str) -> str:
    # max(x, 0) + log(1 + exp(-|x|)): NumPy's rule, without overflow for large |x|
    zero, one = g.const(0.0), g.const(1.0)
    tail = g.op("Log", g.op("Add", one, g.op("Exp", g.op("Neg", g.op("Abs", x)))))
    return g.op("Add", LOWERINGS["maximum"](g, n, x, zero), tail)


def _hard_sigmoid(g: Graph, n: Node, x: str) -> str:
    from rnndsl.symbolic.ops import HARD_SLOPE

    line = g.op("Add", g.op("Mul", g.const(HARD_SLOPE), x), g.const(0.5))
    low = LOWERINGS["maximum"](g, n, line, g.const(0.0))
    return LOWERINGS["minimum"](g, n, low, g.const(1.0))


def _erf(g: Graph, n: Node, x: str) -> str:
    # ONNX Runtime has Erf for float32 only: a float64 graph computes it in float32.
    if g.dtype == np.float32:
        return g.op("Erf", x)
    return g.op("Cast", g.op("Erf", g.op("Cast", x, to=g.onnx.TensorProto.FLOAT)), to=g.elem)


def _row(op_type: str):
    """A reduction over the feature axis, kept as a (..., 1) column."""
    return lambda g, n, x: g.op(op_type, x, g.const([-1], np.int64), keepdims=1)


def _rmax(g: Graph, n: Node, x: str) -> str:
    """NumPy's max over a row: NaN where the row holds one (ONNX Runtime's float32 ReduceMax
    passes over NaN)."""
    axis = g.const([-1], np.int64)
    nans = g.op("ReduceMax", _cast(g, g.op("IsNaN", x)), axis, keepdims=1)
    top = g.op("ReduceMax", x, axis, keepdims=1)
    return g.op("Where", g.op("Greater", nans, g.const(0.0)), g.const(np.nan), top)


def _bcast(g: Graph, n: Node, x: str) -> str:
    """A per-row scalar spread over the features: (..., 1) -> (..., n)."""
    return g.op("Expand", x, g.const([1, g.sizes[n.shape[0]]], np.int64))


def _simple(op_type: str):
    return lambda g, n, *args: g.op(op_type, *args)


LOWERINGS = {
    "add": _simple("Add"), "sub": _simple("Sub"), "mul": _simple("Mul"),
    "div": _simple("Div"), "neg": _simple("Neg"), "pow": _simple("Pow"),
    "sigmoid": _simple("Sigmoid"), "tanh": _simple("Tanh"), "exp": _simple("Exp"),
    "log": _simple("Log"), "relu": _simple("Relu"), "abs": _simple("Abs"),
    "sqrt": _simple("Sqrt"), "sign": _simple("Sign"),
    "softplus": _softplus, "hard_sigmoid": _hard_sigmoid, "erf": _erf,
    "minimum": _where_first("Less"), "maximum": _where_first("Greater"),
    "step": lambda g, n, x: _cast(g, g.op("Greater", x, g.const(0.0))),
    "eq": lambda g, n, a, b: _cast(g, g.op("Equal", a, b)),
    "rsum": _row("ReduceSum"), "rmean": _row("ReduceMean"), "rmax": _rmax,
    "softmax": lambda g, n, x: g.op("Softmax", x, axis=-1),
    "bcast": _bcast,
    # w is the matrix stored transposed (cols, rows): W @ v is v @ w, W.T @ v is v @ w.T
    "matvec": lambda g, n, w, v: g.op("MatMul", v, w),
    "matvec_t": lambda g, n, w, v: g.op("MatMul", v, g.op("Transpose", w)),
}


def check_lowerable(step: StepIR) -> None:
    """Refuse, by name, a cell using an operator that has no ONNX lowering."""
    missing = sorted({n.op for n in ir.topo_order(step.roots())
                      if not n.is_leaf and n.op not in LOWERINGS})
    if missing:
        raise UserError(f"cannot export {step.name} to ONNX: no ONNX lowering for the "
                        f"operator(s) {', '.join(missing)}")


# -- a cell as one Scan ------------------------------------------------------------------------
def _emit(g: Graph, order: list[Node], memo: dict[int, str], weights: Weights) -> None:
    """Lower `order` (each node after its arguments) into g, naming each result in `memo`.
    Leaves that vary per step (inputs, previous states) must be in memo already. The matrix
    products of one vector are one MatMul by their stacked weights, split afterwards."""
    by_vector: dict[int, list[Node]] = defaultdict(list)
    for n in order:
        if n.op == "matvec" and n.uid not in memo:
            by_vector[n.args[1].uid].append(n)

    def value(a: Node) -> str:
        if a.uid not in memo:  # a parameter, made where it is used: a matrix may be used
            memo[a.uid] = weights.get(a.attr)  # only stacked
        return memo[a.uid]

    for n in order:
        if n.uid in memo or n.op == "param":
            continue
        if n.op == "const":
            memo[n.uid] = g.const(n.attr)
        elif n.op == "size":
            memo[n.uid] = g.const(float(g.sizes[n.attr]))
        elif n.op == "matvec":
            group = by_vector[n.args[1].uid]
            w = weights.stacked([m.args[0].attr for m in group], [m.attr or 1 for m in group])
            product = LOWERINGS["matvec"](g, n, w, value(n.args[1]))
            if len(group) == 1:
                memo[n.uid] = product
                continue
            rows = g.const([weights.rows(m.args[0].attr) for m in group], np.int64)
            parts = g.op("Split", product, rows, axis=-1, outputs=len(group))
            memo.update({m.uid: part for m, part in zip(group, parts)})
        elif n.is_leaf:
            raise AssertionError(f"{n.op} '{n.attr}' has no value here")
        else:
            memo[n.uid] = LOWERINGS[n.op](g, n, *(value(a) for a in n.args))


def _recurrent(order: list[Node]) -> set[int]:
    """The nodes that depend on a previous state."""
    found: set[int] = set()
    for n in order:
        if n.op == "prev" or any(a.uid in found for a in n.args):
            found.add(n.uid)
    return found


def scan_cell(g: Graph, step: StepIR, weights: Weights, xs: dict[str, str],
              state0: dict[str, str], live: str) -> tuple[dict[str, str], dict[str, str]]:
    """Write the cell over whole sequences into g: xs are (T, B, n) tensors, state0 (B, n),
    live the (T, B, 1) mask of the steps inside each sequence. Returns the output sequences
    (T, B, n) and the final states (B, n) by name."""
    check_lowerable(step)
    order = ir.topo_order(step.roots())
    recurrent = _recurrent(order)

    def before_the_loop(n: Node) -> bool:
        return n.batched and n.uid not in recurrent

    # What does not depend on a state is computed before the loop over all T*B rows (the
    # input products as one MatMul per vector); the body reads it one step at a time.
    body_order = ir.topo_order_until(step.roots(), before_the_loop)
    hoisted = [n for n in body_order if before_the_loop(n)]
    outer = {n.uid: xs[n.attr] for n in order if n.op == "input"}
    _emit(g, ir.topo_order(hoisted), outer, weights)
    # the body: what one step computes from the previous states and the step's slices
    main_nodes, g.nodes = g.nodes, []
    prev = {s: g.fresh() for s in step.states}
    memo = {n.uid: prev[n.attr] for n in order if n.op == "prev"}
    body_inputs = [g.value_info(prev[s], ["B", g.sizes[size]]) for s, size in step.states.items()]
    scan_inputs = []

    def sliced(outer_name: str, width, elem=None) -> str:
        inner = g.fresh()
        body_inputs.append(g.value_info(inner, ["B", width], elem))
        scan_inputs.append(outer_name)
        return inner

    step_live = sliced(live, 1, g.onnx.TensorProto.BOOL)
    memo.update({n.uid: sliced(outer[n.uid], _width(g, n.shape)) for n in hoisted})
    _emit(g, body_order, memo, weights)
    states = [g.op("Where", step_live, memo[step.values[s].uid], prev[s]) for s in step.states]
    outs = [g.op("Where", step_live, memo[step.values[o].uid], g.const(0.0))
            for o in step.outputs]
    body = g.subgraph(g.nodes, f"{step.name}_step", body_inputs,
                      [g.value_info(v, None) for v in states + outs])
    g.nodes = main_nodes
    results = g.op("Scan", *(state0[s] for s in step.states), *scan_inputs, body=body,
                   num_scan_inputs=len(scan_inputs), outputs=len(states) + len(outs))
    results = [results] if isinstance(results, str) else results
    finals = dict(zip(step.states, results))
    return dict(zip(step.outputs, results[len(states):])), finals


def _live_mask(g: Graph, x: str, lengths: str) -> str:
    """(T, B, 1) bool: step t of sequence b is inside it (t < lengths[b])."""
    steps = g.op("Squeeze", g.op("Shape", x, start=0, end=1), g.const([0], np.int64))
    t = g.op("Range", g.const(0, np.int64), steps, g.const(1, np.int64))
    column = g.op("Unsqueeze", t, g.const([1, 2], np.int64))  # (T, 1, 1)
    return g.op("Less", column, g.op("Unsqueeze", lengths, g.const([0, 2], np.int64)))


# -- the public API ------------------------------------------------------------------------------
def export_onnx(model, params: dict, path=None, *, head=None, sizes: dict | None = None,
                name: str | None = None):
    """Export a cell or a network with its parameters as an ONNX model; write it to `path`
    if given; return the `onnx.ModelProto`.

    `model` is a `Cell`, a spec (a built-in name, a path or YAML text), or a
    `rnndsl.Network`. The float type is the parameters' (float32 or float64). A cell's sizes
    are read off its parameters; `sizes` ({"hidden": 64}) gives those that no parameter fixes.

    A cell's graph takes `input.<x>` (T, B, n) for each input, `state0.<s>` (B, n) for each
    state and `lengths` (B,) int64, and returns `output.<o>` (T, B, n) for each output and
    `state.<s>` (B, n) for each final state: what `Cell.forward` returns.

    A network's graph takes `x` (T, B, input_size) and `lengths` (B,) int64 and returns `y`,
    what `Network.forward` returns; with `head` (a `rnndsl.training.heads.Head`, whose
    `head.W` and `head.b` are in `params`) also `prediction`, what `Head.predict` returns."""
    from rnndsl.training.layers import Network

    if isinstance(model, Network):
        if sizes:
            raise UserError("sizes are a cell's; a Network has its own")
        g, inputs, outputs = _network_graph(model, params, head)
        label = model.cell.name
    else:
        if head is not None:
            raise UserError("a head needs a Network under it")
        step = model.step if hasattr(model, "step") else _step_of(model)
        g, inputs, outputs = _cell_graph(step, params, sizes or {})
        label = step.name
    proto = g.model(inputs, outputs, name or label)
    if path is not None:
        _write(proto, path)
    return proto


def _step_of(source) -> StepIR:
    from rnndsl import compiler

    return compiler.analyse(source)[0]


def _float_type(params: dict):
    kinds = {np.asarray(v).dtype for v in params.values()}
    return np.float64 if np.dtype(np.float64) in kinds else np.float32


def _sizes(step: StepIR, params: dict, given: dict | None = None) -> dict[str, int]:
    """The sizes of a cell read off its parameters (and `given`); a disagreement is an error."""
    strange = [s for s in given or {} if s not in step.sizes]
    if strange:
        raise UserError(f"sizes: {step.name} has no size(s) {', '.join(map(repr, strange))}")
    found: dict[str, int] = dict(given or {})
    missing, unknown = set(step.params) - set(params), set(params) - set(step.params)
    if missing or unknown:
        raise UserError(f"parameters of {step.name}: missing {sorted(missing) or 'none'}, "
                        f"unknown {sorted(unknown) or 'none'}")
    for p, info in step.params.items():
        shape = np.shape(params[p])
        if len(shape) != len(info.shape):
            raise UserError(f"parameter '{p}' must have {len(info.shape)} dimension(s), got "
                            f"shape {shape}")
        for s, n in zip(info.shape, shape):
            if found.setdefault(s, n) != n:
                raise UserError(f"size '{s}' is {found[s]}, but {n} in parameter '{p}'")
    return found


def _kernel_params(step: StepIR, params: dict, given: dict) -> dict:
    """The parameters as the step IR takes them: a parameter that the spec multiplies with a
    concatenation, `W @ [h_prev, x]`, comes whole (hidden, hidden + input) and is cut into the
    IR's blocks, as `Cell.forward` does. Sizes are read off the whole parameters: a sum of
    sizes gives the one of its terms that nothing else fixes."""
    from rnndsl.engines.cell import _block_indices

    layout = step.layout
    if not layout.cuts or not set(layout.cuts) <= set(params):
        return params  # already the IR's parameters (or missing: _sizes names them)
    found = {s: n for s, n in given.items() if s in step.sizes}
    dims = [(s, n) for p, info in layout.params.items() if p in params
            for s, n in zip(info.shape, np.shape(params[p]))]
    for _ in dims:  # each pass fixes at least one size, or nothing more can be fixed
        for s, n in dims:
            terms = [t.strip() for t in s.split("+")]
            unknown = [t for t in terms if not t.isdigit() and t not in found]
            if len(unknown) == 1:
                known = sum(int(t) if t.isdigit() else found[t] for t in terms if t != unknown[0])
                found[unknown[0]] = n - known
    out = dict(params)
    for p, cut in layout.cuts.items():
        w = np.asarray(out.pop(p))
        for k, index in zip(cut.names, _block_indices(cut, w.ndim, found)):
            out[k] = np.ascontiguousarray(w[index])
    return out


def _cell_graph(step: StepIR, params: dict, sizes: dict):
    params = _kernel_params(step, params, sizes)
    g = Graph(_float_type(params))
    g.sizes = _sizes(step, params, sizes)
    unknown = [s for s in step.sizes if s not in g.sizes]
    if unknown:
        raise UserError(f"cannot tell size(s) {', '.join(unknown)} of {step.name} from its "
                        f"parameters: pass sizes={{{', '.join(repr(s) + ': n' for s in unknown)}}}")
    xs = {x: f"input.{x}" for x in step.inputs}
    state0 = {s: f"state0.{s}" for s in step.states}
    first = next(iter(xs.values()))
    outs, finals = scan_cell(g, step, Weights(g, params, "param."), xs, state0,
                             _live_mask(g, first, "lengths"))
    inputs = [g.value_info(xs[x], ["T", "B", g.sizes[size]]) for x, size in step.inputs.items()]
    inputs += [g.value_info(state0[s], ["B", g.sizes[size]]) for s, size in step.states.items()]
    inputs.append(g.value_info("lengths", ["B"], g.onnx.TensorProto.INT64))
    outputs = []
    for o in step.outputs:
        outputs.append(g.value_info(g.rename(outs[o], f"output.{o}"),
                                    ["T", "B", _width(g, step.shape_of(o))]))
    for s, size in step.states.items():
        outputs.append(g.value_info(g.rename(finals[s], f"state.{s}"), ["B", g.sizes[size]]))
    return g, inputs, outputs


def cell_function(step: StepIR, sizes: dict[str, int], dtype, domain: str, name: str,
                  opset: int = OPSET):
    """The cell over whole sequences as an ONNX function `domain.name` (a
    `onnx.FunctionProto`), for a graph that holds its parameters as tensors rather than
    initializers (a model exported from PyTorch). Its inputs: the parameters as the user holds
    them (a matrix of a concatenation whole), in the layout's order, the input sequences, the
    initial states and the lengths; its outputs: the output sequences, the final states, and
    an int64 0 where the PyTorch op returns its tape handle."""
    from rnndsl.engines.cell import _block_indices, _dims

    g = Graph(dtype, function=True)
    g.sizes = dict(sizes)
    layout = step.layout
    params = {p: f"param.{p}" for p in layout.params}
    shapes = {p: _dims(info.shape, g.sizes) for p, info in layout.params.items()}
    tensors = dict(params)
    for p, cut in layout.cuts.items():
        whole = tensors.pop(p)
        for block, index in zip(cut.names, _block_indices(cut, len(shapes[p]), g.sizes)):
            tensors[block] = _index(g, whole, index)
    block_shapes = {p: _dims(info.shape, g.sizes) for p, info in step.params.items()}
    xs = {x: f"input.{x}" for x in step.inputs}
    state0 = {s: f"state0.{s}" for s in step.states}
    live = _live_mask(g, next(iter(xs.values())), "lengths")
    outs, finals = scan_cell(g, step, TensorWeights(g, tensors, block_shapes), xs, state0, live)
    results = [g.rename(outs[o], f"output.{o}") for o in step.outputs]
    results += [g.rename(finals[s], f"state.{s}") for s in step.states]
    results.append(g.rename(g.const(0, np.int64), "tape"))
    onnx = g.onnx
    return onnx.helper.make_function(
        domain, name, [*params.values(), *xs.values(), *state0.values(), "lengths"], results,
        g.preamble + g.nodes, [onnx.helper.make_opsetid("", opset)])


def _index(g: Graph, tensor: str, index: tuple) -> str:
    """tensor[index] for NumPy basic indices: slices, and integers that drop their axis
    (taken last axis first, so that a dropped axis does not move the ones before it)."""
    for axis in reversed(range(len(index))):
        i = index[axis]
        if isinstance(i, slice):
            if i == slice(None):
                continue
            tensor = g.top_op("Slice", tensor, g.const([i.start], np.int64),
                              g.const([i.stop], np.int64), g.const([axis], np.int64))
        else:
            tensor = g.top_op("Gather", tensor, g.const(i, np.int64), axis=axis)
    return tensor


def _width(g: Graph, shape: tuple[str, ...]) -> int:
    return g.sizes[shape[0]] if shape else 1


def _write(proto, path) -> None:
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{printable(path)} is a folder; give a file name for the ONNX model")
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_bytes(proto.SerializeToString())
        tmp.replace(path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise UserError(f"cannot write {printable(path)}: {exc.strerror or exc}") from None


# -- a Network and its head ----------------------------------------------------------------------
def _network_graph(net, params: dict, head):
    """The graph of `Network.forward` (and `Head.predict`), following its structure: each
    layer and direction one Scan, the backward direction between two ReverseSequence nodes
    (which reverse each sequence within its own length, as `reverse_within`)."""
    try:
        net._check(params if head is None else
                   {k: v for k, v in params.items() if not k.startswith("head.")})
    except ValueError as exc:
        raise UserError(str(exc)) from None
    from rnndsl.training.layers import X

    g = Graph(_float_type(params))
    live = _live_mask(g, "x", "lengths")
    values = {X: g.op("Where", live, "x", g.const(0.0))}  # padding ignored, as forward()
    batch = g.op("Shape", "x", start=1, end=2)
    for layer, stream, directions in net._parts():
        sources = [values[k] for k in net._sources(layer, stream)]
        u = _combine(g, net, params, layer, stream, sources)
        outs = []
        for d in directions:
            own = net._cell_params(params, layer, d)
            g.sizes = _sizes(net.cell.step, own, net._layer_sizes(layer))
            zeros = {s: g.op("ConstantOfShape", g.op("Concat", batch, g.const(
                [g.sizes[size]], np.int64), axis=0), value=_zero_tensor(g))
                for s, size in net.cell.states.items()}
            seq = u if d == "fwd" else _reverse(g, u)
            out, _ = scan_cell(g, net.cell.step, Weights(g, own, f"layer{layer}.{d}."),
                               {net.x_name: seq}, zeros, live)
            first = out[net.cell.outputs[0]]
            outs.append(first if d == "fwd" else _reverse(g, first))
        y = outs[0] if len(outs) == 1 else g.op("Concat", *outs, axis=2)
        if net.residual:
            y = g.op("Add", y, _project(g, net, params, net._name(layer, "proj", stream), u))
        values[(layer, stream)] = y
    tops = [values[(net.layers - 1, s)] for s in net.streams]
    y = g.rename(tops[0] if len(tops) == 1 else g.op("Concat", *tops, axis=2), "y")
    inputs = [g.value_info("x", ["T", "B", net.input_size]),
              g.value_info("lengths", ["B"], g.onnx.TensorProto.INT64)]
    outputs = [g.value_info(y, ["T", "B", net.output_size])]
    if head is not None:
        outputs.append(_head(g, head, params, y))
    return g, inputs, outputs


def _zero_tensor(g: Graph):
    return g.onnx.numpy_helper.from_array(np.zeros(1, g.dtype))


def _reverse(g: Graph, seq: str) -> str:
    return g.op("ReverseSequence", seq, "lengths", time_axis=0, batch_axis=1)


def _project(g: Graph, net, params: dict, name: str, a: str) -> str:
    """a @ P.T, or a where there is no P (as Network._project)."""
    if name not in net.param_shapes():
        return a
    return g.op("MatMul", a, g.weight(name, params[name]))


def _combine(g: Graph, net, params: dict, layer: int, stream: str, sources: list) -> str:
    if len(sources) == 1:
        return sources[0]
    if net.dense == "concat":
        return g.op("Concat", *sources, axis=2)
    x, *below = sources
    total = _project(g, net, params, net._name(layer, "xproj", stream), x)
    for b in below:
        total = g.op("Add", total, b)
    return total


def _head(g: Graph, head, params: dict, y: str):
    """`Head.predict`: probabilities, values or bit probabilities at every step (T, B, out),
    or at each sequence's last step (B, out)."""
    read = y
    if not head.per_step:  # the last step is the first of the sequence reversed in place
        read = g.op("Gather", _reverse(g, y), g.const(0, np.int64), axis=0)
    scores = g.op("Add", g.op("MatMul", read, g.weight("head.W", params["head.W"])),
                  g.weight("head.b", params["head.b"]))
    if head.family == "softmax":
        scores = g.op("Softmax", scores, axis=-1)
    elif head.family == "bits":
        scores = g.op("Sigmoid", scores)
    shape = ["T", "B", head.out_size] if head.per_step else ["B", head.out_size]
    return g.value_info(g.rename(scores, "prediction"), shape)


def export_checkpoint(spec, checkpoint, path):
    """The network and head of a training checkpoint (`rnndsl train --save`), its cells
    compiled from `spec`, written to `path` as an ONNX model; returns the `onnx.ModelProto`.
    A parameter the checkpoint lacks or holds in another shape is a UserError naming it."""
    from dataclasses import replace

    from rnndsl.training.train import Model, read_checkpoint

    _onnx()  # before any work
    ckpt = read_checkpoint(checkpoint)
    try:
        model = Model(replace(ckpt["config"], spec=str(spec)))
    except OSError as exc:  # charlm's text file, which fixes the input size
        raise UserError(f"{printable(checkpoint)} was trained on {printable(exc.filename)}, "
                        f"which cannot be read: {exc.strerror or exc}") from None
    except ValueError as exc:  # a cell that cannot make the checkpoint's network
        raise UserError(f"{printable(spec)}: {printable(exc)}") from None
    head = model.head
    shapes = {**model.network.param_shapes(), "head.W": (head.out_size, head.in_size),
              "head.b": (head.out_size,)}
    params = {}
    for k, shape in shapes.items():
        value = ckpt["entries"].get(f"param/{k}")
        if value is None or value.shape != shape:
            found = "missing" if value is None else f"of shape {value.shape}"
            raise UserError(f"{printable(checkpoint)}: parameter '{printable(k)}' is {found}, "
                            f"expected {shape} for a network of {printable(spec)}")
        params[k] = value
    return export_onnx(model.network, params, path, head=head)
