"""Stage 5, grad: reverse mode over the step IR gives the backward step, again as step IR.

At step t the adjoints of the new states arrive (`d_h_next`: from step t+1's use of h_prev,
plus the loss's gradient where h is an output); the adjoints of the previous states leave
for step t-1; input adjoints and parameter gradient contributions are produced per step.
A matrix parameter's gradient is kept as outer-product terms (g, v), summed over batch rows
and time steps as one big GEMM by the kernels. Each op's derivative rule is in `ops.py`.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from rnndsl.language.spec import state_shape
from rnndsl.symbolic import ir, rank2
from rnndsl.symbolic.ir import Node, StepIR
from rnndsl.symbolic.ops import OPS


@dataclass(frozen=True)
class Backward:
    forward: StepIR
    seeds: dict[str, Node]  # adjoint arriving for each state and each non-state output
    d_prev: dict[str, Node]  # adjoint of each state's previous value
    d_inputs: dict[str, Node]
    d_params: dict[str, Node]  # vector and scalar parameters: this step's per-row term
    d_matrices: dict[str, tuple[tuple[Node, Node], ...]]  # W: terms (g, v), dW += g v^T
    adjoints: dict[int, Node]  # forward node uid -> its adjoint
    labels: dict[int, str]  # forward node uid -> the name its adjoint prints under

    def roots(self) -> list[Node]:
        out = [*self.d_prev.values(), *self.d_inputs.values(), *self.d_params.values()]
        for terms in self.d_matrices.values():
            for g, v in terms:
                out += [g, v]
        return out

    def equations(self, seeds: str = "d_{}_next", previous: bool = True) -> str:
        """The backward step as equations, in the order they are computed; an arriving
        adjoint of `s` prints as seeds.format(s), and `previous=False` leaves out the
        adjoints of previous states (a tree cell's steps have none)."""
        with ir.seeds_named(seeds):
            return _print(self, previous)


def grad(step: StepIR) -> Backward:
    seeds: dict[str, Node] = {}
    contribs: dict[int, list[Node]] = defaultdict(list)
    for s, size in step.states.items():
        seeds[s] = ir.leaf("adj", s, state_shape(size))
        contribs[step.values[s].uid].append(seeds[s])
    for o in step.outputs:
        if o not in step.states:
            seeds[o] = ir.leaf("adj", o, step.values[o].shape)
            contribs[step.values[o].uid].append(seeds[o])

    adjoints: dict[int, Node] = {}
    d_prev, d_inputs, d_params = {}, {}, {}
    d_matrices: dict[str, list] = defaultdict(list)
    for n in reversed(ir.topo_order(step.roots())):
        g = ir.add_all(contribs.pop(n.uid, []))
        if g.is_const(0.0):
            continue
        g = ir.bcast(g, n.shape)
        adjoints[n.uid] = g
        if n.op == "prev":
            d_prev[n.attr] = g
        elif n.op == "input":
            d_inputs[n.attr] = g
        elif n.op == "param":
            d_params[n.attr] = g
        elif n.op == "matvec":
            w, v = n.args
            d_matrices[w.attr].append((g, v))  # of a block-diagonal W, its diagonal blocks
            contribs[v.uid].append(ir.matvec_t(w, g, n.attr or 1))
        elif not n.is_leaf:
            for arg, c in zip(n.args, OPS[n.op].grad(n, g)):
                if c is None or c.is_const(0.0) or arg.op in ("const", "size"):
                    continue
                if arg.shape == () and c.shape != ():
                    c = rank2.total(c)  # a per-row scalar collects over the features
                contribs[arg.uid].append(c)
    zero = ir.const(0.0)
    for s in step.states:
        d_prev.setdefault(s, zero)
    for x in step.inputs:
        d_inputs.setdefault(x, zero)
    return Backward(step, seeds, d_prev, d_inputs, d_params,
                    {w: tuple(t) for w, t in d_matrices.items()}, adjoints, _labels(step))


def _labels(step: StepIR) -> dict[int, str]:
    """Names for forward nodes: equation targets, and `<target>_pre` / `<target>_<k>` for the
    unnamed nodes inside an equation (so the adjoint of sigmoid's argument is `d_i_pre`)."""
    labels = dict(step.names)
    for target, root in step.values.items():
        if labels.get(root.uid) != target:  # a leaf, or another equation's value renamed
            continue
        k, stack = 0, [root]
        while stack:
            n = stack.pop()
            for a in n.args:
                if a.uid in labels or a.is_leaf:
                    continue
                if n is root and len(n.args) == 1 and n.op not in ("neg", "bcast"):
                    labels[a.uid] = f"{target}_pre"
                else:
                    k += 1
                    labels[a.uid] = f"{target}_{k}"
                stack.append(a)
    return labels


def _print(b: Backward, previous: bool) -> str:
    fwd = b.forward
    roots = b.roots()
    uses: dict[int, int] = defaultdict(int)
    for n in ir.topo_order(roots):
        for a in n.args:
            uses[a.uid] += 1
    for r in roots:
        uses[r.uid] += 1
    names = dict(fwd.names)  # forward values print under their own names
    lines = []
    for n in reversed(ir.topo_order(fwd.roots())):
        g = b.adjoints.get(n.uid)
        if g is None or n.op in ("prev", "input", "param"):
            continue
        named = n.uid in fwd.names
        if not named and (uses[g.uid] < 2 or g.is_leaf or g.uid in names):
            continue
        label = f"d_{b.labels.get(n.uid, 't')}"
        if g.uid in names and not g.is_leaf:
            lines.append(f"{label} = {names[g.uid]}")
            continue
        text = ir.render(g, names)
        if text != label:  # (a tree step's arriving adjoint may print as its own name)
            lines.append(f"{label} = {text}")
        names[g.uid] = label
    for s, g in b.d_prev.items() if previous else ():
        lines.append(f"d_{s}_prev = {ir.render(g, names, False)}")
    for x, g in b.d_inputs.items():
        lines.append(f"d_{x} = {ir.render(g, names, False)}")
    for w, terms in b.d_matrices.items():
        outer = " + ".join(f"outer({ir.render(g, names, False)}, {ir.render(v, names, False)})"
                           for g, v in terms)
        blocks = fwd.params[w].blocks
        lines.append(f"d_{w} += {outer}" + (f" (its {blocks} diagonal blocks)" if blocks > 1
                                             else ""))
    for p, g in b.d_params.items():
        lines.append(f"d_{p} += {ir.render(g, names, False)}")
    return "\n".join(lines)
