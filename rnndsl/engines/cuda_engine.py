"""The CUDA engine: the generated `@cuda.jit` module run behind the same forward/backward
contract as the CPU engine (runtime.CpuEngine).

Arrays may be host NumPy arrays (copied to the device, results copied back) or device arrays
(anything with `__cuda_array_interface__`: Numba device arrays, CuPy arrays, PyTorch CUDA
tensors), which are used without copies and give device arrays back (Numba's).

`persistent` chooses each pass's time loop: None the cheapest by the cost model of
cuda_support.COST (per-step launches, or a persistent kernel, one launch per pass, where its
recurrent weights fit in shared memory), True the cheapest persistent kernel (an error when
none fits), False the per-step launches, 'single-block' or 'multi-block' that persistent
kernel; a cell with block-diagonal parameters has no persistent kernel (None or False).
`last_variant` tells what each pass ran last ('per-step', 'single-block',
'multi-block') and `last_blocks` its grid (0 for per-step launches).

A cell with matrix values (a RowPlan) runs the row kernels of emit_rows.py instead, one GPU
thread per batch row running that row's whole time loop; its forward pass keeps matrix states
within `tape_budget` bytes, as on the cpu target. It has no persistent kernel to choose:
`persistent` may only be None or False, and `last_variant` says 'per-row'.

Every pass runs on the thread's current stream (`cuda_support.on_stream`; the default stream
unless set), which the generated code is given: the per-step launches, the persistent
kernels and every copy and GEMM.
"""
from __future__ import annotations

import numpy as np

from rnndsl.backend import emit_rows as rows
from rnndsl.backend.emit_rows import RowPlan
from rnndsl.symbolic.grad import Backward
from rnndsl.symbolic.ir import StepIR
from rnndsl.symbolic.rank2 import block_diagonal
from rnndsl.engines.cell import GeneratedEngine


MODES = {None: "auto", True: "forced", False: "disabled", "single-block": "single-block",
         "multi-block": "multi-block"}  # `persistent`, as the compile summary names it


