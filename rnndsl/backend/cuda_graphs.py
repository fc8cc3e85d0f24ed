"""The per-step time loop of the CUDA target as a CUDA graph: captured once, replayed after.

In the per-step mode each step of a pass launches a GEMM and a kernel per phase from Python,
and each launch costs 15-30 us on the host, far more than the work at most sizes. A graph
records the whole loop once (torch.cuda.graph: torch's GEMMs, and Numba's kernels launched on
torch's capture stream) and replays it in one call.

- When: `why_not()` says why a loop cannot be captured here (graphs turned off, Numba's
  simulator, no PyTorch or no CUDA in it, GEMMs not through PyTorch, or a stream that is
  already capturing: the caller's own graph then records the uncaptured loop). Then the loop
  runs uncaptured, with the same results. So does a loop whose arrays are not all
  C-contiguous (their copies into a graph's buffers are plain copies). After a capture that
  fails (a warning says why), no loop is captured again in the process.
- What a graph holds: a graph reads and writes fixed addresses, so each one owns a static
  copy of every array of its loop. A call copies into them what the loop reads (not what it
  only writes), replays, and copies back what the pass returns or keeps (its outputs, states
  and tape): two calls' results never share memory, and a tape kept for a backward pass
  survives the next forward. Lengths are an array the kernels read, so one graph serves any
  lengths; the number of steps is part of the recording, so each T gets its own graph.
- The cache: one graph per (loop, T, batch, sizes, device), at most `graph_cache_size()`
  graphs (8 by default; RNNDSL_CUDA_GRAPHS=N in the environment or `set_graph_cache_size(N)`;
  0 turns graphs off); the least recently used one is dropped, with its buffers, to make
  room. A loop is captured on its second call with the same key: the first runs uncaptured
  on the caller's arrays, so shapes seen once (a last, shorter batch) cost no capture. The
  second call runs the loop on the static buffers uncaptured first (it compiles what the
  capture will launch) and captures it after.
"""
from __future__ import annotations

import os
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass

from rnndsl.backend import cuda_support as cs

DEFAULT_CACHE_SIZE = 8


@dataclass(frozen=True)
class Loop:
    """What a generated time loop does with its arrays (the glue passes them in this order)."""
    arrays: tuple[str, ...]  # every array the loop's launches and GEMMs take
    gemm: tuple[str, ...]  # those the GEMMs take, as `cs.gemm_operand`s (made before a capture)
    fresh: tuple[str, ...]  # written whole before any read: not copied into a graph
    results: tuple[str, ...]  # written, and used after the loop: copied out of a graph

    def index(self, names) -> list[int]:
        return [self.arrays.index(n) for n in names]


def _size_from_environment() -> int:
    text = os.environ.get("RNNDSL_CUDA_GRAPHS", "")
    try:
        return max(0, int(text)) if text else DEFAULT_CACHE_SIZE
    except ValueError:
        warnings.warn(f"RNNDSL_CUDA_GRAPHS must be a whole number of graphs; got {text!r}: "
                      f"using {DEFAULT_CACHE_SIZE}", stacklevel=2)
        return DEFAULT_CACHE_SIZE


def why_not() -> str | None:
    """Why a time loop would not be captured in a graph here, or None when it would."""
    if _CACHE.size == 0:
        return "turned off (RNNDSL_CUDA_GRAPHS=0)"
    if _CACHE.failure is not None:
        return _CACHE.failure
    if cs.SIMULATOR:
        return "Numba's CUDA simulator"
    try:
        import torch
    except ImportError:
        return "PyTorch is not installed"
    if not torch.cuda.is_available():
        return "PyTorch has no CUDA here"
    if cs.backend() != "torch":
        return f"the GEMMs go through {cs.backend()}, not PyTorch"
    if torch.cuda.is_current_stream_capturing():
        return "the stream is already being captured"
    return None


def _torch_capture(record):
    """A torch.cuda.CUDAGraph of what `record(stream)` enqueues on the stream it is given."""
    import torch

    graph = torch.cuda.CUDAGraph()
    # Numba frees device memory in batches, and a free (cuMemFree) during a capture would
    # invalidate it: none happens inside the block. "thread_local": other threads (a data
    # loader pinning memory, say) may go on calling CUDA while this one captures.
    with cs.cuda.defer_cleanup(), torch.cuda.graph(graph, capture_error_mode="thread_local"):
        record(cs.Stream(torch.cuda.current_stream().cuda_stream))
    return graph


def _torch_replay(graph, stream: cs.Stream):
    import torch

    with torch.cuda.stream(stream.torch()):
        graph.replay()


@dataclass
class _Entry:
    arrays: tuple  # the static buffers, one per Loop.arrays
    lengths: object
    mats: tuple
    graph: object = None


