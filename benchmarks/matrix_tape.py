"""The tape budget of cells with matrix-valued states (cpu target): peak memory and time of one
forward+backward pass when every step's matrix states are kept and when they are recomputed
from copies kept every k steps (budget 0), and a check that the gradients are identical.

Peak memory is what tracemalloc sees during the pass (NumPy registers its arrays with it: the
tape, the outputs, the gradients and the kernels' scratch arrays, all allocated by the
generated glue), after a warm-up pass that compiles the kernels.

    python benchmarks/matrix_tape.py                        # fast_weights, T=100 B=16 I=32 H=64
    python benchmarks/matrix_tape.py --spec delta_net -T 400 --budgets store 0
"""
from __future__ import annotations

import argparse
import time
import tracemalloc

import numpy as np

import rnndsl


def run(spec: str, budget: int | None, T: int, B: int, size: int):
    """(every, bytes of kept matrix states, peak traced bytes, seconds, parameter gradients)."""
    cell = rnndsl.compile(spec, tape_budget=budget)
    params = cell.init_params(dtype=np.float64, **{s: size for s in cell.sizes})
    rng = np.random.default_rng(0)
    x = {k: rng.standard_normal((T, B, size)) for k in cell.inputs}
    d_out = {o: rng.standard_normal((T, B, size)) for o in cell.outputs}
    cell.backward(params, cell.forward(params, x), d_out)  # compiles
    tracemalloc.start()
    start = time.perf_counter()
    fwd = cell.forward(params, x)
    grads = cell.backward(params, fwd, d_out)
    seconds = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    *kept, every = fwd.tape.saved
    matrices = [s for s, size_ in cell.states.items() if isinstance(size_, tuple)]
    kept_bytes = sum(a.nbytes for a in kept[-len(matrices):])
    return every, kept_bytes, peak, seconds, grads.params


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", default="fast_weights")
    ap.add_argument("-T", type=int, default=100)
    ap.add_argument("-B", type=int, default=16)
    ap.add_argument("--size", type=int, default=64, help="every size of the cell")
    ap.add_argument("--budgets", nargs="+", default=["store", "0"],
                    help="tape budgets in bytes ('store': large enough to keep every step; "
                         "any that is too small recomputes with the least memory)")
    args = ap.parse_args()
    first = None
    print(f"{args.spec}, T={args.T} B={args.B} sizes={args.size}, float64, forward+backward")
    for text in args.budgets:
        budget = 1 << 62 if text == "store" else int(text)
        every, kept, peak, seconds, grads = run(args.spec, budget, args.T, args.B, args.size)
        first = first or grads
        same = all(np.array_equal(grads[p], first[p]) for p in first)
        print(f"  budget {text:>10}: kept every {every:>3} steps, matrix tape "
              f"{kept / 2 ** 20:7.2f} MiB, peak traced {peak / 2 ** 20:7.2f} MiB, "
              f"{seconds * 1e3:7.1f} ms, gradients identical to the first: {same}")


if __name__ == "__main__":
    main()
