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
# Shared memory a persistent kernel may fill with recurrent weights, per block (the static
# limit is 48 KiB; a little is kept for the reduction buffer).
SHARED_BYTES = 40 * 1024
# Persistent kernels: one thread block per this many output columns of the recurrent GEMM at
# least, and no more than this many batch rows (beyond, the per-step GEMMs do better in cuBLAS).
PERSISTENT_MAX_BATCH = 64
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


# -- persistent kernels ----------------------------------------------------------------------
def cooperative_blocks(kernel, threads: int) -> int:
    """How many blocks a cooperative launch may have: one per multiprocessor (a block of
    `threads` threads with at most 48 KiB of static shared memory always fits one per SM)."""
    if SIMULATOR:
        return 1  # the simulator runs blocks one after another: a grid sync needs one block
    return int(cuda.get_current_device().MULTIPROCESSOR_COUNT)


def persistent_blocks(gemms, batch: int, itemsize: int, limit: int, elements: int) -> int:
    """The grid of a persistent kernel, or 0 when it does not fit: the fewest blocks (at most
    `limit`, the co-resident ones) whose shared memory holds their columns of every recurrent
    weight matrix (`gemms`: (K, N) per per-step GEMM, split by output columns over the
    blocks), raised towards one thread per element of the widest phase (`elements`) so the
    elementwise work spreads too; 0 also when the batch is above PERSISTENT_MAX_BATCH."""
    if batch > PERSISTENT_MAX_BATCH or limit < 1:
        return 0
    words = SHARED_BYTES // itemsize
    for count in range(1, limit + 1):
        if sum(k * math.ceil(n / count) for k, n in gemms) <= words:
            return min(limit, max(count, blocks(elements)))
    return 0


def shared_words(itemsize: int) -> int:
    return SHARED_BYTES // itemsize
