"""Scalar functions that generated kernels call, as source text for the generated module.

One library for both targets: the module that includes it defines the decorator
`KERNEL_FUNCTION` first (`njit(inline="always", ...)` on the CPU, `cuda.jit(device=True)` on
CUDA; the row kernels of matrix-memory cells call the functions instead, see
`kernel_functions`), and `C0`, `C1`, `C05`, `DT` (and `FAST` on the CPU). They are written
into each generated module (not imported) so that their constants are of the module's dtype:
a float32 kernel must never promote to float64 through a literal.

Semantics are NumPy's, special values included (the reference engine is NumPy): NaN
propagates through relu, min, max, sign, hard_sigmoid and row maxima; exp overflows to inf and
underflows to 0 where NumPy does.

Speed (CPU): LLVM vectorises a fused loop only if every call in it is vectorisable, and libm's
exp and tanh are not (16 ns per float32 tanh here, against 0.3 ns for the rational form
below). So exp builds 2**k from integer bits (Cody-Waite reduction, Taylor polynomial; 2**k as
two factors so that subnormal and near-overflow results come out right), tanh is a rational
form in float32 and exp-based in float64, sigmoid is 1/(1+exp(-x)), and softplus's log1p of a
number in [0, 1] is an atanh series (`log1p_unit`); branches are written as selects. The other
functions' bodies are the operators' own, from ops.py. Measured against
float64 NumPy (tests/test_kernel_functions.py): float32 relative error below 1e-6, float64
below 1e-14. Kernels also use `error_model="numpy"`: Numba's default
puts a division-by-zero check in every division, which blocks vectorisation as well. On CUDA,
exp and tanh are the device's own.
"""
from rnndsl.symbolic.ops import HARD_SLOPE, OPS

# The CPU kernels' fastmath flags (emit_common; the row kernels add reassociation).
FASTMATH = '{"nsz", "arcp", "contract", "afn"}'

DECORATORS = {
    "cpu": 'KERNEL_FUNCTION = njit(inline="always", fastmath=FAST, error_model="numpy")',
    # The row kernels' own flags allow reassociation (for their sums); these functions are
    # called, not inlined by Numba, so they keep flags without it (LLVM inlines them with their
    # own flags): reassociated, exp's 2**k in two factors overflowed where NumPy's result does
    # not (exp(88.5) in float32 gave inf, not 2.7e38).
    "cpu-called": f'KERNEL_FUNCTION = njit(fastmath={FASTMATH}, error_model="numpy")',
    "cuda": "KERNEL_FUNCTION = cuda.jit(device=True)",
}
TARGETS = ("cpu", "cuda")
DTYPES = ("float32", "float64")


def kernel_functions(dtype: str, target: str = "cpu", inline: bool = True) -> str:
    """The library's text for a module of `dtype` ("float32" | "float64") and `target`.

    `inline=False` (CPU only) leaves inlining to LLVM. Numba's own inlining analyses the whole
    caller again at each call site, which grows with the caller's length: the NTM's float64
    row kernels took 150 s to compile with it and 92 s without, and ran as fast (LLVM inlines
    these functions all the same). The short fused loops of emit_cpu keep Numba's inlining,
    which their vectorisation needs (without it the GRU's backward at S was 35% slower)."""
    decorator = DECORATORS["cpu-called" if target == "cpu" and not inline else target]
    return "\n".join([decorator, f"HARD_SLOPE = DT({HARD_SLOPE})",
                      _transcendental(dtype, target), _bodies()])


def _transcendental(dtype: str, target: str) -> str:
    if target == "cuda":
        return CUDA
    return FLOAT32 if dtype == "float32" else FLOAT64


def _bodies() -> str:
    """One kernel function per operator that has a body (ops.py)."""
    out = []
    for name, op in OPS.items():
        if op.body:
            params = ", ".join(("x",) if op.arity == 1 else "ab"[:op.arity])
            out.append(f"\n@KERNEL_FUNCTION\ndef {name}({params}):\n    return {op.body}\n")
    return "\n".join(out)


