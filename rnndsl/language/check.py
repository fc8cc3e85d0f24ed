"""Stage 3, check: resolve every name, order the equations, infer every shape.

Works on the AST, where each node still knows its place in the file, so each problem gets one
clear `SpecError` pointing at the offending text. The result, `Checked`, is what `lower`
turns into step IR; after this stage nothing the user wrote can fail.

Name rules. `s_prev` is the previous value of state `s`; a bare state name is its new value.
A name that is not an input, a state, an equation's target, a declared parameter or a
function is a parameter inferred from its use: a matrix where it stands left of `@`, a vector
elsewhere (declare a scalar with `shape: []`). A name within typing distance of a known
variable is reported as unknown instead, with a suggestion, since it is far more likely a typo.
A name in `constants:` is that number.

Parameters cut into blocks (see ParamLayout); the kernels only ever see the blocks:
* `W @ [h_prev, x]`: W has a column block per part, and the product runs as the split form
  `W[:, :hidden] @ h_prev + W[:, hidden:] @ x`, so its kernels are exactly those of a spec
  written with two matrices. A concatenation stands only right of `@`: elsewhere it would be
  a vector whose size is a sum, which no kernel has. A scalar part is one column.
* `[i, f, g, o] = W @ x + b`: the parameters on the right are cut into row parts, one per
  name, and everything elementwise is done part by part.
* A size that is a number (`shape: [3, hidden]`): such a vector is that many per-row scalars,
  so `s[0]`, `softmax(s)`, `U @ s` are plain scalar arithmetic in the kernels.

Matrix values (a state `M: [key, value]`, `outer(a, b)`, ...) follow the rules of
check_matrix.py.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from rnndsl.language.children import PREV, SUM_K, misuse, sum_k_misuse
from rnndsl.language.check_matrix import MatrixRules
from rnndsl.language.errors import SourcePos, SpecError, suggest
from rnndsl.symbolic.ops import user_functions
from rnndsl.language.parse import (Assign, Binary, Call, Concat, Index, Name, Neg, Num,
                                   Transpose, parse_equations)
from rnndsl.language.spec import SUM, ParamDecl, Spec, state_shape

# user-facing name -> {number of arguments: (op, kind)}, from the operators' records
FUNCTIONS: dict[str, dict[int, tuple[str, str]]] = user_functions()


RANKS = ("scalar", "vector", "matrix")  # a Shape's kind by its number of sizes


@dataclass
class Shape:
    """A scalar, a vector of a size variable, or a matrix of two size variables."""

    kind: str  # "scalar" | "vector" | "matrix"
    dims: tuple[int, ...] = ()  # size variables (see Sizes)


@dataclass
class Sizes:
    """Union-find over size variables, each root optionally bound to a declared size name."""

    parent: list[int] = field(default_factory=list)
    bound: dict[int, str] = field(default_factory=dict)

    def fresh(self, name: str | None = None) -> int:
        self.parent.append(len(self.parent))
        if name is not None:
            self.bound[len(self.parent) - 1] = name
        return len(self.parent) - 1

    def find(self, v: int) -> int:
        while self.parent[v] != v:
            self.parent[v] = self.parent[self.parent[v]]
            v = self.parent[v]
        return v

    def name(self, v: int) -> str | None:
        return self.bound.get(self.find(v))

    def unify(self, a: int, b: int) -> bool:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return True
        na, nb = self.bound.get(ra), self.bound.get(rb)
        if na is not None and nb is not None and na != nb:
            return False
        self.parent[rb] = ra
        if na is None and nb is not None:
            self.bound[ra] = nb
        return True


@dataclass(frozen=True)
class ParamInfo:
    name: str
    shape: tuple[str, ...]
    init: str
    value: float
    declared: bool
    pos: SourcePos  # declaration, or first use when inferred
    blocks: int = 1  # > 1: a square matrix with that many blocks on its diagonal, zeros elsewhere


@dataclass(frozen=True)
class Cut:
    """How the kernels take one parameter: its rows and its columns cut into parts (their
    sizes; '1' is a single row or column, which the block drops; () uncut), one kernel
    parameter per block, row part by row part."""

    rows: tuple[str, ...]
    cols: tuple[str, ...]
    names: tuple[str, ...]


@dataclass(frozen=True)
class ParamLayout:
    """The parameters as the user declares, initialises and trains them, and the blocks the
    kernels take instead: `W` of shape (hidden, hidden + input) that multiplies [h_prev, x]
    becomes `W[:, :hidden]` and `W[:, hidden:]`. Block names contain '[', which no name in a
    spec can."""

    params: dict[str, ParamInfo]  # in order of first use
    cuts: dict[str, Cut]  # the parameters the kernels take in blocks


@dataclass(frozen=True)
class Checked:
    spec: Spec
    order: tuple[Assign, ...]  # equations, each after what it uses
    params: dict[str, ParamInfo]  # what the kernels take: cut parameters as their blocks
    locals: dict[str, tuple[str, ...]]  # intermediate values and their shapes
    layout: ParamLayout


def check(spec: Spec) -> Checked:
    return check_assigns(spec, [a for eq in spec.equations for a in parse_equations(eq)])


def check_assigns(spec: Spec, assigns: list[Assign]) -> Checked:
    """Check parsed equations under a spec's declarations (a tree cell's steps are checked so,
    language/tree.py)."""
    return _Checker(spec, assigns).run()


def subexpressions(expr) -> tuple:
    """The expressions directly inside `expr`."""
    return (expr.left, expr.right) if isinstance(expr, Binary) else \
        (expr.operand,) if isinstance(expr, (Neg, Index, Transpose)) else \
        _values(expr) if isinstance(expr, Call) else \
        expr.items if isinstance(expr, Concat) else ()


def walk(expr):
    """`expr` and every expression inside it, depth first."""
    yield expr
    for child in subexpressions(expr):
        yield from walk(child)


def _values(call: Call) -> tuple:
    """A call's arguments that are values: not the axis of sum(M, axis), a size name."""
    if FUNCTIONS.get(call.func, {}).get(len(call.args), ("", ""))[1] == "axis":
        return call.args[:1]
    return call.args


