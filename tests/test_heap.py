"""backend/heap.py: after keep_freed_memory, a loop that allocates and frees the same arrays
every step (as a training step does) stops faulting their pages in again."""
import os
import platform
import subprocess
import sys

import pytest

# Five 3 MB arrays written and freed, 20 times; the page faults after the first time. Each
# case in a fresh process: glibc's own thresholds depend on what the process freed before.
STEPS = """
import resource, sys
import numpy as np
from rnndsl.backend.heap import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
elif sys.argv[1] != "default":  # a cell on that target made first
    import rnndsl
    rnndsl.compile("elman", target=sys.argv[1])

def step():
    arrays = [np.empty(3 << 20, np.uint8) for _ in range(5)]
    for a in arrays:
        a.fill(1)

step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", STEPS, mode], capture_output=True, text=True,
                         env=env, check=True)
    return int(out.stdout.strip())


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt only")
def test_freed_arrays_are_reused_without_page_faults():
    default, kept = _faults("default"), _faults("keep")
    # by default the heap's top goes back to the system and 15 MB of pages return each step
    assert default > 20 * 3000, default
    assert kept < 500, kept


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt only")
def test_a_cpu_cell_keeps_freed_memory_for_its_passes():
    """Its passes allocate outputs, buffers and tape afresh, as a training step does."""
    assert _faults("cpu") < 500
    assert _faults("reference") > 20 * 3000  # NumPy's engine leaves malloc as it is
