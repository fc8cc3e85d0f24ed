"""Everything the CUDA target needs from outside rnndsl, in one place.

This is the only module that imports Numba's CUDA support. Numba's built-in `numba.cuda` is
deprecated in favour of the `numba-cuda` package (NVIDIA's, on PyPI; it takes over the
`numba.cuda` name when installed), itself to be followed by `numba-cuda-mlir`; when the import
moves again, it moves here. Generated CUDA modules import `cuda` and the helpers below from
this module, never from Numba directly.

Arrays are device arrays of any kind that has `__cuda_array_interface__` (Numba's, CuPy's,
PyTorch's CUDA tensors): `device()` wraps them without a copy; host NumPy arrays are copied.
GEMMs go to cuBLAS through PyTorch when it has CUDA (its GEMMs can be captured in a CUDA
graph, CuPy's cannot), else through CuPy when it is installed, else to the tiled Numba kernel
below (the only path in the simulator).

Streams: every launch, copy and GEMM goes to a stream the caller gives (a `Stream`, made from a
cudaStream_t handle; 0 is the default stream). Generated code takes it as an argument; the
helpers here that generated code does not call take the thread's current one (`on_stream`),
which is how the PyTorch bridge puts the kernels on torch's current stream.

With NUMBA_ENABLE_CUDASIM=1 (set before Numba is imported) the kernels run in Numba's CUDA
simulator, on the CPU, one Python thread per GPU thread: that is how the CUDA target is
tested on machines without a GPU. The simulator runs the blocks of a grid one after another,
so a cooperative kernel (grid-wide sync) can only have one block there.
"""
from __future__ import annotations

import math
import threading
from contextlib import contextmanager

import numpy as np
from numba import config
from numba import cuda  # the one import of Numba's CUDA support in rnndsl

from rnndsl.backend import scratch

SIMULATOR = bool(config.ENABLE_CUDASIM)

# Threads per block of every generated kernel: a power of two (the block reductions halve it).
# The simulator spends one Python thread per GPU thread, so it gets small blocks.
THREADS = 8 if SIMULATOR else 128
# Threads per block of the row kernels of matrix-memory cells (emit_rows), one batch row each:
# one warp, so that a batch of a few warps' rows spreads over as many multiprocessors.
ROW_THREADS = 8 if SIMULATOR else 32
TILE = 16  # the fallback GEMM's tile edge


def available() -> bool:
    """A GPU (or the simulator) is there to run kernels."""
    return SIMULATOR or cuda.is_available()


