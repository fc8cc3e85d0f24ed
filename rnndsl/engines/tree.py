"""Runtime for tree cells: a batch of trees run level by level with the cell's step kernels.

`TreeBatch` flattens a batch of trees into N nodes (given as parent indices, as lists of
children, or as nested tuples whose leaves are the inputs), checks it (one root per tree, no
cycle, no node with two parents, every leaf with an input) and groups the nodes by height:
leaves first, each node after all its children.

`TreeCell` runs a compiled tree spec (language/tree.py) over such a batch. Per level, the
nodes of that height across all trees are one batch of the node step (T = 1): their
children's states are gathered into the step's child-state inputs (zeros for a missing
child), so one call of the generated kernels computes the whole level, its products as
GEMMs over all the level's nodes. With `arity: any`, the per-child step runs first over all
the level's (node, child) pairs, and its terms are summed per node (a segment sum) into the
node step's inputs. Backward runs the levels top down: the adjoints of the child-state
inputs are added to the children's state adjoints, parameter gradients summed over levels.

Arrays are per node: inputs (N, n), states and outputs (N, n), in the batch's node order
(tree by tree, each tree's nodes as the user numbered them; nested tuples in pre-order).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

from rnndsl.engines.cell import (Cell, Grads, _common_dtype, _dims, _known, _solve_sums,
                                 make_params)
from rnndsl.language.errors import UserError
from rnndsl.language.spec import SUM


class TreeError(UserError):
    """A batch of trees that is not one: the message names the tree and the node."""


@dataclass(frozen=True)
class Level:
    """The nodes of one height, and the edges to their children."""

    ids: np.ndarray  # (B,) the nodes
    child: np.ndarray  # (E,) each edge's child
    parent: np.ndarray  # (E,) each edge's parent, as a row of `ids`
    slot: np.ndarray  # (E,) the child's place among its parent's children


@dataclass(frozen=True)
class TreeBatch:
    """Trees flattened into N nodes; see the module docstring."""

    parent: np.ndarray  # (N,) the parent of each node, -1 for a root
    slot: np.ndarray  # (N,) the node's place among its parent's children, -1 for a root
    tree: np.ndarray  # (N,) the tree each node belongs to
    local: np.ndarray  # (N,) the node's number within its tree
    inputs: np.ndarray  # (N, n) each node's input; zeros where a node carries none
    levels: tuple[Level, ...] = field(repr=False)

    @property
    def size(self) -> int:
        return len(self.parent)

    @property
    def roots(self) -> np.ndarray:
        """The root of each tree, in tree order."""
        return np.flatnonzero(self.parent < 0)

    def with_inputs(self, inputs) -> "TreeBatch":
        """The same trees with other inputs, an (N, n) array (e.g. embeddings being trained)."""
        inputs = np.asarray(inputs)
        if inputs.ndim != 2 or inputs.shape[0] != self.size:
            raise TreeError(f"inputs for a batch of {self.size} nodes must be ({self.size}, n); "
                            f"got shape {inputs.shape}")
        return dataclasses.replace(self, inputs=inputs)

    def children_counts(self) -> np.ndarray:
        return np.bincount(self.parent[self.parent >= 0], minlength=self.size)

    def name(self, node: int) -> str:
        return f"tree {self.tree[node]}, node {self.local[node]}"

    # -- making a batch ---------------------------------------------------------------------
    @classmethod
    def from_parents(cls, parents, inputs) -> "TreeBatch":
        """`parents[t][i]`: the parent of node i of tree t (-1 for the root); `inputs[t]`: an
        array with a row per node, or a dict {node: vector} of the nodes that carry an input
        (every leaf must; the others read zeros). Children are ordered by their numbers."""
        trees = []
        for t, p in enumerate(parents):
            p = _whole_numbers(p, f"tree {t}: parent indices")
            n = len(p)
            bad = np.flatnonzero((p < -1) | (p >= n))
            if len(bad):
                raise TreeError(f"tree {t}, node {bad[0]}: parent {p[bad[0]]} is not a node of "
                                f"the tree (0 to {n - 1}, or -1 for the root)")
            children = [[] for _ in range(n)]
            for i in range(n):
                if p[i] >= 0:
                    children[p[i]].append(i)
            trees.append(children)
        return cls.from_children(trees, inputs)

    @classmethod
    def from_children(cls, children, inputs) -> "TreeBatch":
        """`children[t][i]`: the children of node i of tree t, in order; `inputs` as in
        `from_parents`."""
        if len(children) != len(inputs):
            raise TreeError(f"{len(children)} trees but inputs for {len(inputs)}")
        if not len(children):
            raise TreeError("a batch needs at least one tree")
        parent, slot, tree, local, rows = [], [], [], [], []
        offset, width = 0, None
        for t, (kids, given) in enumerate(zip(children, inputs)):
            n = len(kids)
            if n == 0:
                raise TreeError(f"tree {t} has no nodes")
            p, s = _parents_of(t, kids)
            x = _inputs_of(t, kids, given, width)
            width = x.shape[1]
            parent.append(np.where(p >= 0, p + offset, -1))
            slot.append(s)
            tree.append(np.full(n, t))
            local.append(np.arange(n))
            rows.append(x)
            offset += n
        dtype = np.result_type(*rows)
        parent = np.concatenate(parent)
        slot = np.concatenate(slot)
        return cls(parent, slot, np.concatenate(tree), np.concatenate(local),
                   np.concatenate(rows).astype(dtype if dtype.kind == "f" else np.float64),
                   _levels(parent, slot))

    @classmethod
    def from_nested(cls, trees) -> "TreeBatch":
        """Each tree a nested tuple (or list): an internal node is a tuple of its children, a
        leaf is its input vector. Nodes are numbered in pre-order; internal nodes read a zero
        input."""
        children, inputs = [], []
        for t, root in enumerate(trees):
            kids, given = [], {}
            stack = [(root, -1, "")]
            while stack:
                value, parent, path = stack.pop()
                i = len(kids)
                kids.append([])
                if parent >= 0:
                    kids[parent].append(i)
                if isinstance(value, (tuple, list)):
                    if not value:
                        raise TreeError(f"tree {t}, node {i} (at {path or 'the root'}): an "
                                        "empty tuple; a leaf is its input vector")
                    stack += [(v, i, f"{path}[{k}]") for k, v in reversed(list(enumerate(value)))]
                elif value is None:
                    raise TreeError(f"tree {t}, node {i} (at {path or 'the root'}): a leaf "
                                    "without an input")
                else:
                    given[i] = value
            children.append(kids)
            inputs.append(given)
        return cls.from_children(children, inputs)


def _whole_numbers(values, what: str) -> np.ndarray:
    a = np.asarray(values)
    if a.ndim != 1 or (a.size and a.dtype.kind not in "iu"):
        raise TreeError(f"{what} must be a list of whole numbers")
    return a.astype(np.int64)


def _parents_of(t: int, kids) -> tuple[np.ndarray, np.ndarray]:
    """Each node's parent and place among its siblings; one root, no node twice, no cycle."""
    n = len(kids)
    parent = np.full(n, -1)
    slot = np.full(n, -1)
    for i, row in enumerate(kids):
        for k, c in enumerate(_whole_numbers(row, f"tree {t}, node {i}: children")):
            if not 0 <= c < n:
                raise TreeError(f"tree {t}, node {i}: child {c} is not a node of the tree "
                                f"(0 to {n - 1})")
            if c == i:
                raise TreeError(f"tree {t}, node {i} is its own child (a cycle)")
            if parent[c] >= 0:
                raise TreeError(f"tree {t}, node {c} has two parents (nodes {parent[c]} and {i})"
                                if parent[c] != i else
                                f"tree {t}, node {c} is a child of node {i} twice")
            parent[c], slot[c] = i, k
    roots = np.flatnonzero(parent < 0)
    if len(roots) == 0:
        raise TreeError(f"tree {t} has no root: every node has a parent, so they form a cycle "
                        "(through node 0)")
    if len(roots) > 1:
        raise TreeError(f"tree {t} has {len(roots)} roots (nodes {roots[0]} and {roots[1]} have "
                        "no parent); a tree has one")
    seen = np.zeros(n, bool)
    stack = [roots[0]]
    while stack:
        i = stack.pop()
        seen[i] = True
        stack.extend(kids[i])
    if not seen.all():  # one parent each and one root: what the root cannot reach is a cycle
        raise TreeError(f"tree {t}, node {np.flatnonzero(~seen)[0]} is on a cycle (the root, "
                        f"node {roots[0]}, does not reach it)")
    return parent, slot