class GraphCache:
    """Captured loops by key, least recently used first out. `capture(record)` returns what
    `replay(graph, stream)` runs (torch's by default; tests give their own)."""

    def __init__(self, size: int, capture=_torch_capture, replay=_torch_replay):
        self.size = size
        self.capture, self.replay = capture, replay
        self.graphs: OrderedDict[tuple, _Entry] = OrderedDict()
        self.seen: OrderedDict[tuple, None] = OrderedDict()  # keys called once
        self.failure: str | None = None  # why a capture failed: none is tried again
        self.lock = threading.Lock()

    def resize(self, size: int):
        with self.lock:
            self.size = size
            self._trim()

    def clear(self):
        with self.lock:
            self.graphs.clear()
            self.seen.clear()
            self.failure = None

    def _trim(self):
        if len(self.graphs) > self.size:
            cs.cuda.synchronize()  # no replay of a graph to drop may still be running
        while len(self.graphs) > self.size:
            self.graphs.popitem(last=False)
        while len(self.seen) > 4 * self.size:
            self.seen.popitem(last=False)

    def run(self, key, run, loop: Loop, stream, T, B, sizes, lengths, arrays) -> str | None:
        """Run the loop through its graph: 'replayed'; or capture it, on the key's second call:
        'captured' (this call ran uncaptured on the graph's buffers); or None, for the caller
        to run it uncaptured (a first call, or after a capture that failed)."""
        with self.lock:
            entry = self.graphs.get(key)
            if entry is not None:
                self.graphs.move_to_end(key)
            elif self.failure is not None:
                return None
            elif key not in self.seen:
                self.seen[key] = None
                self._trim()
                return None
        if entry is None:
            self._record(key, run, loop, stream, T, B, sizes, lengths, arrays)
            return "captured"
        self._copy_in(entry, loop, stream, lengths, arrays)
        self.replay(entry.graph, stream)
        self._copy_out(entry, loop, stream, arrays)
        return "replayed"

    def _record(self, key, run, loop, stream, T, B, sizes, lengths, arrays):
        entry = _Entry(tuple(cs.empty(a.shape, a.dtype, stream) for a in arrays),
                       cs.cuda.device_array(lengths.shape, lengths.dtype), ())
        entry.mats = tuple(cs.gemm_operand(entry.arrays[i]) for i in loop.index(loop.gemm))
        self._copy_in(entry, loop, stream, lengths, arrays)
        # uncaptured first: this call's result, and every kernel compiled before the capture
        run(stream, T, B, sizes, entry.lengths, entry.arrays, entry.mats)
        try:
            entry.graph = self.capture(
                lambda on: run(on, T, B, sizes, entry.lengths, entry.arrays, entry.mats))
        except Exception as exc:  # the loop still ran, uncaptured: its result stands
            self.failure = f"a capture failed: {type(exc).__name__}: {exc}"
            warnings.warn(f"rnndsl: the time loop could not be captured as a CUDA graph "
                          f"({type(exc).__name__}: {exc}); from now on every time loop runs "
                          "uncaptured", stacklevel=3)
            self._copy_out(entry, loop, stream, arrays)
            return
        self._copy_out(entry, loop, stream, arrays)
        with self.lock:
            self.seen.pop(key, None)
            self.graphs[key] = entry
            self._trim()

    @staticmethod
    def _copy_in(entry, loop, stream, lengths, arrays):
        cs.copy(entry.lengths, lengths, stream)
        for i, name in enumerate(loop.arrays):
            if name not in loop.fresh:
                cs.copy(entry.arrays[i], arrays[i], stream)

    @staticmethod
    def _copy_out(entry, loop, stream, arrays):
        for i in loop.index(loop.results):
            cs.copy(arrays[i], entry.arrays[i], stream)


_CACHE = GraphCache(_size_from_environment())


def graph_cache_size() -> int:
    return _CACHE.size


def set_graph_cache_size(size: int) -> None:
    """Keep at most `size` captured time loops (0: capture none, run every loop uncaptured)."""
    if size < 0:
        raise ValueError(f"the graph cache size must be 0 or more, got {size}")
    _CACHE.resize(size)


def clear_graph_cache() -> None:
    """Drop every captured loop and its buffers."""
    _CACHE.clear()


def _device() -> int:
    import torch

    return torch.cuda.current_device()


def time_loop(run, loop: Loop, stream: cs.Stream, T: int, B: int, sizes: tuple, lengths,
              arrays: tuple) -> str:
    """Run a generated time loop (`run(stream, T, B, sizes, lengths, arrays, mats)`) through
    a CUDA graph where one can be captured, else directly. Returns how it ran: 'replayed',
    'captured' or 'uncaptured' (also kept in `last_run`, per thread)."""
    how = None
    if T > 0 and why_not() is None and all(a.is_c_contiguous() for a in arrays):
        key = (run, T, B, sizes, _device(), tuple((a.shape, str(a.dtype)) for a in arrays))
        how = _CACHE.run(key, run, loop, stream, T, B, sizes, lengths, arrays)
    if how is None:
        run(stream, T, B, sizes, lengths, arrays,
            tuple(cs.gemm_operand(arrays[i]) for i in loop.index(loop.gemm)))
        how = "uncaptured"
    _last.run = how
    return how


_last = threading.local()


def last_run() -> str | None:
    """How this thread's last time loop ran (time_loop's answer), None before any."""
    return getattr(_last, "run", None)
