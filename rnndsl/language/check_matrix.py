"""The checker's shape rules for values of rank 2 (a mixin of check._Checker).

A matrix value has two named sizes: a state declared `M: [key, value]`, `outer(a, b)` of
vectors of sizes a and b, and anything computed from those. The rules:
* `M @ v` needs v of M's column size and gives M's row size; `M.T @ u` the other way round.
  A parameter on the left of `@` is a weight matrix as before (`.T` of one is refused: declare
  the transposed shape instead, so that its gradient is the GEMM the schedule knows).
* elementwise between two matrices: the same sizes; with a scalar: every element; with a
  vector: the vector runs along the axis of its size, which must be exactly one of the two
  (checked once every size is known: a vector's size is often inferred further down).
* `sum(M, axis)`, `mean(M, axis)`, `norm(M, axis)`: over the named axis (a size name, or 0 /
  1 when both sizes are the same); the result is a vector of the other size. `softmax(M, axis)`
  normalises over the axis and keeps the matrix's shape.
* `outer(a, b)` takes two vectors.
* `shift(w, s)`, the NTM's circular shift, takes a weighting w over named slots and a shift
  distribution s whose size is an odd number (3: shifts -1, 0, +1), and gives w's shape. Both
  sizes are checked at the end: s's is usually that of a declared parameter further down.
"""
from __future__ import annotations

from rnndsl.language.errors import SpecError
from rnndsl.language.parse import Binary, Call, Name, Num, Transpose


