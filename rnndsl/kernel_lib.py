"""Scalar functions that generated kernels call, as source text for the generated module.

They are written into each generated module (not imported) so that their constants are of
the module's dtype: a float32 kernel must never promote to float64 through a literal.
`C0`, `C1`, `C05` and `DT` are defined by the module before this text.

Speed: a fused loop is vectorised by LLVM only if every call in it is, and libm's tanh is
not (16 ns per float32 element here, against 0.3 ns for the rational form below, measured
with `error_model="numpy"`, which drops Python's division-by-zero check that also blocks
vectorisation). So float32 kernels use a branch-free rational tanh, accurate to 3e-7
(relative, measured against float64 tanh on [-12, 12]), and sigmoid(x) = (1 + tanh(x/2))/2;
float64 kernels use libm's functions, exactly.
"""


def kernel_functions(dtype: str) -> str:
    return (FAST_TANH if dtype == "float32" else EXACT_TANH) + KERNEL_FUNCTIONS


# A [13/6] rational minimax form of tanh on [-7.905, 7.905] (beyond it tanh is 1 in float32).
FAST_TANH = '''
TANH_CLAMP = DT(7.90531110763549805)
TA1, TA3, TA5, TA7 = DT(4.89352455891786e-03), DT(6.37261928875436e-04), DT(1.48572235717979e-05), DT(5.12229709037114e-08)
TA9, TA11, TA13 = DT(-8.60467152213735e-11), DT(2.00018790482477e-13), DT(-2.76076847742355e-16)
TB0, TB2, TB4, TB6 = DT(4.89352518554385e-03), DT(2.26843463243900e-03), DT(1.18534705686654e-04), DT(1.19825839466702e-06)


@njit(inline="always", fastmath=FAST, error_model="numpy")
def tanh(x):
    x = TANH_CLAMP if x > TANH_CLAMP else x
    x = -TANH_CLAMP if x < -TANH_CLAMP else x
    x2 = x * x
    p = x2 * (x2 * (x2 * (x2 * (x2 * (x2 * TA13 + TA11) + TA9) + TA7) + TA5) + TA3) + TA1
    q = x2 * (x2 * (x2 * TB6 + TB4) + TB2) + TB0
    return x * p / q


@njit(inline="always", fastmath=FAST, error_model="numpy")
def sigmoid(x):
    return C05 + C05 * tanh(C05 * x)
'''

EXACT_TANH = '''
@njit(inline="always", fastmath=FAST, error_model="numpy")
def tanh(x):
    return math.tanh(x)


@njit(inline="always", fastmath=FAST, error_model="numpy")
def sigmoid(x):
    # exp of -|x| only, so it never overflows
    e = math.exp(-abs(x))
    s = C1 / (C1 + e)
    return s if x >= C0 else C1 - s
'''

KERNEL_FUNCTIONS = '''
@njit(inline="always", fastmath=FAST, error_model="numpy")
def relu(x):
    return x if x > C0 else C0


@njit(inline="always", fastmath=FAST, error_model="numpy")
def softplus(x):
    return max(x, C0) + math.log1p(math.exp(-abs(x)))


@njit(inline="always", fastmath=FAST, error_model="numpy")
def hard_sigmoid(x):
    return min(max(DT(0.2) * x + C05, C0), C1)


@njit(inline="always", fastmath=FAST, error_model="numpy")
def step(x):
    return C1 if x > C0 else C0


@njit(inline="always", fastmath=FAST, error_model="numpy")
def sign(x):
    return C1 if x > C0 else (-C1 if x < C0 else C0)


@njit(inline="always", fastmath=FAST, error_model="numpy")
def equal(a, b):
    return C1 if a == b else C0


@njit(inline="always", fastmath=FAST, error_model="numpy")
def power(a, b):
    return a ** b
'''