FLOAT32 = '''
from rnndsl.backend.kernel_intrinsics import float32_from_bits as from_bits

IT = np.int32
# below EXP_LO the result is 0 and above EXP_HI inf, as in NumPy (ln of the smallest subnormal
# and of the largest float32)
EXP_LO, EXP_HI, EXP_BIAS, EXP_SHIFT = DT(-103.972077), DT(88.7228394), IT(127), IT(23)
LOG2E, LN2_HI, LN2_LO = DT(1.44269504088896341), DT(0.693359375), DT(-2.12194440e-4)
EXP_POLY = tuple(DT(1.0 / f) for f in (5040.0, 720.0, 120.0, 24.0, 6.0, 2.0))
E7, E6, E5, E4, E3, E2 = EXP_POLY
INF = DT(np.inf)
# tanh: a [13/6] rational minimax form on [-7.905, 7.905] (beyond, tanh is 1 in float32)
TANH_CLAMP = DT(7.90531110763549805)
TA1, TA3, TA5, TA7 = DT(4.89352455891786e-03), DT(6.37261928875436e-04), DT(1.48572235717979e-05), DT(5.12229709037114e-08)
TA9, TA11, TA13 = DT(-8.60467152213735e-11), DT(2.00018790482477e-13), DT(-2.76076847742355e-16)
TB0, TB2, TB4, TB6 = DT(4.89352518554385e-03), DT(2.26843463243900e-03), DT(1.18534705686654e-04), DT(1.19825839466702e-06)


@KERNEL_FUNCTION
def exp(x):
    y = EXP_HI if x > EXP_HI else (EXP_LO if x < EXP_LO else x)
    k = IT(y * LOG2E + (C05 if y >= C0 else -C05))
    n = DT(k)
    r = (y - n * LN2_HI) - n * LN2_LO
    p = (((((((E7 * r + E6) * r + E5) * r + E4) * r + E3) * r + E2) * r + C1) * r + C1)
    half = k >> 1
    e = p * from_bits((half + EXP_BIAS) << EXP_SHIFT) * from_bits((k - half + EXP_BIAS) << EXP_SHIFT)
    return INF if x > EXP_HI else (C0 if x < EXP_LO else (e if x == x else x))


@KERNEL_FUNCTION
def tanh(x):
    x = TANH_CLAMP if x > TANH_CLAMP else x
    x = -TANH_CLAMP if x < -TANH_CLAMP else x
    x2 = x * x
    p = x2 * (x2 * (x2 * (x2 * (x2 * (x2 * TA13 + TA11) + TA9) + TA7) + TA5) + TA3) + TA1
    q = x2 * (x2 * (x2 * TB6 + TB4) + TB2) + TB0
    return x * p / q


# log(1 + u) for 0 <= u <= 1 (softplus's), vectorisable where libm's log1p is not:
# 2 atanh(s) with s = u / (2 + u) <= 1/3, its series in s^2 up to the term below 1e-8.
L3, L5, L7, L9, L11, L13 = (DT(1.0 / k) for k in (3, 5, 7, 9, 11, 13))


@KERNEL_FUNCTION
def log1p_unit(u):
    s = u / (C1 + C1 + u)
    z = s * s
    return (s + s) * (C1 + z * (L3 + z * (L5 + z * (L7 + z * (L9 + z * (L11 + z * L13))))))
'''

# float64's log1p_unit: 1 + z/3 + z^2/5 + ... + z^16/33 in Horner's form, constants L3..L33
_LOG1P_CONSTANTS = ", ".join(f"L{2 * k + 1}" for k in range(1, 17)) + " = " + ", ".join(
    f"DT(1.0 / {2 * k + 1})" for k in range(1, 17))
