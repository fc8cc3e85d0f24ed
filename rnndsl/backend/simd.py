"""SIMD vectors in Numba for the CPU kernels: LLVM vector values kept in registers, and the
row reductions built on them.

Neither Numba nor LLVM's vectorisers keep a loop's accumulators in vector registers unless
they may reorder its floating-point additions (fastmath `reassoc`), and the vector kernels
do not allow that: LLVM would reassociate each kernel its own way, so forward with and
without the tape would stop giving bit-identical results. The kernels' sums and maxima over
a row (`row_sum`, `row_max`) are written here with explicit vector partial results instead:
an order fixed by this code, the same in every kernel that calls it, and a fused loop
without a reduction in it, which LLVM vectorises.
"""
from __future__ import annotations

import numpy as np
from llvmlite import binding as llvm_binding
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils, config
from numba.extending import intrinsic, models, register_model


def _vector_bits() -> int:
    """The width of the vectors Numba's target machine has (its features, as Numba sees them)."""
    features = config.CPU_FEATURES
    if features is None:
        features = llvm_binding.get_host_cpu_features().flatten()
    on = {f[1:] for f in features.split(",") if f.startswith("+")}
    return 512 if "avx512f" in on else 256 if "avx" in on else 128


VECTOR_BITS = _vector_bits()


def lanes(dtype) -> int:
    return VECTOR_BITS // (8 * np.dtype(dtype).itemsize)


class Vector(types.Type):
    """An LLVM vector of VECTOR_BITS of one float dtype, a value kept in a register."""

    def __init__(self, dtype):
        self.dtype = dtype
        self.lanes = VECTOR_BITS // dtype.bitwidth
        super().__init__(name=f"vector{self.lanes}x{dtype}")


@register_model(Vector)
class _VectorModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        element = ir.FloatType() if fe_type.dtype == types.float32 else ir.DoubleType()
        super().__init__(dmm, fe_type, ir.VectorType(element, fe_type.lanes))


def _element_pointer(context, builder, array_type, array, index, vector_type):
    data = context.make_array(array_type)(context, builder, array).data
    return builder.bitcast(builder.gep(data, [index]), vector_type.as_pointer())


@intrinsic
def vload(typingctx, array, index):
    """The vector at array.flat[index:index + lanes] (a C-contiguous array)."""
    vector = Vector(array.dtype)

    def codegen(context, builder, sig, args):
        ty = context.get_value_type(vector)
        ptr = _element_pointer(context, builder, sig.args[0], args[0], args[1], ty)
        return builder.load(ptr, align=array.dtype.bitwidth // 8)
    return vector(array, index), codegen


@intrinsic
def vstore(typingctx, array, index, value):
    def codegen(context, builder, sig, args):
        ptr = _element_pointer(context, builder, sig.args[0], args[0], args[1], args[2].type)
        builder.store(args[2], ptr, align=array.dtype.bitwidth // 8)
        return context.get_dummy_value()
    return types.none(array, index, value), codegen


@intrinsic
def vsplat(typingctx, x):
    """A vector of x in every lane."""
    vector = Vector(x)

    def codegen(context, builder, sig, args):
        ty = context.get_value_type(vector)
        one = builder.insert_element(ir.Constant(ty, ir.Undefined), args[0],
                                     ir.Constant(ir.IntType(32), 0))
        zeros = ir.Constant(ir.VectorType(ir.IntType(32), vector.lanes), [0] * vector.lanes)
        return builder.shuffle_vector(one, ir.Constant(ty, ir.Undefined), zeros)
    return vector(x), codegen


@intrinsic
def vfma(typingctx, a, b, c):
    """a * b + c, one rounding (llvm.fma)."""
    def codegen(context, builder, sig, args):
        ty = args[0].type
        bits = 32 if isinstance(ty.element, ir.FloatType) else 64
        fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ty, [ty] * 3),
                                             f"llvm.fma.v{ty.count}f{bits}")
        return builder.call(fma, args)
    return a(a, b, c), codegen


@intrinsic
def vadd(typingctx, a, b):
    def codegen(context, builder, sig, args):
        return builder.fadd(args[0], args[1])
    return a(a, b), codegen


def _max(builder, a, b):
    """The kernels' `maximum` lane by lane: a if a > b or a is NaN, else b (so a NaN on
    either side wins, as in NumPy)."""
    keep = builder.or_(builder.fcmp_ordered(">", a, b), builder.fcmp_unordered("uno", a, a))
    return builder.select(keep, a, b)


@intrinsic
def vmax(typingctx, a, b):
    def codegen(context, builder, sig, args):
        return _max(builder, *args)
    return a(a, b), codegen


def _across(combine):
    """An intrinsic folding a vector's lanes into one by `combine`, as a tree: lane i with
    lane i + half, halving until one is left (a fixed order)."""
    @intrinsic
    def fold(typingctx, v):
        def codegen(context, builder, sig, args):
            value, count = args[0], v.lanes
            undef = ir.Constant(value.type, ir.Undefined)
            while count > 1:
                count //= 2
                mask = [i + count if i < count else i for i in range(v.lanes)]
                upper = builder.shuffle_vector(
                    value, undef, ir.Constant(ir.VectorType(ir.IntType(32), v.lanes), mask))
                value = combine(builder, value, upper)
            return builder.extract_element(value, ir.Constant(ir.IntType(32), 0))
        return v.dtype(v), codegen
    return fold


vsum_lanes = _across(lambda builder, a, b: builder.fadd(a, b))
vmax_lanes = _across(_max)


# -- row reductions ---------------------------------------------------------------------------
@njit(cache=True)
def _add(a, b):
    return a + b


@njit(cache=True)
def _maximum(a, b):
    return a if (a > b or a != a) else b


def _row_reduction(combine, fold, combine_one):
    """A reduction of a[start:start + n] (a C-contiguous 1-D array: the vector kernels' row
    buffer) from `first`: four vector partial results over blocks of four vectors, then one
    vector at a time, folded across lanes, then the last elements one by one. Not cached:
    Numba keys a closure's cache by its pickled cells, which differ in every process (a
    kernel that calls it is cached with it linked in)."""
    @njit(error_model="numpy", boundscheck=False)
    def reduce(a, start, n, first):
        width = VECTOR_BITS // (8 * a.itemsize)
        p0 = p1 = p2 = p3 = vsplat(first)
        j, stop = start, start + n
        while j + 4 * width <= stop:
            p0 = combine(p0, vload(a, j))
            p1 = combine(p1, vload(a, j + width))
            p2 = combine(p2, vload(a, j + 2 * width))
            p3 = combine(p3, vload(a, j + 3 * width))
            j += 4 * width
        while j + width <= stop:
            p0 = combine(p0, vload(a, j))
            j += width
        out = fold(combine(combine(p0, p1), combine(p2, p3)))
        while j < stop:
            out = combine_one(out, a[j])
            j += 1
        return out
    return reduce


row_sum = _row_reduction(vadd, vsum_lanes, _add)  # row_sum(row, start, n, C0)
row_max = _row_reduction(vmax, vmax_lanes, _maximum)  # row_max(row, start, n, CNEG)
