"""Stage 8, runtime: a compiled cell run over batches of sequences from Python.

`Cell` is what `rnndsl.compile` returns. Arrays are NumPy, time-major: inputs (T, B, n),
states (B, n), outputs (T, B, n). Sizes are read off the parameter and input arrays.
The work itself is done by an engine: the generated Numba kernels (`cpu`) or the NumPy
reference interpreter (`reference`); both take and give the same arrays.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import reference
from .grad import Backward
from .ir import StepIR

DTYPES = (np.float32, np.float64)


@dataclass
class Forward:
    """What a forward pass returns, and keeps for its backward pass."""

    outputs: dict[str, np.ndarray]  # name -> (T, B, n)
    states: dict[str, np.ndarray]  # final states, name -> (B, n)
    tape: object = field(repr=False, default=None)

    @property
    def output(self) -> np.ndarray:
        """The first (often only) output sequence."""
        return next(iter(self.outputs.values()))


@dataclass
class Grads:
    params: dict[str, np.ndarray]
    inputs: dict[str, np.ndarray]  # name -> (T, B, n)
    state0: dict[str, np.ndarray]  # gradient w.r.t. the initial states, name -> (B, n)


@dataclass
class _Tape:
    xs: dict
    state0: dict
    lengths: np.ndarray
    sizes: dict
    dtype: np.dtype
    saved: object  # the engine's own record of the forward pass


class ReferenceEngine:
    """The NumPy interpreter of the IR (slow; the oracle)."""

    name = "reference"

    def __init__(self, step: StepIR, bwd: Backward):
        self.step, self.bwd = step, bwd

    def forward(self, params, xs, state0, lengths, sizes, dtype):
        outs, finals, history = reference.forward(self.step, params, xs, state0, lengths,
                                                  sizes, dtype)
        return outs, finals, history

    def backward(self, params, tape: _Tape, d_outputs, d_final):
        return reference.backward(self.bwd, params, tape.xs, tape.saved, tape.lengths,
                                  d_outputs, d_final, tape.sizes, tape.dtype)


class Cell:
    """A compiled recurrent cell: its IR, its derived backward pass, and an engine to run them."""

    def __init__(self, step: StepIR, bwd: Backward, engine, plan=None):
        self.step = step
        self.backward_ir = bwd
        self.engine = engine
        self.plan = plan

    # -- what the cell is ---------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.step.name

    @property
    def sizes(self) -> tuple[str, ...]:
        return self.step.sizes

    @property
    def inputs(self) -> dict[str, str]:
        return self.step.inputs

    @property
    def states(self) -> dict[str, str]:
        return self.step.states

    @property
    def outputs(self) -> tuple[str, ...]:
        return self.step.outputs

    @property
    def params(self) -> dict:
        """name -> ParamInfo (shape as size names, init, where it was declared or inferred)."""
        return self.step.params

    def __repr__(self) -> str:
        return f"<rnndsl.Cell {self.name} ({self.engine.name})>"

    def param_shapes(self, **sizes: int) -> dict[str, tuple[int, ...]]:
        return {p: tuple(sizes[s] for s in info.shape) for p, info in self.params.items()}

    # -- parameters ---------------------------------------------------------------------------
    def init_params(self, *sizes_in_order: int, seed: int = 0, dtype=np.float32,
                    **sizes: int) -> dict[str, np.ndarray]:
        """Fresh parameters. Sizes by name (`hidden=64`) or in the spec's order
        (`init_params(input, hidden)`). Each parameter's `init` from the spec: `uniform`
        (PyTorch's default, U(-k, k) with k = 1/sqrt(hidden), or 1/sqrt(rows) without a size
        named hidden), `zeros`, `ones`, `orthogonal` (matrices) or a constant."""
        dtype = _dtype(dtype)
        if len(sizes_in_order) > len(self.sizes):
            raise TypeError(f"{self.name} has {len(self.sizes)} sizes: {', '.join(self.sizes)}")
        sizes = {**dict(zip(self.sizes, sizes_in_order)), **sizes}
        missing = [s for s in self.sizes if s not in sizes]
        if missing:
            raise TypeError(f"init_params needs the size(s) {', '.join(missing)} of {self.name}")
        rng = np.random.default_rng(seed)
        out = {}
        for p, info in self.params.items():
            shape = tuple(sizes[s] for s in info.shape)
            out[p] = init_array(info.init, info.value, shape, sizes.get("hidden"), rng, p)
        return {p: v.astype(dtype) for p, v in out.items()}

    # -- running --------------------------------------------------------------------------------
    def forward(self, params: dict, x, state0: dict | None = None, lengths=None) -> Forward:
        """Run the cell over `x` (T, B, n) (a dict when the cell has several inputs), from
        `state0` (zeros by default), with optional per-sequence `lengths` (B,)."""
        xs = x if isinstance(x, dict) else {self._only_input(): x}
        dtype = _common_dtype(params, xs)
        params = {p: np.ascontiguousarray(v, dtype=dtype) for p, v in params.items()}
        xs = {k: np.ascontiguousarray(v, dtype=dtype) for k, v in xs.items()}
        self._check_names(params, xs)
        T, B = next(iter(xs.values())).shape[:2]
        sizes = self._sizes(params, xs, state0)
        state0 = {s: (np.zeros((B, sizes[size]), dtype) if not state0 or s not in state0
                      else np.ascontiguousarray(state0[s], dtype=dtype))
                  for s, size in self.states.items()}
        for s, v in state0.items():
            if v.shape != (B, sizes[self.states[s]]):
                raise ValueError(f"state0['{s}'] has shape {v.shape}, expected "
                                 f"{(B, sizes[self.states[s]])}")
        lengths = _lengths(lengths, T, B)
        outs, finals, saved = self.engine.forward(params, xs, state0, lengths, sizes, dtype)
        return Forward(outs, finals, _Tape(xs, state0, lengths, sizes, dtype, saved))

    def backward(self, params: dict, fwd: Forward, d_outputs=None, d_states=None) -> Grads:
        """Gradients of a loss given its gradient w.r.t. the output sequences (`d_outputs`, an
        array for the first output or a dict) and w.r.t. the final states (`d_states`)."""
        tape: _Tape = fwd.tape
        dtype = tape.dtype
        params = {p: np.ascontiguousarray(v, dtype=dtype) for p, v in params.items()}
        if d_outputs is None:
            d_outputs = {}
        elif not isinstance(d_outputs, dict):
            d_outputs = {self.outputs[0]: d_outputs}
        d_outputs = {o: np.ascontiguousarray(g, dtype=dtype) for o, g in d_outputs.items()}
        for o, g in d_outputs.items():
            if o not in fwd.outputs or g.shape != fwd.outputs[o].shape:
                raise ValueError(f"d_outputs['{o}']: expected an output of shape "
                                 f"{fwd.outputs[o].shape if o in fwd.outputs else '?'}")
        for o in self.outputs:
            if o not in self.states and o not in d_outputs:
                d_outputs[o] = np.zeros_like(fwd.outputs[o])
        d_final = {s: (np.ascontiguousarray(d_states[s], dtype=dtype) if d_states and s in d_states
                       else np.zeros_like(fwd.states[s])) for s in self.states}
        d_params, d_inputs, d_state0 = self.engine.backward(params, tape, d_outputs, d_final)
        return Grads(d_params, d_inputs, d_state0)

    # -- helpers --------------------------------------------------------------------------------
    def _only_input(self) -> str:
        if len(self.inputs) != 1:
            raise TypeError(f"{self.name} has inputs {', '.join(self.inputs)}: pass a dict")
        return next(iter(self.inputs))

    def _check_names(self, params, xs):
        missing = [p for p in self.params if p not in params]
        extra = [p for p in params if p not in self.params]
        if missing or extra:
            raise ValueError(f"parameters of {self.name}: missing {missing or 'none'}, "
                             f"unknown {extra or 'none'}")
        if set(xs) != set(self.inputs):
            raise ValueError(f"{self.name} takes inputs {list(self.inputs)}, got {list(xs)}")
        for k, v in xs.items():
            if v.ndim != 3:
                raise ValueError(f"input '{k}' must be (T, B, n), got shape {v.shape}")

    def _sizes(self, params, xs, state0) -> dict[str, int]:
        """Size values read off the arrays; a disagreement is an error naming both places."""
        found: dict[str, tuple[int, str]] = {}

        def see(size: str, value: int, where: str):
            if size in found and found[size][0] != value:
                raise ValueError(f"size '{size}' is {found[size][0]} from {found[size][1]} but "
                                 f"{value} from {where}")
            found.setdefault(size, (value, where))

        for x, v in xs.items():
            see(self.inputs[x], v.shape[2], f"input '{x}'")
        for p, info in self.params.items():
            if len(info.shape) != params[p].ndim:
                raise ValueError(f"parameter '{p}' must have {len(info.shape)} dimension(s) "
                                 f"({', '.join(info.shape)}), got shape {params[p].shape}")
            for s, n in zip(info.shape, params[p].shape):
                see(s, n, f"parameter '{p}'")
        for s, v in (state0 or {}).items():
            if s in self.states:
                see(self.states[s], np.shape(v)[-1], f"state0['{s}']")
        missing = [s for s in self.sizes if s not in found]
        if missing:
            raise ValueError(f"cannot tell size(s) {missing} from the arrays given")
        return {s: v for s, (v, _) in found.items()}


def init_array(kind: str, value: float, shape, hidden: int | None, rng, name: str) -> np.ndarray:
    if kind == "zeros":
        return np.zeros(shape)
    if kind == "ones":
        return np.ones(shape)
    if kind == "constant":
        return np.full(shape, value)
    if kind == "orthogonal":
        if len(shape) != 2:
            raise ValueError(f"orthogonal init needs a matrix; '{name}' has shape {shape}")
        rows, cols = shape
        a = rng.standard_normal((max(rows, cols), min(rows, cols)))
        q, r = np.linalg.qr(a)
        q *= np.sign(np.diag(r))  # a uniformly distributed orthogonal matrix
        return q if rows >= cols else q.T
    fan = hidden if hidden is not None else (shape[0] if shape else 1)
    k = 1.0 / np.sqrt(fan)
    return rng.uniform(-k, k, size=shape)


def _dtype(dtype) -> np.dtype:
    dt = np.dtype(dtype)
    if dt.type not in DTYPES:
        raise TypeError(f"dtype must be float32 or float64, got {dt}")
    return dt


def _common_dtype(params: dict, xs: dict) -> np.dtype:
    kinds = {np.asarray(v).dtype for v in [*params.values(), *xs.values()]}
    return np.dtype(np.float64) if np.dtype(np.float64) in kinds else np.dtype(np.float32)


def _lengths(lengths, T: int, B: int) -> np.ndarray:
    if lengths is None:
        return np.full(B, T, dtype=np.int64)
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.shape != (B,) or (lengths < 0).any() or (lengths > T).any():
        raise ValueError(f"lengths must be {B} integers in [0, {T}]")
    return lengths