def _inputs_of(t: int, kids, given, width: int | None) -> np.ndarray:
    """A row per node: given rows, zeros for nodes that carry none; every leaf carries one."""
    n = len(kids)
    if isinstance(given, dict):
        for i in given:
            if not (isinstance(i, (int, np.integer)) and 0 <= i < n):
                raise TreeError(f"tree {t}: input for node {i!r}, which the tree does not have")
        vectors = {i: np.asarray(v) for i, v in given.items()}
        for i, v in vectors.items():
            if v.ndim != 1 or (width is not None and len(v) != width) or v.dtype.kind not in "fiu":
                raise TreeError(f"tree {t}, node {i}: an input is a vector of numbers"
                                f"{f' of size {width}' if width else ''}, got shape {v.shape}")
            width = len(v)
        missing = [i for i in range(n) if not kids[i] and i not in vectors]
        if missing:
            raise TreeError(f"tree {t}, node {missing[0]}: a leaf without an input")
        dtype = np.result_type(*vectors.values()) if vectors else np.float64
        x = np.zeros((n, width), dtype)
        for i, v in vectors.items():
            x[i] = v
        return x
    x = np.asarray(given)
    if x.ndim != 2 or x.shape[0] != n or (width is not None and x.shape[1] != width) or \
            x.dtype.kind not in "fiu":
        raise TreeError(f"tree {t}: inputs must be a ({n}, {width or 'n'}) array, a row per "
                        f"node, or a dict {{node: vector}}; got shape {x.shape}")
    return x


