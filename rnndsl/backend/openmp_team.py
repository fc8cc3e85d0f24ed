"""Tasks run on the threads of an OpenMP runtime that the process has already loaded.

PyTorch's CPU operations run on a team of OpenMP threads, and after each operation the team's
idle threads spin, waiting for the next one, for milliseconds. Any other thread that wants a
core meanwhile (the time loops' second chunk of rows, on a pool of rnndsl's own) shares it with
a spinning one, and gains nothing. Handing the chunk to the spinning thread itself does: a
parallel region started through `GOMP_parallel`, the entry point a compiler emits for
`#pragma omp parallel` (GNU OpenMP's, which LLVM's and Intel's runtimes also export), runs on
the calling thread's team, the one torch's operations use. Each team thread calls back into
Python, takes its tasks, and runs them; the kernels release the GIL, so the tasks overlap.
"""
from __future__ import annotations

import ctypes
import os
import sys
from typing import Callable

_REGION = ctypes.CFUNCTYPE(None, ctypes.c_void_p)  # void (*)(void *), a region's body
_RUNTIMES = ("libgomp", "libiomp5", "libomp")


class OpenMPTeam:
    """The parallel regions of one OpenMP runtime (a ctypes library)."""

    def __init__(self, lib: ctypes.CDLL):
        self._parallel = lib.GOMP_parallel  # (body, data, threads, flags)
        self._parallel.argtypes = [_REGION, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
        self._parallel.restype = None
        self._thread_num, self._num_threads = lib.omp_get_thread_num, lib.omp_get_num_threads
        self._thread_num.restype = self._num_threads.restype = ctypes.c_int

    def run(self, tasks: list[Callable[[], None]]) -> None:
        """Run every task, on up to len(tasks) threads of the calling thread's team, and return
        when all are done; the first exception a task raised is raised here."""
        errors: list[BaseException] = []

        def body(_data):
            try:  # the runtime may give fewer threads than asked: each takes every n-th task
                for k in range(self._thread_num(), len(tasks), max(1, self._num_threads())):
                    tasks[k]()
            except BaseException as exc:  # noqa: BLE001 (a callback cannot raise into C)
                errors.append(exc)

        self._parallel(_REGION(body), None, len(tasks), 0)  # releases the GIL while it waits
        if errors:
            raise errors[0]


def loaded_team(directory: str) -> OpenMPTeam | None:
    """The team of the OpenMP runtime loaded from `directory` (a package's bundled libraries),
    or None where none is loaded from there or this system cannot say (not Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    directory = os.path.realpath(directory)
    try:
        with open("/proc/self/maps") as maps:
            fields = [line.split(maxsplit=5) for line in maps]
    except OSError:
        return None
    paths = {f[5].strip() for f in fields if len(f) == 6 and f[5].startswith("/")}
    for path in sorted(paths):
        if (os.path.dirname(path) == directory
                and os.path.basename(path).startswith(_RUNTIMES)):
            lib = ctypes.CDLL(path)  # already loaded: the same library, not a second copy
            if hasattr(lib, "GOMP_parallel") and hasattr(lib, "omp_get_thread_num"):
                return OpenMPTeam(lib)
    return None
