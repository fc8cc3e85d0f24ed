import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

LONG_CHECKS = "RNNDSL_LONG_CHECKS"
# "k/n" in a simulator subprocess of tests/test_cuda.py: it runs every n-th of its tests, from
# the k-th (test_cuda_kernels_in_simulator starts the n shards at once)
SIM_SHARD = "RNNDSL_SIM_SHARD"

# pytest-xdist runs a worker per core: each worker's kernels (BLAS and time loops) on one
# thread, or the workers and the simulator's subprocess oversubscribe the cores (in a run
# with the kernels' default of every core, the simulator's tests took 630 s against 330 s
# alone). Set before SciPy's OpenBLAS is loaded; the tests of several threads ask for them.
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


def pytest_addoption(parser):
    group = parser.getgroup("rnndsl")
    group.addoption("--fuzz-specs", type=int, default=12,
                    help="differential fuzzer: how many generated specs to run (default 12)")
    group.addoption("--fuzz-seconds", type=float, default=0.0,
                    help="differential fuzzer: stop after this long (default: no limit)")
    group.addoption("--fuzz-seed", type=int, default=0, help="differential fuzzer: first seed")
    group.addoption("--long", action="store_true",
                    help="the long checks too: every spec in every CUDA time-loop mode and "
                         "graph test in the simulator, the float32 kernels of the matrix-memory "
                         "cells (minutes of compiling each: their tests and the NTM benchmark's), "
                         "more front-end fuzzing")


def pytest_collection_modifyitems(config, items):
    shard = os.environ.get(SIM_SHARD)
    if not shard:
        return
    k, n = map(int, shard.split("/"))
    config.hook.pytest_deselected(items=[t for i, t in enumerate(items) if i % n != k])
    items[:] = [t for i, t in enumerate(items) if i % n == k]


def pytest_configure(config):
    # An environment variable, so the simulator's subprocess (tests/test_cuda.py) sees it too.
    if config.getoption("--long"):
        os.environ[LONG_CHECKS] = "1"