def _levels(parent: np.ndarray, slot: np.ndarray) -> tuple[Level, ...]:
    """Nodes grouped by height (leaves 0, a node one above its highest child)."""
    n = len(parent)
    height = np.zeros(n, np.int64)
    order = _top_down(parent)
    for i in order[::-1]:  # children before parents
        p = parent[i]
        if p >= 0 and height[p] < height[i] + 1:
            height[p] = height[i] + 1
    levels = []
    edges = np.flatnonzero(parent >= 0)
    for h in range(height.max() + 1):
        ids = np.flatnonzero(height == h)
        row = np.full(n, -1)
        row[ids] = np.arange(len(ids))
        mine = edges[row[parent[edges]] >= 0]
        levels.append(Level(ids, mine, row[parent[mine]], slot[mine]))
    return tuple(levels)


def _top_down(parent: np.ndarray) -> np.ndarray:
    """Every node after its parent (breadth first from the roots)."""
    children = [[] for _ in parent]
    for i, p in enumerate(parent):
        if p >= 0:
            children[p].append(i)
    order = list(np.flatnonzero(parent < 0))
    for i in order:
        order.extend(children[i])
    return np.asarray(order, np.int64)


@dataclass
class TreeForward:
    """What a forward pass over trees returns, per node, and keeps for backward."""

    outputs: dict[str, np.ndarray]  # name -> (N, n)
    states: dict[str, np.ndarray]  # name -> (N, n)
    batch: TreeBatch
    tape: list = field(repr=False, default_factory=list)

    @property
    def output(self) -> np.ndarray:
        return next(iter(self.outputs.values()))

    def at_roots(self, name: str | None = None) -> np.ndarray:
        """An output (the first by default) at each tree's root, (trees, n)."""
        return (self.outputs[name] if name else self.output)[self.batch.roots]


