"""The CPU kernels' per-step recurrent product: weights packed once per pass, and a
register-blocked micro-kernel in explicit SIMD vectors.

A time loop multiplies the same weight matrix W (K, N) by a small block of rows h (B, K) at
every step. OpenBLAS re-packs W on every call and, above a size, splits the product over its
threads, which costs more than it gives at these sizes and collapses when the cores are busy.
Measured on this project's 2-core AVX-512 machine, float32, per step, the two alternated in
one process (medians of 21; load average 4-5, other jobs running): 16x128 @ 128x512 (LSTM S)
20 us against 231 us through `np.dot` (its best run 30 us; at load 1.8, 19 us against 35 us);
8x256 @ 256x1024 (LSTM L) 239 us against 2415 us (best runs 139-219 against 370); but
16x128 @ 128x384 (GRU S, where OpenBLAS stays on one thread) 15 us for both, and 1x64 @ 64x256
(T1) 0.72 against 0.74 us: single-threaded OpenBLAS is as fast as this micro-kernel.

The layout (`pack`): W's columns cut into panels of PANEL columns, each panel stored as one
contiguous (K, PANEL) block, the last one padded with zero columns. The product (`packed_dot`)
writes all P * PANEL columns of `out`; callers read only the first N. The micro-kernel keeps a
tile of 4 rows by 2 vectors of accumulators in registers for the whole K loop: per k, two
vector loads of the panel, four broadcasts of h, eight fused multiply-adds. Rows beyond a
multiple of 4 go one at a time. A vector is as wide as the machine's widest (512 bits with
AVX-512, 256 with AVX, else 128), written as LLVM vector values through the intrinsics below,
since neither Numba nor LLVM's vectorisers keep a loop's accumulators in registers on their
own (written as scalars, LLVM vectorised the K loop with gathers or not at all: 5-12 GFLOP/s).

The rule, `use_micro_kernel`: up to MICRO_MAX_ROWS rows the micro-kernel (one core); larger
blocks stay with BLAS, one panel as wide as W (`pack` returns W itself and `packed_dot` calls
np.dot). The rows are a time loop's chunk of the batch (row_threads.py), so on 2 cores LSTM M's
64 rows run as two chunks of 32, each through the micro-kernel on its own core. Before the
chunks, at 64 rows on one core the micro-kernel ran at 105-112 GFLOP/s while threaded BLAS on
a quiet machine ran the whole LSTM forward at M at 140 GFLOP/s; the bound of 32 lies between
that and 16 rows, where the micro-kernel won by almost 2x; 32 itself was not measured quietly.
"""
from __future__ import annotations

import numpy as np
from llvmlite import binding as llvm_binding
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils, config
from numba.extending import intrinsic, models, register_model

MICRO_MAX_ROWS = 32


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


def panel_width(dtype) -> int:
    """Columns per panel: the micro-kernel's two vectors."""
    return 2 * lanes(dtype)


@njit(cache=True)
def use_micro_kernel(rows: int) -> bool:
    """The rule `pack` applies; `packed_dot` follows the layout `pack` chose."""
    return rows <= MICRO_MAX_ROWS


def pack(w: np.ndarray, rows: int) -> np.ndarray:
    """W (K, N) as (P, K, width) panels for a product with `rows` rows: PANEL columns each if
    the micro-kernel takes it, else one panel, W itself."""
    k, n = w.shape
    if not use_micro_kernel(rows):
        return np.ascontiguousarray(w).reshape(1, k, n)
    width = panel_width(w.dtype)
    count = -(-n // width)
    padded = np.zeros((k, count * width), w.dtype)
    padded[:, :n] = w
    return np.ascontiguousarray(padded.reshape(k, count, width).transpose(1, 0, 2))


def packed_width(w: np.ndarray) -> int:
    """The columns `packed_dot` writes for packed weights `w`."""
    return w.shape[0] * w.shape[2]


# -- SIMD vectors in Numba --------------------------------------------------------------------
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
def _vadd(typingctx, a, b):
    def codegen(context, builder, sig, args):
        return builder.fadd(args[0], args[1])
    return a(a, b), codegen


# -- the product ------------------------------------------------------------------------------
@njit(cache=True, error_model="numpy", boundscheck=False)
def packed_dot(h, w, out):
    """out[:, :P * PANEL] = h (B, K) @ w, the weights as `pack` made them for at least these
    rows (panels: the micro-kernel; one panel as wide as W: BLAS); h and out C-contiguous.
    W packed as one panel exactly PANEL wide is the same array either way."""
    rows, k_size = h.shape
    count, _, width = w.shape
    if width * 8 * h.itemsize != 2 * VECTOR_BITS:
        np.dot(h, w[0], out)
        return
    flat_w, flat_h, flat_out = w.reshape(-1), h.reshape(-1), out.reshape(-1)
    n = out.shape[1]
    step = width // 2  # the lanes of one vector
    zero = vsplat(flat_w[0] - flat_w[0])
    whole = rows - rows % 4
    for p in range(count):
        base = p * k_size * width
        for b in range(0, whole, 4):
            a00, a01, a10, a11 = zero, zero, zero, zero
            a20, a21, a30, a31 = zero, zero, zero, zero
            for k in range(k_size):
                w0 = vload(flat_w, base + k * width)
                w1 = vload(flat_w, base + k * width + step)
                x = vsplat(flat_h[b * k_size + k])
                a00, a01 = vfma(x, w0, a00), vfma(x, w1, a01)
                x = vsplat(flat_h[(b + 1) * k_size + k])
                a10, a11 = vfma(x, w0, a10), vfma(x, w1, a11)
                x = vsplat(flat_h[(b + 2) * k_size + k])
                a20, a21 = vfma(x, w0, a20), vfma(x, w1, a21)
                x = vsplat(flat_h[(b + 3) * k_size + k])
                a30, a31 = vfma(x, w0, a30), vfma(x, w1, a31)
            at = b * n + p * width
            vstore(flat_out, at, a00)
            vstore(flat_out, at + step, a01)
            vstore(flat_out, at + n, a10)
            vstore(flat_out, at + n + step, a11)
            vstore(flat_out, at + 2 * n, a20)
            vstore(flat_out, at + 2 * n + step, a21)
            vstore(flat_out, at + 3 * n, a30)
            vstore(flat_out, at + 3 * n + step, a31)
        for b in range(whole, rows):
            a0, a1, c0, c1 = zero, zero, zero, zero  # two chains per vector: k even, k odd
            k = 0
            while k + 1 < k_size:
                x = vsplat(flat_h[b * k_size + k])
                a0 = vfma(x, vload(flat_w, base + k * width), a0)
                a1 = vfma(x, vload(flat_w, base + k * width + step), a1)
                x = vsplat(flat_h[b * k_size + k + 1])
                c0 = vfma(x, vload(flat_w, base + (k + 1) * width), c0)
                c1 = vfma(x, vload(flat_w, base + (k + 1) * width + step), c1)
                k += 2
            if k < k_size:
                x = vsplat(flat_h[b * k_size + k])
                a0 = vfma(x, vload(flat_w, base + k * width), a0)
                a1 = vfma(x, vload(flat_w, base + k * width + step), a1)
            vstore(flat_out, b * n + p * width, _vadd(a0, c0))
            vstore(flat_out, b * n + p * width + step, _vadd(a1, c1))