_LOG1P_HORNER = "C1 + z * (" + " + z * (".join(f"L{2 * k + 1}" for k in range(1, 17)) + ")" * 16

FLOAT64 = '''
from rnndsl.backend.kernel_intrinsics import float64_from_bits as from_bits

IT = np.int64
EXP_LO, EXP_HI, EXP_BIAS, EXP_SHIFT = DT(-745.1332191019412), DT(709.782712893384), IT(1023), IT(52)
INF = DT(np.inf)
LOG2E, LN2_HI, LN2_LO = DT(1.4426950408889634), DT(0.6931471803691238), DT(1.9082149292705877e-10)
E13, E12, E11, E10, E9, E8, E7, E6, E5, E4, E3, E2 = (DT(1.0 / math.factorial(k)) for k in range(13, 1, -1))
# tanh for |x| < 0.625: a rational form (Cephes); beyond it, 1 - 2 / (exp(2|x|) + 1)
TP0, TP1, TP2 = DT(-1.61468768441708447952e3), DT(-9.92877231001918586564e1), DT(-9.64399179425052238628e-1)
TQ0, TQ1, TQ2 = DT(4.84406305325125486048e3), DT(2.23548839060100448583e3), DT(1.12811678491632931402e2)
TANH_SMALL, TANH_BIG, C2 = DT(0.625), DT(20.0), DT(2.0)


@KERNEL_FUNCTION
def exp(x):
    y = EXP_HI if x > EXP_HI else (EXP_LO if x < EXP_LO else x)
    k = IT(y * LOG2E + (C05 if y >= C0 else -C05))
    n = DT(k)
    r = (y - n * LN2_HI) - n * LN2_LO
    p = E13 * r + E12
    p = ((((p * r + E11) * r + E10) * r + E9) * r + E8) * r + E7
    p = (((((p * r + E6) * r + E5) * r + E4) * r + E3) * r + E2) * r + C1
    half = k >> 1
    e = (p * r + C1) * from_bits((half + EXP_BIAS) << EXP_SHIFT) * from_bits((k - half + EXP_BIAS) << EXP_SHIFT)
    return INF if x > EXP_HI else (C0 if x < EXP_LO else (e if x == x else x))


@KERNEL_FUNCTION
def tanh(x):
    a = abs(x)
    big = C1 - C2 / (exp(C2 * min(a, TANH_BIG)) + C1)
    z = x * x
    small = x + x * z * (((TP2 * z + TP1) * z + TP0) / (((z + TQ2) * z + TQ1) * z + TQ0))
    return small if a < TANH_SMALL else math.copysign(big, x)


# log(1 + u) for 0 <= u <= 1 (softplus's), vectorisable where libm's log1p is not:
# 2 atanh(s) with s = u / (2 + u) <= 1/3, its series in s^2 up to the term below 1e-17.
''' + _LOG1P_CONSTANTS + '''


@KERNEL_FUNCTION
def log1p_unit(u):
    s = u / (C2 + u)
    z = s * s
    return (s + s) * (''' + _LOG1P_HORNER + ''')
'''

CUDA = '''
@KERNEL_FUNCTION
def exp(x):
    return math.exp(x)


@KERNEL_FUNCTION
def tanh(x):
    return math.tanh(x)


@KERNEL_FUNCTION
def log1p_unit(u):
    return math.log1p(u)
'''


def _check_complete():
    """Every primitive computes on every target and dtype, or importing rnndsl says which does
    not (rather than Numba at JIT time, and for CUDA only on a GPU or in the simulator)."""
    for name, op in OPS.items():
        if op.structural or op.inline or op.body:
            continue
        for target in TARGETS:
            for dtype in DTYPES:
                if f"def {name}(" not in _transcendental(dtype, target):
                    raise TypeError(f"operator '{name}' has no kernel code for {target} "
                                    f"{dtype}: give it an inline form or a body in ops.py, or "
                                    f"a library function in kernel_lib.py")


_check_complete()