class TreeCell:
    """A compiled tree cell: its node step, its per-child step (`arity: any`), and how to run
    them over a batch of trees."""

    def __init__(self, checked, node: Cell, edge: Cell | None):
        self.checked = checked
        self.spec = checked.spec
        self.node, self.edge = node, edge
        self.children = checked.children  # child-state input -> (state, slot)
        self.sums = checked.sums
        params = dict(edge.params) if edge is not None else {}
        params.update(node.params)
        self.params = params

    name = property(lambda self: self.spec.name)
    sizes = property(lambda self: self.spec.sizes)
    inputs = property(lambda self: self.spec.inputs)
    states = property(lambda self: self.spec.states)
    outputs = property(lambda self: self.spec.outputs)
    arity = property(lambda self: self.spec.arity)

    def __repr__(self) -> str:
        return f"<rnndsl.TreeCell {self.name} ({self.node.engine.name})>"

    def init_params(self, *sizes_in_order: int, seed: int = 0, dtype=np.float32,
                    **sizes: int) -> dict[str, np.ndarray]:
        """Fresh parameters, as Cell.init_params."""
        return make_params(self.name, self.sizes, self.params, sizes_in_order, seed, dtype, sizes)

    # -- printing -----------------------------------------------------------------------------
    def equations(self) -> str:
        """The forward steps as equations."""
        if self.edge is None:
            return "# per node\n" + self.node.step.equations()
        return ("# per child k (one row per child of a node; each term is summed per node)\n" +
                self.edge.step.equations() + "\n# per node (each sum over the children)\n" +
                self.node.step.equations())

    def backward_equations(self) -> str:
        """The derived backward steps; d_<s>_parent is the adjoint of a node's state arriving
        from its parent (and the loss); d_<s>_left etc. leave for the children."""
        node = self.node.backward_ir.equations(seeds="d_{}_parent", previous=False)
        if self.edge is None:
            return "# per node, from the root down\n" + node
        edge = self.edge.backward_ir.equations(seeds="d_{}", previous=False)
        return ("# per node, from the root down\n" + node +
                "\n# per child k (each child gets its node's d_<sum>; d_x adds to the node's)\n" +
                edge)

    # -- running ------------------------------------------------------------------------------
    def forward(self, params: dict, batch: TreeBatch, save: bool = True) -> TreeForward:
        """Run the cell over every node of `batch`, leaves first."""
        params, x, dtype = self._arrays(params, batch)
        sizes = self._sizes(params, x)
        n = batch.size
        states = {s: np.zeros((n + 1, sizes[size]), dtype) for s, size in self.states.items()}
        rest = {o: np.zeros((n, *(_dims(self.node.step.shape_of(o), sizes) or (1,))), dtype)
                for o in self.outputs if o not in self.states}
        node_params, edge_params = self._split(params)
        only = next(iter(self.inputs))
        tape = []
        for level in batch.levels:
            xs = {only: x[level.ids][None]}
            edge_fwd = None
            if self.edge is None:
                slots = self._slots(level, n)
                for c, (s, k) in self.children.items():
                    xs[c] = states[s][slots[:, k]][None]
            else:
                totals = {m: np.zeros((len(level.ids), sizes[size]), dtype)
                          for m, size in self.sums.items()}
                if len(level.child):
                    exs = {only: x[level.ids[level.parent]][None]}
                    exs.update({c: states[s][level.child][None]
                                for c, (s, _) in self.children.items()})
                    edge_fwd = self.edge.forward(edge_params, exs, save=save)
                    for m in self.sums:
                        np.add.at(totals[m], level.parent, edge_fwd.states[m])
                xs.update({m: v[None] for m, v in totals.items()})
            fwd = self.node.forward(node_params, xs, save=save)
            for s in self.states:
                states[s][level.ids] = fwd.states[s]
            for o in rest:
                rest[o][level.ids] = fwd.outputs[o][0]
            if save:
                tape.append((fwd, edge_fwd))
        per_node = {s: v[:n] for s, v in states.items()}
        outputs = {o: per_node[o] if o in per_node else rest[o] for o in self.outputs}
        return TreeForward(outputs, per_node, batch, tape if save else None)

    def backward(self, params: dict, fwd: TreeForward, d_outputs=None) -> Grads:
        """Gradients of a loss given its gradient w.r.t. each node's outputs (`d_outputs`:
        an (N, n) array for the first output, or a dict). `Grads.inputs` holds each node's
        input gradient (N, n); a tree cell has no initial state (`Grads.state0` is empty)."""
        if fwd.tape is None:
            raise ValueError("this forward pass ran with save=False: run it again to backpropagate")
        batch = fwd.batch
        params, x, dtype = self._arrays(params, batch)
        if d_outputs is None:
            d_outputs = {}
        elif not isinstance(d_outputs, dict):
            d_outputs = {self.outputs[0]: d_outputs}
        _known("d_outputs", d_outputs, self.outputs)
        d_outputs = {o: np.asarray(g, dtype) for o, g in d_outputs.items()}
        for o, g in d_outputs.items():
            if g.shape != fwd.outputs[o].shape:
                raise ValueError(f"d_outputs['{o}'] has shape {g.shape}, expected "
                                 f"{fwd.outputs[o].shape}")
        n = batch.size
        d_states = {s: np.zeros((n + 1, v.shape[1]), dtype) for s, v in fwd.states.items()}
        for o, g in d_outputs.items():
            if o in d_states:
                d_states[o][:n] += g
        d_x = np.zeros_like(x)
        node_params, edge_params = self._split(params)
        d_params = {p: np.zeros_like(v) for p, v in params.items()}
        only = next(iter(self.inputs))
        for level, (node_fwd, edge_fwd) in zip(reversed(batch.levels), reversed(fwd.tape)):
            seeds = {s: d[level.ids] for s, d in d_states.items()}
            d_rest = {o: g[level.ids][None] for o, g in d_outputs.items() if o not in d_states}
            grads = self.node.backward(node_params, node_fwd, d_rest, seeds)
            d_x[level.ids] += grads.inputs[only][0]
            _add(d_params, grads.params)
            if self.edge is None:
                slots = self._slots(level, n)
                for c, (s, k) in self.children.items():
                    d_states[s][slots[:, k]] += grads.inputs[c][0]  # row n: no child
            elif edge_fwd is not None:
                edge_seeds = {m: grads.inputs[m][0][level.parent] for m in self.sums}
                edge_grads = self.edge.backward(edge_params, edge_fwd, None, edge_seeds)
                np.add.at(d_x, level.ids[level.parent], edge_grads.inputs[only][0])
                for c, (s, _) in self.children.items():
                    d_states[s][level.child] += edge_grads.inputs[c][0]
                _add(d_params, edge_grads.params)
        return Grads(d_params, {only: d_x}, {})

    # -- helpers ------------------------------------------------------------------------------
    def _arrays(self, params: dict, batch: TreeBatch):
        if not isinstance(batch, TreeBatch):
            raise TypeError(f"{self.name} runs over trees: pass a TreeBatch (from_parents, "
                            "from_children or from_nested)")
        if len(self.inputs) != 1:
            raise ValueError(f"{self.name} has inputs {', '.join(self.inputs)}; a tree batch "
                             "carries one input per node")
        missing = [p for p in self.params if p not in params]
        extra = [p for p in params if p not in self.params]
        if missing or extra:
            raise ValueError(f"parameters of {self.name}: missing {missing or 'none'}, "
                             f"unknown {extra or 'none'}")
        if self.arity is not None:
            counts = batch.children_counts()
            over = np.flatnonzero(counts > self.arity)
            if len(over):
                raise TreeError(f"{batch.name(over[0])} has {counts[over[0]]} children; "
                                f"{self.name} takes at most {self.arity}")
        dtype = _common_dtype(params, {"x": batch.inputs})
        params = {p: np.asarray(v, dtype=dtype, order="C") for p, v in params.items()}
        return params, np.asarray(batch.inputs, dtype=dtype, order="C"), dtype

    def _sizes(self, params: dict, x: np.ndarray) -> dict[str, int]:
        """Sizes read off the parameters and the inputs; a disagreement is an error."""
        found: dict[str, tuple[int, str]] = {}
        shapes = [(next(iter(self.inputs.values())), x.shape[1], "the batch's inputs")]
        shapes += [(s, k, f"parameter '{p}'") for p, info in self.params.items()
                   for s, k in zip(info.shape, np.shape(params[p]))]
        for size, k, where in shapes:
            if SUM in size or size.isdigit():
                continue
            if size in found and found[size][0] != k:
                raise ValueError(f"size '{size}' is {found[size][0]} from {found[size][1]} but "
                                 f"{k} from {where}")
            found.setdefault(size, (k, where))
        _solve_sums([s for s in shapes if SUM in s[0]], found)
        missing = [s for s in self.sizes if s not in found]
        if missing:
            raise ValueError(f"cannot tell size(s) {missing} from the arrays given")
        return {s: k for s, (k, _) in found.items()}

    def _split(self, params: dict) -> tuple[dict, dict]:
        node = {p: params[p] for p in self.node.params}
        edge = {p: params[p] for p in self.edge.params} if self.edge is not None else {}
        return node, edge

    def _slots(self, level: Level, n: int) -> np.ndarray:
        """(nodes, arity): each node's child in each place, n (a row of zeros) where none."""
        slots = np.full((len(level.ids), self.arity), n)
        slots[level.parent, level.slot] = level.child
        return slots


def _add(total: dict, more: dict):
    for p, g in more.items():
        total[p] += g
