"""Stage 3 for tree cells: a spec with `structure: tree` becomes the steps the runtime runs.

A node's state is computed from its inputs and its children's states (Socher et al. 2011;
Tai, Socher & Manning 2015). The spec names a child's state after the state:
* `arity: 2`: `h_left`, `h_right` (`c_left`, ...); another fixed arity N: `h_child1` to
  `h_childN`. A node with fewer children reads zeros for the missing ones, as a leaf does.
  The node step is an ordinary step whose inputs include the children's states, so checking,
  the derivative and the kernels are those of every cell; the adjoints of those inputs are
  what flows from a node to its children.
* `arity: any`: `h_k` is the state of child k, and values computed from it are per child,
  named with `_k` (the child-sum Tree-LSTM's forget gate `f_k = sigmoid(W_f @ x + U_f @ h_k
  + b_f)`); `sum_k(...)` sums a per-child value over the children. Such a spec becomes two
  steps: the per-child step (one row per child: the node's inputs, the child's states, the
  per-child values and the terms summed) and the node step, which reads each sum as an input.
  A per-child value may use the node's inputs, the parameters, constants, the child's states
  and other per-child values, but no value the node step computes (that would need the node
  step to run in two halves around the children).

Everything is checked here with located errors; `check._Checker` does the rest on each step.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from rnndsl.language.check import Checked, check_assigns, subexpressions, walk
from rnndsl.language.children import (PER_CHILD, PREV, SUM_K, child_names, spelling,
                                      sum_k_misuse)
from rnndsl.language.errors import SourcePos, SpecError
from rnndsl.language.parse import (Assign, Binary, Call, Concat, Index, Name, Neg,
                                   parse_equations)
from rnndsl.language.spec import Spec


@dataclass(frozen=True)
class TreeChecked:
    """A tree spec as the steps the runtime runs, each an ordinary checked step."""

    spec: Spec
    node: Checked  # the node step: its inputs include the children's states, or their sums
    edge: Checked | None  # arity any: the per-child step; its states are the terms summed
    children: dict[str, tuple[str, int | None]]  # child-state input -> (state, slot)
    sums: dict[str, str]  # arity any: each sum_k(...) -> its size (edge state, node input)


def check_tree(spec: Spec) -> TreeChecked:
    assigns = [a for eq in spec.equations for a in parse_equations(eq)]
    if not assigns:
        raise SpecError("no equations: write one 'name = expression' per line",
                        spec.equations[0].origin.pos(1, 1))
    state_pos = spec.where(f"states.{next(iter(spec.states))}")
    if not spec.inputs:
        raise SpecError("a tree cell needs at least one input, e.g. 'inputs: {x: input}': "
                        "the leaves carry the inputs", state_pos)
    children = child_names(spec)
    for c in children:
        for kind in ("inputs", "params", "constants"):
            if spec.where(f"{kind}.{c}") is not None:
                raise SpecError(f"'{c}' names the state '{children[c][0]}' of a child; "
                                f"rename this {kind[:-1]}", spec.where(f"{kind}.{c}"))
    for a in assigns:
        if a.target in children:
            raise SpecError(f"'{a.target}' is the state '{children[a.target][0]}' of a child, "
                            f"given to each node; assign '{children[a.target][0]}' instead",
                            a.pos)
        for e in walk(a.expr):
            if isinstance(e, Name) and e.id.endswith(PREV) and e.id[:-len(PREV)] in spec.states:
                raise SpecError(f"'{e.id}': a tree cell has no previous step; a node reads its "
                                f"children's states, {spelling(spec)}", e.pos)
    _no_unused_params(spec, assigns)
    child_inputs = {c: spec.states[s] for c, (s, _) in children.items()}
    if spec.arity is not None:
        for a in assigns:
            for e in walk(a.expr):
                if isinstance(e, Call) and e.func == SUM_K:
                    raise SpecError(sum_k_misuse(spec), e.pos)
        node = _step(spec, {**spec.inputs, **child_inputs}, assigns)
        return TreeChecked(spec, node, None, children, {})
    return _Split(spec, assigns, children).run()


class _Split:
    """`arity: any`: the equations cut into the per-child step and the node step."""

    def __init__(self, spec: Spec, assigns: list[Assign], children):
        self.spec, self.assigns, self.children = spec, assigns, children

    def run(self) -> TreeChecked:
        spec, children = self.spec, self.children
        per_child = self.per_child_targets()
        edge_assigns, node_assigns = [], []
        sums: dict[str, tuple[object, SourcePos]] = {}  # name -> (the term, the sum_k call)
        for a in self.assigns:
            if a.target in per_child:
                self.check_per_child(a, per_child)
                edge_assigns.append(a)
                continue
            if a.target.endswith(PER_CHILD):
                raise SpecError(f"'{a.target}' ends in '{PER_CHILD}', which marks a value per "
                                "child, but uses no child's state; rename it", a.pos)
            calls = [e for e in walk(a.expr) if isinstance(e, Call) and e.func == SUM_K]
            names = {}
            for k, call in enumerate(calls):
                self.check_sum(call, per_child)
                whole = call is a.expr and a.target not in spec.states and \
                    a.target not in spec.outputs
                names[id(call)] = a.target if whole else \
                    self.fresh(f"{a.target}_sum{k + 1 if len(calls) > 1 else ''}")
                sums[names[id(call)]] = (call.args[0], call.pos)
            if names.get(id(a.expr)) == a.target:
                continue  # `h_tilde = sum_k(h_k)`: the node step reads h_tilde as an input
            node_assigns.append(dataclasses.replace(a, expr=_replace_calls(a.expr, names)))
        for o in spec.outputs:
            if o in per_child:
                raise SpecError(f"output '{o}' has one value per child; an output is a value "
                                f"per node (sum it with {SUM_K}(...))", spec.where(f"outputs.{o}"))
        if not sums:
            raise SpecError(f"with 'arity: any' the children are read through {SUM_K}(...), "
                            f"e.g. h_tilde = {SUM_K}(h_k); no equation uses it",
                            spec.where(f"states.{next(iter(spec.states))}"))
        child_inputs = {c: spec.states[s] for c, (s, _) in children.items()}
        edge_inputs = {**spec.inputs, **child_inputs}
        terms = [Assign(n, term, pos) for n, (term, pos) in sums.items()]
        # The terms' sizes come from checking the per-child step once with the terms as
        # plain values; then the terms become its states (one row per child, T = 1).
        first = _step(spec, edge_inputs, edge_assigns + terms, states={},
                      outputs=tuple(sums))
        sizes = {}
        for n, (_, pos) in sums.items():
            shape = first.locals[n]
            if len(shape) != 1 or shape[0].isdigit():
                raise SpecError(f"{SUM_K}(...) sums vectors of one of the spec's sizes; this "
                                f"term has the shape ({', '.join(shape)})", pos)
            sizes[n] = shape[0]
        edge = _step(spec, edge_inputs, edge_assigns + terms, states=sizes, outputs=tuple(sums))
        node = _step(spec, {**spec.inputs, **sizes}, node_assigns)
        _same_params(edge, node)
        return TreeChecked(spec, node, edge, children, sizes)

    def per_child_targets(self) -> set[str]:
        """Equations that use a child's state or a per-child value outside sum_k(...)."""
        per_child = set(self.children)
        changed = True
        while changed:
            changed = False
            for a in self.assigns:
                if a.target not in per_child and _uses(a.expr, per_child) is not None:
                    per_child.add(a.target)
                    changed = True
        return per_child - set(self.children)

    def check_per_child(self, a: Assign, per_child: set[str]):
        used = _uses(a.expr, set(self.children) | per_child)
        if not a.target.endswith(PER_CHILD):
            raise SpecError(f"'{a.target}' has one value per child (it uses '{used.id}'): name "
                            f"it '{a.target}{PER_CHILD}', or sum it over the children with "
                            f"{SUM_K}(...)", a.pos)
        node_values = {b.target for b in self.assigns} - per_child
        for e in walk(a.expr):
            if isinstance(e, Call) and e.func == SUM_K:
                raise SpecError(sum_k_misuse(self.spec), e.pos)
            if isinstance(e, Name) and e.id in node_values:
                raise SpecError(f"'{e.id}' is computed per node; a per-child value may use the "
                                "node's inputs, the parameters, constants, the child's states "
                                "and other per-child values", e.pos)

    def check_sum(self, call: Call, per_child: set[str]):
        if len(call.args) != 1:
            raise SpecError(f"'{SUM_K}' takes 1 argument, got {len(call.args)}", call.pos)
        inner = [e for e in walk(call.args[0]) if isinstance(e, Call) and e.func == SUM_K]
        if inner:
            raise SpecError(sum_k_misuse(self.spec), inner[0].pos)
        if _uses(call.args[0], set(self.children) | per_child) is None:
            raise SpecError(f"{SUM_K}(...) sums a value over the children, and this one does "
                            f"not depend on the child: use {spelling(self.spec)} or a "
                            f"per-child value", call.pos)

    def fresh(self, name: str) -> str:
        taken = {a.target for a in self.assigns} | set(self.spec.inputs) | \
            set(self.spec.states) | set(self.spec.params) | set(self.spec.constants) | \
            set(self.children)
        out, k = name, 1
        while out in taken:
            k += 1
            out = f"{name}_{k}"
        return out