class MatrixRules:
    """Methods of the checker for matrices; `self` is a check._Checker."""

    def matrix_uses_to_check(self):
        """What is decided once every size is known: a vector's size is often inferred further
        down than where it meets a matrix."""
        self.spreads: list[tuple] = []  # (a, b, pos, where): a vector with a matrix
        self.axes: list[tuple] = []  # (call, op, matrix, size variable of the result)
        # (size variable, pos): the vectors of outer(a, b), where every matrix that does not come
        # from a state gets its sizes
        self.matrix_operands: list[tuple] = []
        self.shifts: list[tuple] = []  # (w's size variable, s's, the call): shift(w, s)

    def check_matrix_uses(self):
        self.check_spreads()
        for w, s, e in self.shifts:
            self.check_shift(w, s, e)
        for var, pos in self.matrix_operands:
            size = self.sizes.name(var)
            if size is not None and size.isdigit():
                raise SpecError(f"a vector whose size is a number ({size},) is that many "
                                "separate values, not a side of a matrix; outer(a, b) takes "
                                "vectors of named sizes", pos)
        for e, op, m, result in self.axes:
            over = self.axis(e, m, final=True)
            if op != "axis_softmax" and not self.sizes.unify(result, m.dims[1 - over]):
                raise SpecError(f"shape mismatch at '{e.func}': over this axis of a "
                                f"{self.describe(m)} matrix it gives a vector of size "
                                f"({self.sizes.name(m.dims[1 - over])},), used as one of size "
                                f"({self.sizes.name(result)},)", e.pos)

    def value_product(self, e: Binary):
        """`M @ v` or `M.T @ v` for a matrix M computed in the step (not a parameter)."""
        from rnndsl.language.check import Shape

        left, transposed = (e.left.operand, True) if isinstance(e.left, Transpose) else \
            (e.left, False)
        if transposed and isinstance(left, Name) and \
                self.classify(left, self.defs)[0] == "param":
            raise SpecError(f"'{left.id}.T': a weight matrix is not transposed; declare "
                            f"'{left.id}' with its rows and columns swapped and write "
                            f"{left.id} @ v", e.left.pos)
        m = self.infer(left)
        if m.kind != "matrix":
            raise SpecError("the left side of '@' must be a weight matrix (a parameter name) or "
                            f"a matrix value; it is {self.describe(m)}", left.pos)
        v = self.infer(e.right)
        if v.kind != "vector":
            raise SpecError(f"the right side of '@' must be a vector; it is {self.describe(v)}",
                            e.right.pos)
        inner, outer_dim = (m.dims[0], m.dims[1]) if transposed else (m.dims[1], m.dims[0])
        if not self.sizes.unify(inner, v.dims[0]):
            what = "M.T @ v needs v of M's row size" if transposed else \
                "M @ v needs v of M's column size"
            raise SpecError(f"shape mismatch at '@': the matrix has {self.describe(m)} but the "
                            f"vector has {self.describe(v)} ({what})", e.pos)
        return Shape("vector", (outer_dim,))

    def matrix_call(self, e: Call, op: str, kind: str, ts: list):
        """outer(a, b); sum / mean / norm over a named axis of a matrix (a vector of the other
        size), and softmax over one (the matrix's shape)."""
        from rnndsl.language.check import Shape

        if kind == "matrix":
            for t, arg in zip(ts, e.args):
                if t.kind != "vector":
                    raise SpecError(f"'{e.func}' takes two vectors; this argument is "
                                    f"{self.describe(t)}", arg.pos)
                self.matrix_operands.append((t.dims[0], arg.pos))
            return Shape("matrix", (ts[0].dims[0], ts[1].dims[0]))
        m = ts[0]
        if m.kind != "matrix":
            raise SpecError(f"'{e.func}(x, axis)' reduces a matrix over one axis; this is "
                            f"{self.describe(m)}" + (f" (write {e.func}(x) for all of a "
                                                     "vector's features)" if m.kind == "vector"
                                                     else ""), e.args[0].pos)
        over = self.axis(e, m, final=False)
        if over is None:  # the axis's name is not known yet: decided at the end
            result = self.sizes.fresh()
            self.axes.append((e, op, m, result))
        else:
            result = m.dims[1 - over]
        return m if op == "axis_softmax" else Shape("vector", (result,))

    def shift_call(self, e: Call, ts: list):
        """shift(w, s): w shifted circularly over its slots by the distribution s."""
        from rnndsl.language.check import Shape

        for t, arg, what in zip(ts, e.args, ("a weighting over slots", "a shift distribution")):
            if t.kind != "vector":
                raise SpecError(f"shift(w, s) takes {what} here, a vector; this is "
                                f"{self.describe(t)}", arg.pos)
        self.shifts.append((ts[0].dims[0], ts[1].dims[0], e))
        return ts[0]

    def check_shift(self, w: int, s: int, e: Call):
        slots, shifts = self.sizes.name(w), self.sizes.name(s)
        if slots is None or slots.isdigit():
            raise SpecError(f"shift(w, s) rotates w over the memory's slots, a named size; "
                            f"this w has size ({slots or '?'},)", e.args[0].pos)
        example = "s = softmax(W_shift @ h) with W_shift: {shape: [3, hidden]}"
        if shifts is None or not shifts.isdigit():
            raise SpecError(f"the shift distribution of shift(w, s) has one weight per shift, "
                            f"so its size is a number (3: shifts -1, 0, +1), as in {example}; "
                            f"this one has size ({shifts or '?'},)", e.args[1].pos)
        if int(shifts) % 2 == 0:
            raise SpecError(f"the shift distribution of shift(w, s) has {shifts} weights; it "
                            "needs an odd number, centred on no shift (3: shifts -1, 0, +1; "
                            "5: -2 to +2)", e.args[1].pos)

    def whole_matrix(self, e: Call) -> SpecError:
        """`sum(M)`: the functions of a vector's features need an axis of a matrix."""
        from rnndsl.language.check import FUNCTIONS

        if any(kind == "axis" for _, kind in FUNCTIONS[e.func].values()):
            return SpecError(f"'{e.func}' of a matrix needs the axis it works over, as in "
                             f"{e.func}(M, axis) with the axis a size name", e.pos)
        return SpecError(f"'{e.func}' of a matrix is not supported; sum, mean, norm and softmax "
                         "work over one axis of a matrix, as in sum(M, axis)", e.pos)

    def axis(self, e: Call, m, final: bool) -> int | None:
        """The axis named by the second argument of sum / mean / norm / softmax of a matrix: 0
        or 1; None while a size of the matrix is not known (unless `final`)."""
        arg, names = e.args[1], [self.sizes.name(d) for d in m.dims]
        shown = self.describe(m)
        if isinstance(arg, Num) and arg.value in (0.0, 1.0):
            return int(arg.value)
        if isinstance(arg, Name) and None in names:
            if not final:
                return None
            raise SpecError(f"cannot tell which axis '{arg.id}' is: the sizes of this {shown} "
                            "matrix cannot be inferred; declare the shape of a parameter it is "
                            "computed from under 'params', or name the axis by number (0, 1)",
                            arg.pos)
        if isinstance(arg, Name) and arg.id in names:
            if names[0] == names[1]:
                raise SpecError(f"both axes of this {shown} matrix are '{arg.id}'; name the axis "
                                f"by number: 0 sums down the rows, 1 along each row",
                                arg.pos)
            return names.index(arg.id)
        has = " or ".join(f"'{n}'" for n in dict.fromkeys(n for n in names if n))
        known = f"{has} (or 0, 1)" if has else "0 or 1"
        what = f"'{arg.id}'" if isinstance(arg, Name) else "this"
        raise SpecError(f"{what} is not an axis of this {shown} matrix; its axes are {known}",
                        arg.pos)

    def join_matrix(self, a, b, pos, where: str):
        """Elementwise between a matrix and a matrix, a vector or a scalar."""
        if a.kind == "scalar":
            return b
        if b.kind == "scalar":
            return a
        if a.kind == "matrix" and b.kind == "matrix":
            if not all(map(self.sizes.unify, a.dims, b.dims)):
                raise SpecError(f"shape mismatch at {where}: {self.describe(a)} and "
                                f"{self.describe(b)}", pos)
            return a
        self.spreads.append((a, b, pos, where))
        return a if a.kind == "matrix" else b

    def check_spreads(self):
        """Each vector combined with a matrix runs along exactly one of its axes."""
        for a, b, pos, where in self.spreads:
            m, v = (a, b) if a.kind == "matrix" else (b, a)
            size = self.sizes.name(v.dims[0])
            names = [self.sizes.name(d) for d in m.dims]
            if size is None or None in names:
                raise SpecError(f"at {where}: a vector and a matrix combine along the axis of "
                                f"the vector's size, which cannot be inferred here "
                                f"({self.describe(v)}, {self.describe(m)}); declare the shape "
                                "of the parameter they come from", pos)
            if names.count(size) == 2:
                raise SpecError(f"at {where}: a vector of size ({size},) could run along either "
                                f"axis of this {self.describe(m)} matrix; write the matrix "
                                "you mean with outer(a, b)", pos)
            if size not in names:
                raise SpecError(f"shape mismatch at {where}: {self.describe(a)} and "
                                f"{self.describe(b)}; a vector combines with a matrix along "
                                "the axis of its size", pos)