def versions() -> dict[str, str]:
    import numba

    out = {"numba": numba.__version__, "simulator": str(SIMULATOR)}
    try:
        import numba_cuda  # noqa: F401

        out["numba-cuda"] = getattr(numba_cuda, "__version__", "?")
    except ImportError:
        pass
    for name in ("cupy", "torch"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            pass
    return out


# -- streams --------------------------------------------------------------------------------
class Stream:
    """A CUDA stream by its handle (an int; 0: the default stream), as each library that
    enqueues work on it spells it: `kernels` (Numba's) for launches and copies; torch's and
    CuPy's views, for the GEMMs, made on first use."""

    def __init__(self, handle: int = 0):
        self.handle = int(handle)
        # the simulator runs everything at once, in order: its launches take 0
        self.kernels = cuda.external_stream(self.handle) if self.handle and not SIMULATOR else 0
        self._torch = self._cupy = None

    def torch(self):
        if self._torch is None:
            import torch

            self._torch = torch.cuda.ExternalStream(self.handle) if self.handle else \
                torch.cuda.default_stream()
        return self._torch

    def cupy(self):
        if self._cupy is None:
            import cupy

            self._cupy = cupy.cuda.ExternalStream(self.handle)
        return self._cupy

    def synchronize(self):
        """Wait on the host until the work enqueued so far is done."""
        if self.kernels:
            self.kernels.synchronize()
        else:
            cuda.synchronize()


DEFAULT_STREAM = Stream(0)
_current = threading.local()


def current_stream() -> Stream:
    """The stream of this thread's work outside generated code (`on_stream`; the default
    stream unless set)."""
    return getattr(_current, "stream", DEFAULT_STREAM)


@contextmanager
def on_stream(handle: int):
    """Within the block, this thread's CUDA work goes to the stream of that handle."""
    before = current_stream()
    _current.stream = before if before.handle == int(handle) else Stream(handle)
    try:
        yield _current.stream
    finally:
        _current.stream = before


@contextmanager
def on_device(index: int):
    """Within the block, Numba works on GPU `index` (torch's tensors may be on any)."""
    if SIMULATOR:
        yield
        return
    with cuda.gpus[index]:
        yield


# -- arrays ---------------------------------------------------------------------------------
def is_device(a) -> bool:
    return hasattr(a, "__cuda_array_interface__") or type(a).__name__ == "FakeCUDAArray"


def device(a, dtype=None):
    """A device array for `a`: device arrays (and CUDA tensors) as they are, host arrays copied."""
    if type(a).__name__ == "FakeCUDAArray":
        return a
    if hasattr(a, "__cuda_array_interface__"):
        return cuda.as_cuda_array(a)
    return cuda.to_device(np.ascontiguousarray(a, dtype=dtype), stream=current_stream().kernels)


def host(a) -> np.ndarray:
    if not is_device(a):
        return np.asarray(a)
    stream = current_stream()
    out = a.copy_to_host(stream=stream.kernels)
    stream.synchronize()
    return out


def empty(shape, dtype, stream: Stream | None = None):
    if scratch.fill_nan():  # the debug mode of rnndsl.backend.scratch
        if SIMULATOR:
            return cuda.to_device(np.full(shape, np.nan, dtype))
        out = cuda.device_array(shape, dtype)
        fill(out, np.nan, stream)
        return out
    return cuda.device_array(shape, dtype)


def zeros(shape, dtype, stream: Stream | None = None):
    if SIMULATOR:  # a copy costs the simulator nothing, a kernel launch a thread per element
        return cuda.to_device(np.zeros(shape, dtype))
    out = cuda.device_array(shape, dtype)
    fill(out, 0.0, stream)
    return out


def copy(dst, src, stream: Stream):
    """dst[...] = src, device to device."""
    dst.copy_to_device(src, stream=stream.kernels)


def stack(arrays, dtype, stream: Stream):
    """The arrays stacked by rows (like np.concatenate), as one new device array."""
    rows = sum(a.shape[0] for a in arrays)
    out = cuda.device_array((rows, *arrays[0].shape[1:]), dtype)
    r = 0
    for a in arrays:
        out[r:r + a.shape[0]].copy_to_device(a, stream=stream.kernels)
        r += a.shape[0]
    return out


def flat(a):
    """A 3-d (T, B, n) device array as its 2-d (T*B, n) view."""
    return a.reshape(a.shape[0] * a.shape[1], a.shape[2])


# -- small kernels ---------------------------------------------------------------------------
@cuda.jit
def _fill(a, value):
    i = cuda.grid(1)
    if i < a.shape[0]:
        a[i] = value


def fill(a, value, stream: Stream | None = None):
    """a[...] = value, for a C-contiguous device array."""
    if a.size:
        on = (stream or current_stream()).kernels
        _fill[blocks(a.size), THREADS, on](a.reshape(a.size), value)


@cuda.jit
def _copy_live_steps(x, lengths, out):
    t, i = cuda.grid(2)
    if t < x.shape[0] and i < x.shape[1] * x.shape[2]:
        b, j = i // x.shape[2], i % x.shape[2]
        out[t, b, j] = x[t, b, j] if t < lengths[b] else 0.0


def zero_padding(x, lengths: np.ndarray):
    """A copy of the (T, B, n) device array x with the steps past each sequence's length set
    to 0 (x itself, a caller's tensor maybe, is left as it is)."""
    stream = current_stream()
    out = empty(x.shape, x.dtype, stream)
    grid = (blocks(x.shape[0], TILE), blocks(x.shape[1] * x.shape[2], TILE))
    _copy_live_steps[grid, (TILE, TILE), stream.kernels](
        x, cuda.to_device(lengths, stream=stream.kernels), out)
    return out


@cuda.jit
def _add_into(dst, src):
    i, j = cuda.grid(2)
    if i < dst.shape[0] and j < dst.shape[1]:
        dst[i, j] += src[i, j]


def add_into(dst, src, stream: Stream):
    """dst += src for 1-d or 2-d arrays of one shape."""
    d2 = dst.reshape(dst.shape[0], -1) if dst.ndim != 2 else dst
    s2 = src.reshape(src.shape[0], -1) if src.ndim != 2 else src
    grid = (blocks(d2.shape[0], TILE), blocks(d2.shape[1], TILE))
    _add_into[grid, (TILE, TILE), stream.kernels](d2, s2)


@cuda.jit
def _transpose(a, out):
    i, j = cuda.grid(2)
    if i < a.shape[0] and j < a.shape[1]:
        out[j, i] = a[i, j]


def transpose(a, stream: Stream):
    """a.T of a 2-d device array (of any strides), as a new C-contiguous one."""
    out = cuda.device_array((a.shape[1], a.shape[0]), a.dtype)
    if a.size:
        grid = (blocks(a.shape[0], TILE), blocks(a.shape[1], TILE))
        _transpose[grid, (TILE, TILE), stream.kernels](a, out)
    return out


@cuda.jit
def _column_sums(a, start, out):
    c = cuda.grid(1)
    if c < out.size:
        acc = 0.0
        for r in range(a.shape[0]):
            acc += a[r, start + c]
        out[c] += acc


def add_column_sums(out, a, start, stream: Stream):
    """out += a[:, start:start + out.size].sum(axis=0) for a 2-d a (bias gradients)."""
    flat_out = out.reshape(out.size)
    _column_sums[blocks(out.size), THREADS, stream.kernels](a, start, flat_out)


def blocks(n: int, per: int = THREADS) -> int:
    return max(1, math.ceil(n / per))


# -- GEMM ------------------------------------------------------------------------------------
def _tiled_gemm_kernel(dtype):
    """The fallback GEMM for one dtype (a shared array's dtype must be a compile-time
    constant, so each dtype gets its own kernel)."""

    @cuda.jit
    def gemm_tiled(a, b, c, trans_a, trans_b, accumulate):
        """c (M, N) = op(a) @ op(b) (+ c): TILE x TILE threads per output tile, K in TILE steps
        through shared memory; accumulates in float64 (the fallback, not the fast path)."""
        sa = cuda.shared.array((TILE, TILE), dtype)
        sb = cuda.shared.array((TILE, TILE), dtype)
        tx, ty = cuda.threadIdx.x, cuda.threadIdx.y
        row = cuda.blockIdx.x * TILE + tx
        col = cuda.blockIdx.y * TILE + ty
        M, N = c.shape[0], c.shape[1]
        K = a.shape[0] if trans_a else a.shape[1]
        acc = 0.0
        for k0 in range(0, K, TILE):
            ka, kb = k0 + ty, k0 + tx
            if row < M and ka < K:
                sa[tx, ty] = a[ka, row] if trans_a else a[row, ka]
            else:
                sa[tx, ty] = 0
            if col < N and kb < K:
                sb[tx, ty] = b[col, kb] if trans_b else b[kb, col]
            else:
                sb[tx, ty] = 0
            cuda.syncthreads()
            for k in range(TILE):
                acc += sa[tx, k] * sb[k, ty]
            cuda.syncthreads()
        if row < M and col < N:
            c[row, col] = c[row, col] + acc if accumulate else acc

    return gemm_tiled


_GEMM_TILED = {np.dtype(np.float32): _tiled_gemm_kernel(np.float32),
               np.dtype(np.float64): _tiled_gemm_kernel(np.float64)}


def backend() -> str:
    """Who does the GEMMs: 'torch' (cuBLAS, through PyTorch when it has CUDA: its GEMMs can be
    captured in a CUDA graph), 'cupy' (cuBLAS; CuPy's stream capture refuses cuBLAS calls) or
    'numba' (the tiled kernel: the simulator's)."""
    global _BACKEND
    if _BACKEND is None:
        _BACKEND = "numba"
        if not SIMULATOR:
            try:
                import torch

                if torch.cuda.is_available():
                    _BACKEND = "torch"
            except ImportError:
                pass
        if _BACKEND == "numba" and not SIMULATOR:
            try:
                import cupy  # noqa: F401

                _BACKEND = "cupy"
            except ImportError:
                pass
    return _BACKEND


_BACKEND: str | None = None


def gemm_operand(a):
    """The GEMM backend's view of a 2-d or 3-d device array, over the same memory: made once
    before a time loop, so that each step only indexes it (wrapping costs 15-26 us a call)."""
    kind = backend()
    if kind == "torch":
        import torch

        return a if isinstance(a, torch.Tensor) else torch.as_tensor(a, device="cuda")
    if kind == "cupy":
        import cupy

        return a if isinstance(a, cupy.ndarray) else cupy.asarray(a)
    return a


def gemm(a, b, c, stream: Stream, trans_a=False, trans_b=False, accumulate=False):
    """c = op(a) @ op(b), or c += ... with `accumulate`, on `stream`; op transposes when
    asked. 2-d device arrays or their `gemm_operand`s; c must be C-contiguous."""
    M, N = c.shape
    if M == 0 or N == 0:
        return
    K = a.shape[0] if trans_a else a.shape[1]
    kind = backend()
    if K == 0:
        if not accumulate:
            c = c if kind == "numba" else cuda.as_cuda_array(c)
            fill(c, 0.0, stream)
        return
    if kind == "numba":
        grid = (blocks(M, TILE), blocks(N, TILE))
        _GEMM_TILED[np.dtype(c.dtype)][grid, (TILE, TILE), stream.kernels](
            a, b, c, trans_a, trans_b, accumulate)
        return
    A, Bm, C = gemm_operand(a), gemm_operand(b), gemm_operand(c)
    A = A.T if trans_a else A
    Bm = Bm.T if trans_b else Bm
    if kind == "torch":
        import torch

        if torch.cuda.current_stream().cuda_stream == stream.handle:
            _torch_mm(A, Bm, C, accumulate)
        else:
            with torch.cuda.stream(stream.torch()):
                _torch_mm(A, Bm, C, accumulate)
        return
    import cupy

    with stream.cupy():
        if accumulate:
            C += A @ Bm
        else:
            cupy.matmul(A, Bm, out=C)


def _torch_mm(A, Bm, C, accumulate: bool):
    import torch

    if accumulate:
        C.addmm_(A, Bm)
    else:
        torch.mm(A, Bm, out=C)


# -- block-diagonal weights --------------------------------------------------------------------
# A stack with block-diagonal weights (`blocks:` in a spec, xLSTM's head-wise R) is multiplied
# by its diagonal blocks alone, as on the cpu target (packed.py): out = v @ M, M the stack as
# the dense product multiplies it, (K, N). Which of v's columns an output column c reads
# follows from the stack's layout (`block_parts`): forward (M = stack.T) the weight whose row
# c is, and of it c's block of columns (all of v for a dense weight); transposed (M = stack,
# the sums W.T @ g) every weight, and of each the rows of c's block (all its rows if dense).
# One thread per (row, output column), consecutive threads on consecutive columns of one row:
# a warp's columns lie in one block mostly, so its threads read the same element of v at once
# (one broadcast load) and consecutive elements of a row of M (one coalesced load); a block's
# product is too small (slstm: 4x4 blocks of H/4) to give cuBLAS's tiles anything to share,
# and the layout needs no shared memory, so it runs at any block size (1 wide included) and
# on any number of rows (a step's B or all T*B at once).


def block_parts(parts) -> tuple[int, ...]:
    """The layout of a stack for `block_product`: `parts` (rows, diagonal blocks) of each of
    its weights in order; per weight its first row in the stack, its rows and its blocks'
    size (0: a dense weight), one flat tuple (the kernels take it by value)."""
    out, first = [], 0
    for rows, count in parts:
        out += [first, rows, rows // count if count > 1 else 0]
        first += rows
    return tuple(out)


def _block_kernels(dtype):
    """The block product's kernel and the diagonal blocks' weight gradients for one dtype (the
    accumulators start as a zero of the dtype: float32 sums stay float32)."""
    zero = dtype(0)

    @cuda.jit
    def product(v, m, parts, out, transposed, accumulate):
        e = cuda.grid(1)
        n = out.shape[1]
        if e >= out.shape[0] * n:
            return
        r, c = e // n, e % n
        acc = zero
        for p in range(0, len(parts), 3):
            first, rows, size = parts[p], parts[p + 1], parts[p + 2]
            if transposed:  # rows of every weight: those of c's block
                lo = first + (c // size) * size if size else first
                hi = lo + size if size else first + rows
            elif first <= c < first + rows:  # c is a row of this weight: its block's columns
                lo = (c - first) // size * size if size else 0
                hi = lo + size if size else m.shape[0]
            else:
                continue
            for i in range(lo, hi):
                acc += v[r, i] * m[i, c]
        if accumulate:
            out[r, c] += acc
        else:
            out[r, c] = acc

    @cuda.jit
    def diagonal_grads(g, first, v, size, out):
        """out[r, c] += the sum over rows of g[row, first + r] * v[row, c], for (r, c) on
        out's diagonal blocks alone: one thread per such element, consecutive threads on
        consecutive c (v's reads coalesce, g's are one broadcast), summing over all T*B rows
        of the buffer g and the vector v."""
        e = cuda.grid(1)
        if e < out.shape[0] * size:
            r = e // size
            c = r - r % size + e % size
            acc = zero
            for row in range(g.shape[0]):
                acc += g[row, first + r] * v[row, c]
            out[r, c] += acc

    return product, diagonal_grads


_BLOCK_KERNELS = {np.dtype(t): _block_kernels(t) for t in (np.float32, np.float64)}


def block_product(v, m, parts, out, stream: Stream, transposed: bool, accumulate=False):
    """out = v @ M by M's diagonal blocks (see above), or out += ... with `accumulate`: v
    (rows, K), m the (K, N) matrix M, `parts` its stack's `block_parts`, `transposed` whether
    M is the stack itself (the W.T @ g sums) rather than its transpose."""
    if out.size:
        kernel = _BLOCK_KERNELS[np.dtype(out.dtype)][0]
        kernel[blocks(out.size), THREADS, stream.kernels](v, m, parts, out, transposed,
                                                          accumulate)


def add_diagonal_block_grads(out, g, first: int, v, count: int, stream: Stream):
    """out += the diagonal blocks (`count` of them) of g[:, first:first + out.shape[0]].T @ v,
    the gradient of a block-diagonal weight (zero off its blocks: out starts as zeros)."""
    size = out.shape[0] // count
    if out.size and g.shape[0]:
        kernel = _BLOCK_KERNELS[np.dtype(out.dtype)][1]
        kernel[blocks(out.shape[0] * size), THREADS, stream.kernels](g, first, v, size, out)


# -- persistent kernels ----------------------------------------------------------------------
# A persistent kernel splits each recurrent dot product over LANES consecutive threads of a
# warp, summed with warp shuffles (a power of two, at most 32, dividing THREADS).
LANES = 4 if SIMULATOR else 8
STATIC_SHARED_BYTES = 48 * 1024  # beyond this a kernel must opt in to more dynamic shared memory
# The static shared memory a persistent kernel may have besides its dynamic shared memory: the
# reduction buffer of block_sum (THREADS words of at most 8 bytes).
STATIC_RESERVE = THREADS * 8
FULL_MASK = 0xFFFFFFFF

if SIMULATOR:
    @cuda.jit(device=True)
    def shfl_down(x, delta):
        """What `cuda.shfl_down_sync(FULL_MASK, x, delta)` returns, for the simulator, which has
        no warp shuffles: every thread of the block must call it, as every lane of a warp must
        call the real one."""
        exchange = cuda.shared.array(THREADS, np.float64)
        tid = cuda.threadIdx.x
        cuda.syncthreads()  # the previous exchange has been read
        exchange[tid] = x
        cuda.syncthreads()
        source = tid + delta
        if source < THREADS and source // 32 == tid // 32:
            return exchange[source]
        return x
else:
    @cuda.jit(device=True)
    def shfl_down(x, delta):
        return cuda.shfl_down_sync(FULL_MASK, x, delta)


@cuda.jit(device=True)
def lane_sum(x):
    """The sum of x over each group of LANES consecutive threads, in the group's first thread.
    Every thread of the block calls it (a shuffle needs every lane of its warp)."""
    width = LANES // 2
    while width > 0:
        x += shfl_down(x, width)
        width //= 2
    return x


# The auto mode's cost model of one time step, in microseconds: the one place its parameters
# live, to be fitted to GPU measurements (benchmarks/cuda_bench.py prints the per-step times
# of each time loop). The first figures: launches and grid syncs as measured on an H200
# (../shared/GPU.md), dot-product and pointwise rates of one block estimated from the
# single-block probe there (an LSTM step at T1, 16K multiply-adds, in ~0.8 us).
COST = {
    "launch_us": 25.0,  # one kernel launch or cuBLAS call from Python (the per-step path)
    "gemm_macs_per_us": 2.0e7,  # cuBLAS multiply-adds per microsecond, the whole GPU
    "grid_sync_us": 1.4,  # one grid.sync()
    "barrier_us": 0.02,  # one block barrier
    "block_macs_per_us": 2.0e4,  # multiply-adds per microsecond of one block, from shared memory
    "block_elements_per_us": 2.0e3,  # pointwise elements per microsecond of one block
}


def step_costs(products, batch: int, syncs: int, barriers: int, launches: int, elements: int,
               blocks: int) -> dict[str, float]:
    """The cost model (COST) of one time step of each time loop, in microseconds, for the
    per-step products `products` ((K, N) each) at `batch` rows; the multi-block one on
    `blocks` blocks, each owning about 1/blocks of the columns."""
    macs = batch * sum(k * n for k, n in products)
    block = macs / COST["block_macs_per_us"] + elements / COST["block_elements_per_us"] + \
        barriers * COST["barrier_us"]
    return {"per-step": launches * COST["launch_us"] + macs / COST["gemm_macs_per_us"],
            "single-block": block + syncs * COST["barrier_us"],  # its grid syncs are barriers
            "multi-block": syncs * COST["grid_sync_us"] + block / max(blocks, 1)}


def column_stride(k: int) -> int:
    """Words between two weight columns of a persistent kernel in shared memory: k rounded up
    to an odd multiple of LANES, so that the groups of LANES threads of a warp, each reading
    its own column at once, fall on different banks (as the kernels compute it)."""
    groups = -(-k // LANES)
    return (groups + 1 - groups % 2) * LANES


def block_columns(products, unit: int, blocks: int) -> list[int]:
    """Per product, the most output columns one block of a `blocks`-block grid owns: a slice
    of `unit` hidden units in every gate block of width `unit` (0: a contiguous slice of the
    columns)."""
    out = []
    for _, n in products:
        width = unit or n
        out.append((n // width) * math.ceil(width / blocks) if width else 0)
    return out


def choose_time_loop(mode, products, unit: int, batch: int, itemsize: int, syncs: int,
                     barriers: int, launches: int, elements: int, limit: int, shared: int):
    """The time loop of one pass: (variant, blocks, rows, nbytes). `mode`: None picks the
    cheapest that fits by the cost model, True the cheapest persistent one, False the per-step
    launches, 'single-block' or 'multi-block' that kernel. A persistent kernel fits when its
    block's columns of every product's weights (column_stride words each) and one staged row
    of the widest vector fit in `shared` bytes; `rows` vector rows are staged at once (`nbytes` of dynamic shared memory).
    The multi-block kernel runs on at most `limit` co-resident blocks, at least two, each with
    the same share of the units (or columns).
    Raises ValueError when a forced kernel does not fit."""
    widest = max((k for k, _ in products), default=0)
    words = shared // itemsize
    grids = {"single-block": 1}
    # no more blocks than hidden units (or columns), and none left without any: 512 units on
    # 132 blocks take 128 blocks of 4; the phases of a pass without products are strided over
    # the grid, any size
    most = unit or max((n for _, n in products), default=limit)
    each = math.ceil(most / max(min(limit, most), 1))
    if math.ceil(most / each) >= 2:
        grids["multi-block"] = math.ceil(most / each)
    fits = {}
    for variant, blocks in grids.items():
        weights = sum(column_stride(k) * c
                      for (k, _), c in zip(products, block_columns(products, unit, blocks)))
        if weights + max(widest, 1) <= words:
            rows = max(1, min(batch, (words - weights) // widest)) if widest else 1
            fits[variant] = (variant, blocks, rows, (weights + rows * widest) * itemsize)
    costs = step_costs(products, batch, syncs, barriers, launches, elements,
                       grids.get("multi-block", 1))
    per_step = ("per-step", 0, 0, 0)
    if mode is False:
        return per_step
    if mode in ("single-block", "multi-block"):
        if mode not in grids:
            raise ValueError("the persistent kernel does not fit: the multi-block kernel needs "
                             "two co-resident blocks at least and one hidden unit (or output "
                             "column) each")
        if mode not in fits:
            raise ValueError(f"the persistent kernel does not fit: the {mode} kernel needs "
                             "more shared memory than a block has for its recurrent weights")
        return fits[mode]
    candidates = dict(fits)
    if mode is None:
        candidates["per-step"] = per_step
    if not candidates:
        raise ValueError("the persistent kernel does not fit: the recurrent weights need more "
                         "shared memory than the resident blocks have")
    return candidates[min(candidates, key=costs.__getitem__)]


def cooperative_blocks(kernel, threads: int) -> int:
    """How many blocks a cooperative launch may have: one per multiprocessor (one block of
    `threads` threads and up to `shared_limit()` bytes of shared memory fits on each)."""
    if SIMULATOR:
        return SIMULATED_MULTIPROCESSORS
    return int(cuda.get_current_device().MULTIPROCESSOR_COUNT)


# The simulator runs the blocks of a grid one after another, so a grid sync works there with
# one block only; tests that run them concurrently (tests/cudasim_grid.py) raise this.
SIMULATED_MULTIPROCESSORS = 1


def shared_limit() -> int:
    """Bytes of dynamic shared memory a persistent kernel's block may have (opting in past
    the static 48 KiB), its static shared memory kept aside."""
    most = STATIC_SHARED_BYTES
    if not SIMULATOR:
        try:
            most = int(cuda.get_current_device().MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
        except AttributeError:  # a driver that does not name the attribute
            pass
    return most - STATIC_RESERVE


def launch_persistent(kernel, blocks: int, nbytes: int, stream: Stream, *args):
    """kernel[blocks, THREADS, stream.kernels, nbytes](*args), first raising the kernel's limit of dynamic
    shared memory when it and the static shared memory pass 48 KiB (numba-cuda 0.30 has no
    launch option for it: the attribute is set on the compiled function)."""
    if nbytes + STATIC_RESERVE > STATIC_SHARED_BYTES and not SIMULATOR:
        from numba.cuda.cudadrv.driver import binding, driver

        compiled = kernel._compile_for_args(*args)
        function = compiled._codelibrary.get_cufunc()
        attribute = binding.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
        driver.cuKernelSetAttribute(attribute, nbytes, function.handle, function.device.id)
    kernel[blocks, THREADS, stream.kernels, nbytes](*args)