def _step(spec: Spec, inputs: dict[str, str], assigns: list[Assign], states=None,
          outputs=None) -> Checked:
    """Check one step of a tree cell as an ordinary cell (it reads no previous state)."""
    used = {e.id for a in assigns for e in walk(a.expr) if isinstance(e, Name)}
    step_spec = dataclasses.replace(
        spec, inputs=inputs, states=spec.states if states is None else states,
        outputs=spec.outputs if outputs is None else outputs,
        params={p: d for p, d in spec.params.items() if p in used})
    return check_assigns(step_spec, assigns)


def _no_unused_params(spec: Spec, assigns: list[Assign]):
    used = {e.id for a in assigns for e in walk(a.expr) if isinstance(e, Name)}
    for name, decl in spec.params.items():
        if name not in used:
            raise SpecError(f"parameter '{name}' is declared but not used in any equation",
                            decl.pos)


def _same_params(edge: Checked, node: Checked):
    """A parameter used by both steps has one shape."""
    for p, info in node.layout.params.items():
        other = edge.layout.params.get(p)
        if other is not None and other.shape != info.shape:
            raise SpecError(f"'{p}' has the shape ({', '.join(other.shape)}) in a per-child "
                            f"value but ({', '.join(info.shape)}) in a per-node value",
                            info.pos)
        if other is not None and (p in node.layout.cuts or p in edge.layout.cuts):
            raise SpecError(f"'{p}' is cut into blocks; use it either per child or per node, "
                            "not both", info.pos)


def _uses(expr, names: set[str]) -> Name | None:
    """The first name of `names` in `expr` outside sum_k(...) calls."""
    stack = [expr]
    while stack:
        e = stack.pop()
        if isinstance(e, Name) and e.id in names:
            return e
        if isinstance(e, Call) and e.func == SUM_K:
            continue
        stack.extend(reversed(subexpressions(e)))
    return None


def _replace_calls(e, names: dict[int, str]):
    """`e` with each sum_k(...) call in `names` (by identity) replaced by that name."""
    if id(e) in names:
        return Name(names[id(e)], e.pos)
    if isinstance(e, Binary):
        return dataclasses.replace(e, left=_replace_calls(e.left, names),
                                   right=_replace_calls(e.right, names))
    if isinstance(e, (Neg, Index)):
        return dataclasses.replace(e, operand=_replace_calls(e.operand, names))
    if isinstance(e, Call):
        return dataclasses.replace(e, args=tuple(_replace_calls(a, names) for a in e.args))
    if isinstance(e, Concat):
        return dataclasses.replace(e, items=tuple(_replace_calls(a, names) for a in e.items))
    return e