class CudaEngine(GeneratedEngine):
    name = "cuda"

    def __init__(self, step: StepIR, bwd: Backward, plan, persistent: bool | str | None = None,
                 tape_budget: int | None = None):
        if persistent not in MODES:
            raise ValueError(f"persistent={persistent!r}: choose one of "
                             f"{', '.join(map(repr, MODES))}")
        super().__init__(step, bwd, plan)
        self.rows = isinstance(plan, RowPlan)
        if self.rows:
            if persistent not in (None, False):
                raise ValueError(f"persistent={persistent!r}: {step.name} has matrix values, "
                                 "whose CUDA kernels run one thread per batch row; there is no "
                                 "persistent kernel to choose (None or False)")
            rows.tape_budget(tape_budget)  # a bad value is refused now, not at the first pass
        elif persistent not in (None, False) and block_diagonal(step):
            from rnndsl.backend.emit_cuda import BLOCKS_RUN_PER_STEP

            raise ValueError(f"persistent={persistent!r}: {step.name} has block-diagonal "
                             f"parameters ({block_diagonal(step)}); {BLOCKS_RUN_PER_STEP} "
                             "(None or False)")
        self.persistent = persistent
        self.tape_budget = tape_budget
        self.last_blocks = {"forward": None, "backward": None}
        self.last_variant = {"forward": None, "backward": None}

    def emitter(self):
        if self.rows:
            return lambda plan, dtype, header: rows.emit_module(plan, dtype, header, "cuda")
        from rnndsl.backend.emit_cuda import emit_module
        return emit_module

    def describe(self) -> list[str]:
        """Summary lines: how the time loop runs on the GPU."""
        from rnndsl.backend.emit_cuda import persistent_rule

        if self.rows:
            return ["  CUDA     one thread per batch row, running that row's whole time loop "
                    "(the cpu target's row kernels' step code); weight gradients one GEMM after "
                    "the loop"]
        mode = MODES[self.persistent]
        return [f"  CUDA     persistent kernel {mode}: {persistent_rule(self.plan)}"]

    def array(self, v, dtype):
        """What Cell passes to this engine: device arrays as they are (their dtype must be the
        pass's dtype), anything else as a C-contiguous NumPy array."""
        from rnndsl.backend import cuda_support as cs

        if cs.is_device(v):
            if np.dtype(str(v.dtype).removeprefix("torch.")) != np.dtype(dtype):
                raise TypeError(f"a device array of {v.dtype} in a {np.dtype(dtype)} pass; "
                                "convert it on the device first")
            return v
        return np.asarray(v, dtype=dtype, order="C")

    # -- running ------------------------------------------------------------------------------
    def forward(self, params, xs, state0, lengths, sizes, dtype, save=True):
        # The forward of vector cells always keeps its tape: `save` only matters to the row
        # kernels (and to the CPU kernels).
        from rnndsl.backend import cuda_support as cs

        m = self.module(dtype)
        on_host = not any(cs.is_device(a) for a in [*params.values(), *xs.values()])
        dev = lambda a: cs.device(a, dtype)  # noqa: E731
        args = (tuple(dev(_one_element(params[p])) for p in self.step.params),
                tuple(dev(xs[x]) for x in self.step.inputs),
                tuple(dev(state0[s]) for s in self.step.states),
                cs.device(np.asarray(lengths, np.int64)), tuple(sizes[s] for s in self.step.sizes),
                cs.current_stream())
        if not self.rows:
            outs, finals, saved, (variant, blocks) = m.forward(*args, self.persistent)
        elif save:
            outs, finals, saved, (variant, blocks) = m.forward(
                *args, rows.tape_budget(self.tape_budget))
        else:
            outs, finals, (variant, blocks) = m.infer(*args)
            saved = None
        self.last_blocks["forward"], self.last_variant["forward"] = blocks, variant
        back = cs.host if on_host else (lambda a: a)
        return (dict(zip(self.step.outputs, map(back, outs))),
                dict(zip(self.step.states, map(back, finals))), (saved, on_host))

    def backward(self, params, tape, d_outputs, d_final, input_grads=True):
        from rnndsl.backend import cuda_support as cs

        m = self.module(tape.dtype)
        saved, on_host = tape.saved
        dtype = tape.dtype
        dev = lambda a: cs.device(a, dtype)  # noqa: E731
        T, B = next(iter(tape.xs.values())).shape[:2]
        douts = tuple(dev(d_outputs[o]) if o in d_outputs else
                      cs.zeros((T, B, *(tape.sizes[s] for s in self.step.shape_of(o))) or (T, B, 1),
                               dtype) for o in self.step.outputs)
        dp, dx, d0, (variant, blocks) = m.backward(
            tuple(dev(_one_element(params[p])) for p in self.step.params),
            tuple(dev(tape.xs[x]) for x in self.step.inputs),
            cs.device(np.asarray(tape.lengths, np.int64)),
            saved, douts, tuple(dev(d_final[s]) for s in self.step.states),
            tuple(tape.sizes[s] for s in self.step.sizes), cs.current_stream(),
            *(() if self.rows else (self.persistent,)), input_grads=input_grads)
        self.last_blocks["backward"], self.last_variant["backward"] = blocks, variant
        back = cs.host if on_host else (lambda a: a)
        dparams = {}
        for p, g in zip(self.step.params, dp):
            g = back(g)
            dparams[p] = g.reshape(()) if not self.step.params[p].shape and on_host else g
        return (dparams, dict(zip(self.step.inputs, map(back, dx))) if input_grads else {},
                dict(zip(self.step.states, map(back, d0))))


def _one_element(a):
    """Kernels read scalar parameters as one-element arrays."""
    if isinstance(a, (np.ndarray, np.generic, float, int)) and np.ndim(a) == 0:
        return np.reshape(a, 1)
    if getattr(a, "ndim", None) == 0:  # a 0-d device array
        return a.reshape(1)
    return a