class _Checker(MatrixRules):
    def __init__(self, spec: Spec, assigns: list[Assign]):
        self.spec = spec
        self.assigns = assigns
        self.sizes = Sizes()
        self.types: dict[str, Shape] = {}  # defined values and parameters
        self.param_pos: dict[str, SourcePos] = {}
        self.defs: dict[str, Assign] = {}
        # matrix -> (size variables of its column blocks, first product with a concatenation)
        self.blocks: dict[str, tuple[list[int], SourcePos]] = {}
        self.plain: dict[str, SourcePos] = {}  # matrix -> first product with a plain vector
        # parameter -> (size variables of its row parts, first `[a, b] = ...` that cuts it)
        self.row_parts: dict[str, tuple[list[int], SourcePos]] = {}
        self.whole: dict[str, SourcePos] = {}  # parameter -> first use of all its rows
        self.splits: dict[int, list[Shape]] = {}  # `[a, b] = e`: id(e) -> the parts' shapes
        self.indexes: list[tuple[int, Index]] = []  # (size variable, v[k]) checked at the end
        self.matrix_uses_to_check()

    def run(self) -> Checked:
        spec = self.spec
        if not self.assigns:
            raise SpecError("no equations: write one 'name = expression' per line",
                            spec.equations[0].origin.pos(1, 1))
        self.constants()
        self.defs = defs = self.definitions()
        order = self.order(defs)
        for a in order:
            self.assign(a)
        for var, e in self.indexes:
            self.index_in_range(var, e)
        self.check_matrix_uses()
        for s, size in spec.states.items():
            if s not in defs:
                raise SpecError(f"state '{s}' is never assigned; add an equation '{s} = ...'",
                                spec.where(f"states.{s}"))
        for o in spec.outputs:
            if o not in defs:
                kind = "an input, not a value the cell computes" if o in spec.inputs else \
                    f"not defined by any equation{suggest(o, defs)}"
                raise SpecError(f"output '{o}' is {kind}", spec.where(f"outputs.{o}"))
        for name, decl in spec.params.items():
            if name not in self.types:
                raise SpecError(f"parameter '{name}' is declared but not used in any equation",
                                decl.pos)
        if not spec.inputs:  # the input sequence is what gives a run its length
            raise SpecError("a cell needs at least one input, e.g. 'inputs: {x: input}': the "
                            "input sequence sets how many steps a run takes",
                            spec.where(f"states.{next(iter(spec.states))}"))
        layout, kernel_params = self.param_infos()
        local = {n: self.concrete(self.types[n], n, defs[n].pos)
                 for n in defs if n not in spec.states}
        for o in spec.outputs:
            shape = local.get(o, ())  # a per-row scalar output has the shape ()
            if shape and shape[0].isdigit():
                raise SpecError(f"output '{o}' has the size {local[o][0]}, a number; an "
                                "output's size is one of the spec's sizes",
                                spec.where(f"outputs.{o}"))
        return Checked(spec, tuple(order), kernel_params, local, layout)

    # -- names ----------------------------------------------------------------------------
    def constants(self):
        """A constant may not take the name of anything else the spec or the language names."""
        spec = self.spec
        for n, c in spec.constants.items():
            clash = "an input" if n in spec.inputs else "a state" if n in spec.states else \
                "a size" if n in spec.sizes else "a parameter" if n in spec.params else \
                "a function" if n in FUNCTIONS else \
                "a state's previous value" if n.endswith(PREV) and n[:-len(PREV)] in spec.states \
                else None
            if clash:
                raise SpecError(f"constant '{n}' has the name of {clash}; rename one of them",
                                c.pos)
    def definitions(self) -> dict[str, Assign]:
        spec, defs = self.spec, {}
        for a in self.assigns:
            t = a.target
            if t in defs:
                first = defs[t].pos
                raise SpecError(f"'{t}' is defined twice (first at line {first.line}); "
                                "each name gets one equation per step", a.pos)
            if t in spec.inputs:
                raise SpecError(f"'{t}' is an input and cannot be assigned", a.pos)
            if t in spec.params:
                raise SpecError(f"'{t}' is a declared parameter and cannot be assigned", a.pos)
            if t in spec.constants:
                raise SpecError(f"'{t}' is a constant and cannot be assigned (set it with "
                                f"'--set {t}=VALUE' or compile(..., constants={{...}}))", a.pos)
            if t in FUNCTIONS:
                raise SpecError(f"'{t}' is a function name and cannot be assigned", a.pos)
            if t.endswith(PREV):
                raise SpecError(f"'{t}' cannot be assigned: a state's previous value is given; "
                                f"assign '{t[:-len(PREV)]}' instead", a.pos)
            if t in spec.sizes:
                raise SpecError(f"'{t}' is a size name and cannot be assigned", a.pos)
            defs[t] = a
        return defs

    def classify(self, name: Name, defs) -> tuple[str, str]:
        """('input'|'prev'|'value'|'const'|'size'|'param', base name) for a name in an
        expression."""
        spec, n = self.spec, name.id
        if n in spec.inputs:
            return "input", n
        if n in spec.constants:
            return "const", n
        if n in defs:
            return "value", n
        if n in spec.params:
            return "param", n
        wrong_child = misuse(spec, n)
        if wrong_child:
            raise SpecError(wrong_child, name.pos)
        if n.endswith(PREV):
            base = n[:-len(PREV)]
            if base in spec.states and spec.structure == "sequence":
                return "prev", base
            if base in spec.inputs or base in defs:
                raise SpecError(f"'{n}': '{base}' is not a state, so it has no previous value "
                                f"(states: {', '.join(spec.states)})", name.pos)
            raise SpecError(f"unknown name '{n}'{suggest(n, self.known(defs))}", name.pos)
        if n in spec.states:
            raise SpecError(f"state '{n}' is never assigned; use '{n}{PREV}' for its previous "
                            "value", name.pos)
        if n in FUNCTIONS:
            raise SpecError(f"'{n}' is a function; call it as {n}(...)", name.pos)
        if n in spec.sizes:  # its number, the same for every sequence (1 / sqrt(key))
            return "size", n
        # A parameter named after the value it feeds (W_gate, b_gate for gate) is normal
        # practice, not a typo: no suggestion when the part after the prefix is known.
        prefix, _, rest = n.partition("_")
        named_after = bool(prefix) and rest in self.known(defs)
        hint = "" if named_after else suggest(n, self.known(defs), cutoff=0.75)
        if hint:
            raise SpecError(f"unknown name '{n}'{hint}", name.pos)
        return "param", n

    def known(self, defs) -> list[str]:
        spec = self.spec
        return [*spec.inputs, *defs, *(s + PREV for s in spec.states), *spec.constants]

    def order(self, defs: dict[str, Assign]) -> list[Assign]:
        """Equations sorted so each comes after the values it uses; a cycle is an error."""
        deps = {}
        for t, a in defs.items():
            used = []
            for e in walk(a.expr):
                if isinstance(e, Name):
                    kind, base = self.classify(e, defs)
                    if kind == "value":
                        used.append((base, e.pos))
                elif isinstance(e, Call):
                    self.function(e)
            deps[t] = used
        done: list[Assign] = []
        state: dict[str, int] = {}  # 1 visiting, 2 done

        # Depth-first, with an explicit stack so that long chains of equations cannot
        # exhaust Python's recursion limit. A frame is (name, index of its next dependency).
        for root in defs:
            if state.get(root) == 2:
                continue
            state[root] = 1
            stack: list[list] = [[root, 0]]
            while stack:
                frame = stack[-1]
                t, k = frame
                if k == len(deps[t]):
                    state[t] = 2
                    done.append(defs[t])
                    stack.pop()
                    continue
                frame[1] += 1
                dep, dpos = deps[t][k]
                if state.get(dep) == 2:
                    continue
                if state.get(dep) == 1:
                    path = [f[0] for f in stack]
                    cycle = path[path.index(dep):] + [dep]
                    hint = ""
                    if dep in self.spec.states:
                        hint = f"; use '{dep}{PREV}' for the previous step's value"
                    raise SpecError(f"'{dep}' depends on itself within one step "
                                    f"({' -> '.join(cycle)}){hint}", dpos)
                state[dep] = 1
                stack.append([dep, 0])
        return done

    def function(self, call: Call) -> tuple[str, str]:
        forms = FUNCTIONS.get(call.func)
        if call.func == SUM_K:
            raise SpecError(sum_k_misuse(self.spec), call.pos)
        if forms is None:
            raise SpecError(f"unknown function '{call.func}'{suggest(call.func, FUNCTIONS)}; "
                            f"known: {', '.join(sorted(FUNCTIONS))}", call.pos)
        n = len(call.args)
        if n not in forms:
            want = " or ".join(str(k) for k in sorted(forms))
            noun = "argument" if want == "1" else "arguments"
            raise SpecError(f"'{call.func}' takes {want} {noun}, got {n}", call.pos)
        return forms[n]

    # -- shapes ---------------------------------------------------------------------------
    def assign(self, a: Assign):
        if a.part is None:
            t = self.infer(a.expr)
        else:  # one of `[a, b, ...] = expr`: all parts are inferred with the first
            k, n = a.part
            if id(a.expr) not in self.splits:
                self.splits[id(a.expr)] = self.infer_split(a.expr, n)
            t = self.splits[id(a.expr)][k]
        if a.target in self.spec.states:
            shape = state_shape(self.spec.states[a.target])
            want = Shape(RANKS[len(shape)], tuple(self.sizes.fresh(d) for d in shape))
            if t.kind != "scalar" and (len(t.dims) != len(shape) or
                                       not all(map(self.sizes.unify, want.dims, t.dims))):
                declared = "one number per sequence ([])" if not shape else \
                    f"size ({shape[0]},)" if len(shape) == 1 else f"shape ({', '.join(shape)})"
                raise SpecError(f"shape mismatch: state '{a.target}' has {declared} but the "
                                f"right side has {self.describe(t)}", a.pos)
            t = want
        self.types[a.target] = t

    def infer(self, e) -> Shape:
        if isinstance(e, Num):
            return Shape("scalar")
        if isinstance(e, Name):
            return self.name_type(e)
        if isinstance(e, Concat):
            raise SpecError("a concatenation [...] can only be the vector of a product, as in "
                            "W @ [h_prev, x]", e.pos)
        if isinstance(e, Transpose):
            raise SpecError("'.T' is written only left of '@', as in M.T @ q", e.pos)
        if isinstance(e, Index):
            t = self.infer(e.operand)
            self.not_matrix(t, e.operand)
            if t.kind != "vector":
                raise SpecError(f"only a vector can be indexed; this is {self.describe(t)}",
                                e.pos)
            self.indexes.append((t.dims[0], e))
            return Shape("scalar")
        if isinstance(e, Neg):
            t = self.infer(e.operand)
            self.not_matrix(t, e.operand)
            return t
        if isinstance(e, Call):
            op, kind = self.function(e)
            ts = [self.infer(arg) for arg in _values(e)]
            for t, arg in zip(ts, e.args):
                self.not_matrix(t, arg)
            if kind == "map":
                return self.join_all(ts, e.pos, f"'{e.func}'")
            if kind in ("matrix", "axis"):
                return self.matrix_call(e, op, kind, ts)
            if kind == "shift":
                return self.shift_call(e, ts)
            if ts[0].kind == "matrix":
                raise self.whole_matrix(e)
            if ts[0].kind != "vector":
                raise SpecError(f"'{e.func}' of one argument works along a vector's features; "
                                f"its argument is a scalar", e.args[0].pos)
            return Shape("scalar") if kind == "reduce" else ts[0]
        assert isinstance(e, Binary)
        if e.op == "@":
            weight = isinstance(e.left, Name) and self.classify(e.left, self.defs)[0] == "param"
            return self.matvec(e) if weight else self.value_product(e)
        left, right = self.infer(e.left), self.infer(e.right)
        self.not_matrix(left, e.left)
        self.not_matrix(right, e.right)
        return self.join(left, right, e.pos, f"'{e.op}'")

    def matvec(self, e: Binary) -> Shape:
        w = self.matrix(e)
        self.use_whole(e.left)
        self.columns(e, w)
        return Shape("vector", (w.dims[0],))

    def matrix(self, e: Binary) -> Shape:
        if not (isinstance(e.left, Name) and self.classify(e.left, self.defs)[0] == "param"):
            raise SpecError("the left side of '@' must be a weight matrix (a parameter name)",
                            e.left.pos)
        return self.param_type(e.left, "matrix")

    def columns(self, e: Binary, w: Shape):
        """The vector of W @ v against W's columns (a block per part when v is [a, b])."""
        right = e.right
        if isinstance(right, Concat) and len(right.items) == 1:  # W @ [x] is W @ x
            right = right.items[0]
        if isinstance(right, Concat):
            return self.matvec_concat(e.left, right, e.pos)
        n = e.left.id
        if n in self.blocks:
            raise SpecError(f"'{n}' multiplies a concatenation at {_at(self.blocks[n][1])}; "
                            "it must multiply one here too, of the same sizes", e.pos)
        decl = self.spec.params.get(n)
        if decl is not None and decl.shape and SUM in decl.shape[-1]:
            raise SpecError(f"'{n}' is declared with columns ({decl.shape[-1]}): it multiplies "
                            "a concatenation of vectors of those sizes, as in "
                            f"{n} @ [a, b]", e.pos)
        self.plain.setdefault(n, e.pos)
        v = self.infer(right)
        if v.kind != "vector":
            raise SpecError(f"the right side of '@' must be a vector; it is {self.describe(v)}",
                            right.pos)
        if not self.sizes.unify(w.dims[1], v.dims[0]):
            raise SpecError(f"shape mismatch at '@': '{n}' has "
                            f"{self.describe(w)} but the vector has {self.describe(v)}", e.pos)

    def matvec_concat(self, matrix: Name, cat: Concat, pos: SourcePos):
        """W @ [a, b, ...]: W gets one column block per part, the same in every product."""
        n, parts = matrix.id, []
        for item in cat.items:
            t = self.infer(item)
            if t.kind == "matrix":
                raise SpecError("cannot concatenate a matrix: the parts of [...] are vectors "
                                "and scalars", item.pos)
            parts.append(t.dims[0] if t.kind == "vector" else self.sizes.fresh("1"))
        if n in self.plain:
            raise SpecError(f"'{n}' multiplies a plain vector at {_at(self.plain[n])}; it "
                            "cannot also multiply a concatenation", pos)
        if n not in self.blocks:
            decl = self.spec.params.get(n)
            declared = decl.shape[1].split(SUM) if decl and decl.shape else None
            if declared is not None and len(declared) != len(parts):
                raise SpecError(f"shape mismatch at '@': '{n}' is declared with columns "
                                f"({decl.shape[1]}) but multiplies {len(parts)} joined "
                                f"vectors {self.describe_blocks(parts)}", pos)
            self.blocks[n] = ([self.sizes.fresh(s) for s in declared] if declared else
                              [self.sizes.fresh() for _ in parts], pos)
        blocks, first = self.blocks[n]
        if len(blocks) != len(parts) or not all(map(self.sizes.unify, blocks, parts)):
            where = "here" if first is pos else f"and at {_at(first)}"
            raise SpecError(f"shape mismatch at '@': '{n}' has columns "
                            f"{self.describe_blocks(blocks)} but multiplies "
                            f"{self.describe_blocks(parts)} {where}", pos)

    def infer_split(self, e, n: int) -> list[Shape]:
        """The shapes of the n parts of `e` in `[a, b, ...] = e`: parameters are cut into row
        parts (a product by its matrix's rows) and elementwise work is done part by part."""
        if isinstance(e, Num):
            return [Shape("scalar")] * n
        if isinstance(e, Neg):
            return self.infer_split(e.operand, n)
        if isinstance(e, Binary) and e.op == "@":
            self.columns(e, self.matrix(e))
            return [Shape("vector", (v,)) for v in self.row_split(e.left, n)]
        if isinstance(e, Binary):
            pairs = zip(self.infer_split(e.left, n), self.infer_split(e.right, n))
            return [self.join(a, b, e.pos, f"'{e.op}'") for a, b in pairs]
        if isinstance(e, Call) and self.function(e)[1] == "map":
            parts = [self.infer_split(arg, n) for arg in e.args]
            return [self.join_all(p, e.pos, f"'{e.func}'") for p in zip(*parts)]
        if isinstance(e, Name):
            kind, base = self.classify(e, self.defs)
            if kind == "param":
                t = self.param_type(e, "vector")
                if t.kind == "scalar":
                    return [t] * n
                return [Shape("vector", (v,)) for v in self.row_split(e, n)]
            if kind in ("const", "size") or \
                    (kind == "value" and self.types[base].kind == "scalar"):
                return [Shape("scalar")] * n
        what = f"'{e.id}'" if isinstance(e, Name) else f"'{e.func}(...)'" \
            if isinstance(e, Call) else "this"
        raise SpecError(f"cannot cut {what} into {n} parts: only parameters, products W @ v and "
                        "elementwise functions of them are cut, as in [i, f] = W @ x + b", e.pos)

    def row_split(self, name: Name, n: int) -> list[int]:
        """Size variables of a parameter's n row parts, the same wherever it is cut."""
        p = name.id
        if p in self.whole:
            raise SpecError(f"'{p}' is used whole at {_at(self.whole[p])}; it cannot also be "
                            "cut into parts", name.pos)
        if p not in self.row_parts:
            decl = self.spec.params.get(p)
            declared = decl.shape[0].split(SUM) if decl and decl.shape else None
            if declared is not None and len(declared) != n:
                raise SpecError(f"'{p}' is declared with rows ({decl.shape[0]}) but is cut into "
                                f"{n} parts here", name.pos)
            self.row_parts[p] = ([self.sizes.fresh(s) for s in declared] if declared else
                                 [self.sizes.fresh() for _ in range(n)], name.pos)
        parts, first = self.row_parts[p]
        if len(parts) != n:
            raise SpecError(f"'{p}' is cut into {len(parts)} parts at {_at(first)}; here into "
                            f"{n}", name.pos)
        return parts

    def use_whole(self, name: Name):
        p = name.id
        if p in self.row_parts:
            raise SpecError(f"'{p}' is cut into parts at {_at(self.row_parts[p][1])}; it cannot "
                            "also be used whole", name.pos)
        decl = self.spec.params.get(p)
        if decl is not None and decl.shape and SUM in decl.shape[0]:
            raise SpecError(f"'{p}' is declared with rows ({decl.shape[0]}): cut it into parts, "
                            f"as in [a, b] = {p} @ x", name.pos)
        self.whole.setdefault(p, name.pos)

    def index_in_range(self, var: int, e: Index):
        size = self.sizes.name(var)
        if size is None or not size.isdigit():
            has = f"size ({size},)" if size else "a size not known"
            what = e.operand.id if isinstance(e.operand, Name) else "v"
            raise SpecError(f"'{what}[{e.index}]' needs a vector whose size is a number, as in "
                            f"W: {{shape: [3, hidden]}}; this vector has {has}", e.pos)
        if e.index >= int(size):
            raise SpecError(f"index {e.index} is out of range for a vector of size {size} "
                            f"(0 to {int(size) - 1})", e.pos)

    def name_type(self, name: Name) -> Shape:
        kind, base = self.classify(name, self.defs)
        if kind == "input":
            return Shape("vector", (self.sizes.fresh(self.spec.inputs[base]),))
        if kind == "prev":
            dims = tuple(self.sizes.fresh(d) for d in state_shape(self.spec.states[base]))
            return Shape(RANKS[len(dims)], dims)
        if kind == "value":
            return self.types[base]
        if kind in ("const", "size"):
            return Shape("scalar")
        t = self.param_type(name, "vector")
        if t.kind != "matrix":
            self.use_whole(name)
        return t

    def param_type(self, name: Name, use: str) -> Shape:
        n = name.id
        if n not in self.types:
            decl = self.spec.params.get(n)
            self.param_pos[n] = decl.pos if decl else name.pos
            if decl is not None and decl.shape is not None:
                dims = tuple(self.sizes.fresh(s) for s in decl.shape)
                self.types[n] = Shape(RANKS[len(dims)], dims)
            else:
                k = 2 if use == "matrix" else 1
                self.types[n] = Shape(use, tuple(self.sizes.fresh() for _ in range(k)))
        t = self.types[n]
        if use == "matrix" and t.kind != "matrix":
            raise SpecError(f"'{n}' is used as a matrix here but is {self.describe(t)} "
                            f"elsewhere", name.pos)
        return t

    def join_all(self, ts, pos: SourcePos, where: str) -> Shape:
        joined = ts[0]
        for t in ts[1:]:
            joined = self.join(joined, t, pos, where)
        return joined

    def join(self, a: Shape, b: Shape, pos: SourcePos, where: str) -> Shape:
        if "matrix" in (a.kind, b.kind):
            return self.join_matrix(a, b, pos, where)
        if a.kind == "scalar":
            return b
        if b.kind == "scalar":
            return a
        if not self.sizes.unify(a.dims[0], b.dims[0]):
            hint = "; an exponent per sequence is a scalar, as in w ** gamma with gamma = " \
                "1 + softplus(sum(w_gamma * h) + b_gamma)" if where == "'**'" else ""
            raise SpecError(f"shape mismatch at {where}: {self.describe(a)} and "
                            f"{self.describe(b)}{hint}", pos)
        return a

    def not_matrix(self, t: Shape, e):
        """A weight matrix is used only as W @ v (a matrix value is used in any way)."""
        if t.kind == "matrix" and isinstance(e, Name) and \
                self.classify(e, self.defs)[0] == "param":
            raise SpecError(f"'{e.id}' is a matrix; use it as {e.id} @ vector", e.pos)

    def describe_blocks(self, dims) -> str:
        return f"({SUM.join(self.sizes.name(d) or '?' for d in dims)})"

    def describe(self, t: Shape) -> str:
        if t.kind == "scalar":
            return "a scalar"
        names = tuple(self.sizes.name(d) or "?" for d in t.dims)
        return f"shape ({', '.join(names)}{',' if len(names) == 1 else ''})"

    def concrete(self, t: Shape, name: str, pos: SourcePos) -> tuple[str, ...]:
        dims = tuple(self.sizes.name(d) for d in t.dims)
        if None in dims:
            so_far = ", ".join(d or "?" for d in dims) + ("," if len(dims) == 1 else "")
            if name in self.defs:  # an equation's value: its parameters carry the size
                hint = "declare the shape of a parameter it is computed from under 'params'"
            else:
                example = ", ".join(d or "SIZE" for d in dims)
                hint = f"declare it under 'params', e.g. {name}: {{shape: [{example}]}}"
            raise SpecError(f"cannot infer the size of '{name}' from its use (shape ({so_far}) "
                            f"so far); {hint}, with SIZE one of "
                            f"{', '.join(self.spec.sizes)}", pos)
        return dims

    def blocks_of(self, decl: ParamDecl, shape: tuple[str, ...], cut: bool) -> int:
        """The number of diagonal blocks of a parameter declared with `blocks:` (1 without)."""
        if not decl.blocks:
            return 1
        where = decl.blocks_pos
        if decl.blocks.isdigit():
            count = int(decl.blocks)
        elif decl.blocks in self.spec.constants:
            value = self.spec.constants[decl.blocks].value
            if value != int(value) or value < 1:
                raise SpecError(f"'blocks' of '{decl.name}' is the constant '{decl.blocks}' = "
                                f"{value:g}; a number of blocks is a whole number of at least 1",
                                where)
            count = int(value)
        else:
            raise SpecError(f"'blocks' of '{decl.name}' names '{decl.blocks}', which is not a "
                            f"constant{suggest(decl.blocks, self.spec.constants)}; write a "
                            "number or declare it under 'constants'", where)
        if len(shape) != 2 or shape[0] != shape[1] or SUM in shape[0] or shape[0].isdigit() or \
                cut:
            raise SpecError(f"'{decl.name}' has {count} blocks on its diagonal, so it is a "
                            "square matrix of one size used whole, as in R @ h_prev with R: "
                            f"{{shape: [hidden, hidden], blocks: {decl.blocks}}}; it is "
                            + ("cut into parts" if cut else
                               f"of shape ({', '.join(shape)}{',' if len(shape) == 1 else ''})"),
                            where)
        return count

    def param_infos(self) -> tuple[ParamLayout, dict[str, ParamInfo]]:
        """The parameters as the user sees them, and what the kernels take: the blocks of a
        parameter cut into row parts, column parts or single elements."""
        out, cuts, kernel = {}, {}, {}
        for n, pos in self.param_pos.items():
            decl: ParamDecl | None = self.spec.params.get(n)
            t = self.types[n]
            rows = self.row_parts[n][0] if n in self.row_parts else list(t.dims[:1])
            cols = self.blocks[n][0] if n in self.blocks else list(t.dims[1:])
            names = [[self.sizes.name(d) for d in part] for part in (rows, cols)[:len(t.dims)]]
            so_far = ", ".join(SUM.join(d or "?" for d in part) for part in names)
            if any(None in part for part in names):
                comma = "," if len(names) == 1 else ""
                raise SpecError(f"cannot infer the size of '{n}' from its use (shape "
                                f"({so_far}{comma}) so far); declare it under 'params', e.g. "
                                f"{n}: {{shape: [{so_far.replace('?', 'SIZE')}]}}, with SIZE "
                                f"one of {', '.join(self.spec.sizes)}", pos)
            if n in self.row_parts and any(d.isdigit() for d in names[0]):
                raise SpecError(f"'{n}' is cut into parts of sizes ({so_far.split(', ')[0]}); "
                                "a part's size must be one of the spec's sizes, not a number",
                                self.row_parts[n][1])
            shape = tuple(SUM.join(part) for part in names)
            if decl and decl.init == "orthogonal" and len(shape) != 2:
                raise SpecError(f"init 'orthogonal' needs a matrix; '{n}' has shape "
                                f"({', '.join(shape)}{',' if len(shape) == 1 else ''})", decl.pos)
            out[n] = info = ParamInfo(n, shape, decl.init if decl else "uniform",
                                      decl.value if decl else 0.0, decl is not None, pos,
                                      self.blocks_of(decl, shape, n in self.row_parts or
                                                     n in self.blocks) if decl else 1)
            row_cut = _cut(names[0]) if names else ()
            col_cut = _cut(names[1]) if len(names) == 2 else ()
            if not row_cut and not col_cut:
                kernel[n] = info
                continue
            block_names = []
            for i in range(len(row_cut) or 1):
                for j in range(len(col_cut) or 1) if len(shape) == 2 else [None]:
                    dims = [(row_cut[i] if row_cut else shape[0], _index(row_cut, i))]
                    if j is not None:
                        dims.append((col_cut[j] if col_cut else shape[1], _index(col_cut, j)))
                    name = f"{n}[{', '.join(index for _, index in dims)}]"
                    block_names.append(name)
                    kernel[name] = ParamInfo(name, tuple(d for d, _ in dims if d != "1"),
                                             info.init, info.value, info.declared, pos)
            cuts[n] = Cut(row_cut, col_cut, tuple(block_names))
        return ParamLayout(out, cuts), kernel


