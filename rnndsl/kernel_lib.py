"""Scalar functions that generated kernels call, as source text for the generated module.

They are written into each generated module (not imported) so that their constants are of
the module's dtype: a float32 kernel must never promote to float64 through a literal.
`C0`, `C1`, `C05` and `DT` are defined by the module before this text.
"""

KERNEL_FUNCTIONS = '''
@njit(inline="always", fastmath=FAST)
def sigmoid(x):
    # exp of -|x| only, so it never overflows
    e = math.exp(-abs(x))
    s = C1 / (C1 + e)
    return s if x >= C0 else C1 - s


@njit(inline="always", fastmath=FAST)
def tanh(x):
    return math.tanh(x)


@njit(inline="always", fastmath=FAST)
def relu(x):
    return x if x > C0 else C0


@njit(inline="always", fastmath=FAST)
def softplus(x):
    return max(x, C0) + math.log1p(math.exp(-abs(x)))


@njit(inline="always", fastmath=FAST)
def hard_sigmoid(x):
    return min(max(DT(0.2) * x + C05, C0), C1)


@njit(inline="always", fastmath=FAST)
def step(x):
    return C1 if x > C0 else C0


@njit(inline="always", fastmath=FAST)
def sign(x):
    return C1 if x > C0 else (-C1 if x < C0 else C0)


@njit(inline="always", fastmath=FAST)
def equal(a, b):
    return C1 if a == b else C0


@njit(inline="always", fastmath=FAST)
def power(a, b):
    return a ** b
'''