def _cut(parts: list[str]) -> tuple[str, ...]:
    """How the kernels cut a dimension of these parts: a part whose size is a number becomes
    that many single rows (or columns); () when the dimension stays whole."""
    if len(parts) == 1 and not parts[0].isdigit():
        return ()
    return tuple(d for size in parts for d in (("1",) * int(size) if size.isdigit() else (size,)))


def _index(cut: tuple[str, ...], k: int) -> str:
    """Part k of a cut dimension in NumPy's notation: ':' uncut, '2' one row, 'hidden:'."""
    if not cut:
        return ":"
    start = _offset(cut[:k])
    if cut[k] == "1":
        return start or "0"
    return f"{start}:{_offset(cut[:k + 1]) if k < len(cut) - 1 else ''}"


def _offset(sizes: tuple[str, ...]) -> str:
    """The sum of sizes, shortly: ('hidden', 'hidden', 'input', '1') -> '2*hidden+input+1'."""
    counts = Counter(s for s in sizes if not s.isdigit())
    ones = sum(int(s) for s in sizes if s.isdigit())
    return "+".join([f"{k}*{s}" if k > 1 else s for s, k in counts.items()] +
                    ([str(ones)] if ones else []))


def _at(pos: SourcePos) -> str:
    return f"line {pos.line}, column {pos.column}"
