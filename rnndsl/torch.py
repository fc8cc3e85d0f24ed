"""PyTorch bridge: any rnndsl cell as one opaque torch op, and a module shaped like nn.LSTM.

Install with `pip install rnndsl[torch]`. This is the only rnndsl module that imports torch.

Three layers, each usable on its own:

* `rnndsl::cell_forward` / `rnndsl::cell_backward`: `torch.library` custom ops over a compiled
  cell's forward and backward pass (one layer, one direction, the whole sequence), with an
  autograd formula and fake (meta) implementations, so `torch.compile` sees one opaque op
  and no graph break. A custom op has a fixed schema of tensors, so a cell's variable set
  of parameters, inputs and states travels as three `Tensor[]` lists in the order the cell
  declares them (`cell.params`, `cell.inputs`, `cell.states`), and the cell itself as a
  string key into a per-process registry (`register`): the spec's name, the engine and a
  hash of its equations, so the same spec gives the same key in every process.
  Tensors reach the NumPy kernels without copies (`detach().numpy()` of contiguous CPU
  tensors) and come back through `torch.from_numpy`.
* `cell_apply(cell, params, x, state0, lengths)`: that op called from Python.
* `RNN(spec, input_size, hidden_size, ...)`: an `nn.Module` shaped like `nn.LSTM`, `nn.GRU`
  and `nn.RNN` (after the spec, nn.LSTM's arguments in nn.LSTM's order); layers, both
  directions, dropout between layers, `lengths` and `PackedSequence` are done in torch around
  the per-layer op. `RNN.from_torch(module)` loads an `nn.LSTM`/`nn.GRU`/`nn.RNN` (or their
  cells), `to_torch()` exports back, and the state dict of a spec with a torch twin has
  torch's keys; `from_checkpoint`/`to_checkpoint` convert training checkpoints.

What the backward op needs from the forward pass (the engine's record: states, gate
values) is kept in a per-process table of tapes, keyed by an integer "tape handle" that
the forward op returns as a 0-d int64 tensor and autograd saves for backward; the entry is
dropped when that handle tensor is freed (after backward, or at once when no graph is
recorded). If the tape is gone when backward runs (the handle was copied somewhere),
backward recomputes the forward pass from its inputs, which it also receives: the results
never depend on the table, only the speed does.
"""
from __future__ import annotations

import functools
import hashlib
import itertools
import json
import numbers
import os
import re
import weakref
from contextlib import ExitStack, contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from rnndsl import compiler
from rnndsl.backend.blas import blas_threads, gemm_through
from rnndsl.backend.openmp_team import loaded_team
from rnndsl.backend.row_threads import loops_on
from rnndsl.engines.cell import Cell
from rnndsl.engines.tree import TreeBatch, TreeCell

__all__ = ["RNN", "TreeRNN", "cell_apply", "tree_apply", "register", "set_kernel_threads",
           "TORCH_LAYOUT", "LSTM_PROJ_YAML"]

# -- the cell registry ------------------------------------------------------------------------
_CELLS: dict[str, Cell] = {}
_KEYS: "weakref.WeakKeyDictionary[Cell, str]" = weakref.WeakKeyDictionary()


def cell_key(cell: Cell) -> str:
    """A string naming what a cell computes: its name, its engine and a hash of its equations,
    declarations and parameter shapes (not of its parameter inits, which do not matter here)."""
    what = repr((cell.name, cell.engine.name, cell.sizes, cell.inputs, cell.states, cell.outputs,
                 {p: info.shape for p, info in cell.params.items()}, cell.step.equations()))
    return f"{cell.name}-{cell.engine.name}-{hashlib.sha1(what.encode()).hexdigest()[:16]}"


def register(cell: Cell) -> str:
    """Make a cell callable through the custom ops; returns its key."""
    key = _KEYS.get(cell)
    if key is None:
        key = _KEYS[cell] = cell_key(cell)
        _CELLS.setdefault(key, cell)
    return key


def _cell(key: str) -> Cell:
    try:
        return _CELLS[key]
    except KeyError:
        raise RuntimeError(f"rnndsl: no cell registered under '{key}' in this process; build "
                           "the module (or call rnndsl.torch.register) first") from None


# -- tapes: the forward pass's record, kept for backward ---------------------------------------
_TAPES: dict[int, object] = {}
_TAPE_IDS = itertools.count(1)


def _keep_tape(fwd) -> Tensor:
    tape_id = next(_TAPE_IDS)
    handle = torch.tensor(tape_id, dtype=torch.int64)
    _TAPES[tape_id] = fwd
    weakref.finalize(handle, _TAPES.pop, tape_id, None)
    return handle


# -- threads ------------------------------------------------------------------------------------
# After each of its operations, torch's OpenMP threads keep spinning for a while; a
# multi-threaded BLAS in the kernels then fights them for the cores (a training step of a
# 2-layer bidirectional LSTM ran 2.3x slower than nn.LSTM on 2 cores, against 0.7x with the
# kernels' BLAS on one thread), and so does a thread of the time loops' own pool (no gain from
# a second one). So while torch has a pool of its own, the ops' GEMMs go to torch.mm, the
# kernels' BLAS keeps one thread, and the time loops' chunks of rows run on torch's team
# itself (openmp_team.py), unless `set_kernel_threads` says otherwise.
_KERNEL_THREADS: list[int | None] = [None]


def set_kernel_threads(n: int | None) -> None:
    """Threads of the kernels' BLAS and time loops while the ops run them: a number (every GEMM
    then in the kernels' BLAS, the loops on rnndsl's own threads), or None (the default):
    while torch.get_num_threads() > 1, the GEMMs on torch.mm, the BLAS on one thread and the
    loops on torch's OpenMP team; else the BLAS's own setting."""
    if n is not None and n < 1:
        raise ValueError(f"threads must be at least 1, got {n}")
    _KERNEL_THREADS[0] = n


@contextmanager
def _kernel_threads():
    wanted = _KERNEL_THREADS[0]
    to_torch = wanted is None and torch.get_num_threads() > 1
    if to_torch:
        wanted = 1
    before = blas_threads() if wanted is not None else None
    with ExitStack() as stack:
        if to_torch:  # the GEMMs outside the time loops on torch's pool, already running
            stack.enter_context(gemm_through(_torch_gemm))
            team = _torch_team()
            if team is not None:  # and the time loops' chunks on its threads
                stack.enter_context(loops_on(team.run, torch.get_num_threads()))
        if before is not None and before != wanted:
            blas_threads(wanted)
            stack.callback(blas_threads, before)
        yield


@functools.cache
def _torch_team():
    """The OpenMP team that torch's CPU operations run on, where rnndsl can reach it."""
    if "ATen parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return None
    return loaded_team(os.path.join(os.path.dirname(torch.__file__), "lib"))


def _torch_gemm(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return torch.mm(torch.from_numpy(a), torch.from_numpy(b)).numpy()


# -- tensors <-> the engines' arrays ------------------------------------------------------------
# CPU tensors run on the cell's own target; CUDA tensors on the CUDA target, compiled once per
# cell from the same plan, with the tensors' memory handed to the kernels and the results handed
# back as tensors, without copies. Everything the op enqueues (kernels, copies, GEMMs, and the
# CUDA graphs of the time loops) goes to torch's current stream on the tensors' device, as
# torch's own ops do.
_CUDA_TWINS: dict[str, Cell] = {}


def _device_cell(key: str, device: torch.device) -> Cell:
    cell = _cell(key)
    if device.type == "cpu" or cell.engine.name == "cuda":
        return cell
    if device.type != "cuda":
        raise RuntimeError(f"rnndsl's kernels run on the CPU and on CUDA GPUs; got a tensor on "
                           f"'{device}'")
    twin = _CUDA_TWINS.get(key)
    if twin is None:
        try:
            twin = _CUDA_TWINS[key] = compiler.retarget(cell, "cuda")
        except ImportError as exc:
            raise RuntimeError(f"CUDA tensors run on rnndsl's CUDA target, which cannot load "
                               f"here ({exc}): pip install 'rnndsl[cuda]'") from None
    return twin


def _array(t: Tensor):
    """What an engine takes for a tensor: a NumPy view of a CPU tensor, a device array over a
    CUDA tensor's memory (a copy only where the tensor is not contiguous)."""
    t = t.detach().contiguous()
    if t.device.type == "cuda":
        from rnndsl.backend import cuda_support as cs
        return cs.device(t)
    if t.device.type != "cpu":
        raise RuntimeError(f"rnndsl's kernels run on the CPU and on CUDA GPUs; got a tensor on "
                           f"'{t.device}'")
    return t.numpy()


def _tensor(a, like: Tensor, dtype=None, fresh: bool = False) -> Tensor:
    """An engine's result as a tensor on `like`'s device, over the result's memory (a device
    array of a CUDA cell run on CPU tensors comes back to the host). `fresh` for small results
    that alias an engine's larger buffers: a copy owning its memory."""
    if like.device.type == "cuda":
        t = torch.as_tensor(a, device=like.device)
    else:
        if not isinstance(a, np.ndarray):
            from rnndsl.backend import cuda_support as cs
            a = cs.host(a)
        t = torch.from_numpy(np.asarray(a))
    if dtype is not None and t.dtype != dtype:
        return t.to(dtype)
    return t.clone() if fresh else t


@contextmanager
def _on_torch_stream(like: Tensor):
    """Within the block, the CUDA target works on `like`'s device, on torch's current stream."""
    if like.device.type != "cuda":
        yield
        return
    from rnndsl.backend import cuda_support as cs

    with cs.on_device(like.device.index), torch.cuda.device(like.device), \
            cs.on_stream(torch.cuda.current_stream(like.device).cuda_stream):
        yield


def _named(cell: Cell, params, xs, state0):
    return (dict(zip(cell.params, map(_array, params))), dict(zip(cell.inputs, map(_array, xs))),
            dict(zip(cell.states, map(_array, state0))))


def _sizes(cell: Cell, params, xs, state0) -> dict:
    sizes = {}
    for (p, info), t in zip(cell.params.items(), params):
        sizes.update(zip(info.shape, t.shape))
    for (x, size), t in zip(cell.inputs.items(), xs):
        sizes[size] = t.shape[2]
    for (s, size), t in zip(cell.states.items(), state0):
        sizes[size] = t.shape[-1]
    return sizes


def _width(cell: Cell, name: str, sizes: dict):
    shape = cell.step.shape_of(name)
    return sizes[shape[0]] if shape else 1


# -- the custom ops -----------------------------------------------------------------------------
# Each op's body is a plain function as well: eagerly, outside torch.compile, tracing and
# torch.func's transforms, `_run_cell` calls the bodies through a plain autograd.Function
# (`_EagerCell`), the same arithmetic without the custom op's dispatch, which cost about
# 0.2 ms a forward and backward on this project's machine (a tiny LSTM: 1.0 -> 0.8 ms).
def _forward_body(key: str, params: list[Tensor], xs: list[Tensor], state0: list[Tensor],
                  lengths: Tensor) -> list[Tensor]:
    """Run a registered cell over a whole sequence. Returns its output sequences (T, B, n) in
    `cell.outputs` order, its final states (B, n) in `cell.states` order, and a tape handle."""
    return _pass(key, params, xs, state0, lengths, save=True)


def _pass(key, params, xs, state0, lengths, save: bool) -> list[Tensor]:
    """The forward pass; without `save`, the inference kernels (no tape) and a handle that
    names no tape (a backward, which nothing will ask for, would recompute it)."""
    x = xs[0]
    cell = _device_cell(key, x.device)
    with _kernel_threads(), _on_torch_stream(x):
        fwd = cell.forward(*_named(cell, params, xs, state0), lengths=_array(lengths),
                           save=save)
    outs = [_tensor(fwd.outputs[o], x) for o in cell.outputs]
    # Final states may be views into the engine's saved history: copy them (they are small)
    # so that changing them in place cannot change the tape.
    finals = [_tensor(fwd.states[s], x, fresh=True) for s in cell.states]
    return [*outs, *finals, _keep_tape(fwd) if save else torch.zeros((), dtype=torch.int64)]


cell_forward = torch.library.custom_op("rnndsl::cell_forward", mutates_args=())(_forward_body)


@cell_forward.register_fake
def _cell_forward_fake(key, params, xs, state0, lengths):
    cell = _cell(key)
    sizes = _sizes(cell, params, xs, state0)
    T, B = xs[0].shape[0], xs[0].shape[1]
    x = xs[0]
    outs = [x.new_empty((T, B, _width(cell, o, sizes))) for o in cell.outputs]
    finals = [x.new_empty((B, sizes[size])) for size in cell.states.values()]
    return [*outs, *finals, torch.empty((), dtype=torch.int64)]  # the tape handle: on the CPU


def _backward_body(key: str, params: list[Tensor], xs: list[Tensor], state0: list[Tensor],
                   lengths: Tensor, tape: Tensor, d_outputs: list[Tensor],
                   d_finals: list[Tensor], input_grads: bool = True) -> list[Tensor]:
    """Gradients of a loss w.r.t. the parameters, inputs and initial states of a registered
    cell, given its gradients w.r.t. the output sequences and the final states. With
    `input_grads` false (no input needs one) the inputs' gradients are zeros, not computed."""
    like = xs[0]
    cell = _device_cell(key, like.device)
    p, x, s0 = _named(cell, params, xs, state0)
    fwd = _TAPES.get(int(tape))
    with _kernel_threads(), _on_torch_stream(like):
        if fwd is None:  # the tape is gone: recompute it
            fwd = cell.forward(p, x, s0, lengths=_array(lengths))
        g = cell.backward(p, fwd, dict(zip(cell.outputs, map(_array, d_outputs))),
                          dict(zip(cell.states, map(_array, d_finals))), input_grads)
    return [*(_tensor(g.params[n], like, like.dtype) for n in cell.params),
            *(_tensor(g.inputs[n], like, like.dtype) if input_grads else torch.zeros_like(x)
              for n, x in zip(cell.inputs, xs)),
            *(_tensor(g.state0[n], like, fresh=True) for n in cell.states)]


cell_backward = torch.library.custom_op("rnndsl::cell_backward", mutates_args=())(_backward_body)


@cell_backward.register_fake
def _cell_backward_fake(key, params, xs, state0, lengths, tape, d_outputs, d_finals,
                        input_grads=True):
    return [torch.empty_like(t) for t in (*params, *xs, *state0)]


def _setup_context(ctx, inputs, output):
    key, params, xs, state0, lengths = inputs
    ctx.key = key
    ctx.counts = (len(params), len(xs), len(state0))
    ctx.save_for_backward(*params, *xs, *state0, lengths, output[-1])


def _gradients(ctx, grads, want_dx: bool, backward) -> tuple[list, list, list]:
    """The op's gradients (params, inputs or Nones, initial states) from the outputs' `grads`,
    through `backward` (the op or its body)."""
    n_p, n_x, n_s = ctx.counts
    saved = ctx.saved_tensors
    params, xs = list(saved[:n_p]), list(saved[n_p:n_p + n_x])
    state0, (lengths, tape) = list(saved[n_p + n_x:n_p + n_x + n_s]), saved[-2:]
    n_o = len(grads) - n_s - 1
    d = backward(ctx.key, params, xs, state0, lengths, tape,
                 [g.contiguous() for g in grads[:n_o]],
                 [g.contiguous() for g in grads[n_o:n_o + n_s]], want_dx)
    return d[:n_p], (d[n_p:n_p + n_x] if want_dx else [None] * n_x), d[n_p + n_x:]


def _backward(ctx, grads):
    want_dx = any(ctx.needs_input_grad[2])  # a first layer's input is data
    return (None, *_gradients(ctx, grads, want_dx, cell_backward), None)


cell_forward.register_autograd(_backward, setup_context=_setup_context)


class _EagerCell(torch.autograd.Function):
    """The op and its autograd formula, eagerly: apply(key, counts, lengths, *params, *xs,
    *state0) returns what the op returns."""

    @staticmethod
    def forward(ctx, key, counts, lengths, *tensors):
        n_p, n_x, _ = counts
        params, xs = list(tensors[:n_p]), list(tensors[n_p:n_p + n_x])
        out = _forward_body(key, params, xs, list(tensors[n_p + n_x:]), lengths)
        ctx.key, ctx.counts = key, counts
        ctx.save_for_backward(*tensors, lengths, out[-1])
        ctx.mark_non_differentiable(out[-1])
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads):
        n_p, n_x, _ = ctx.counts
        want_dx = any(ctx.needs_input_grad[3 + n_p:3 + n_p + n_x])
        d_params, d_xs, d_state0 = _gradients(ctx, grads, want_dx, _backward_body)
        d = [*d_params, *d_xs, *d_state0]
        anchors = [t for t in ctx.saved_tensors if t.requires_grad]
        if torch.is_grad_enabled() and anchors:  # create_graph=True: see _NoSecondDerivative
            present = [k for k, t in enumerate(d) if t is not None]
            for k, t in zip(present, _NoSecondDerivative.apply(anchors[0],
                                                                *(d[k] for k in present))):
                d[k] = t
        return (None, None, None, *d)


class _NoSecondDerivative(torch.autograd.Function):
    """The gradients a cell's backward returns, as they are, tied to its inputs so that
    differentiating them again raises (as the custom op does, whose backward has no autograd
    formula) instead of counting the cell's second derivative as zero."""

    @staticmethod
    def forward(ctx, anchor, *grads):
        return tuple(g.view_as(g) for g in grads)

    @staticmethod
    def backward(ctx, *_):
        raise RuntimeError("rnndsl's cells have no second derivative: double backward "
                           "(differentiating a gradient taken with create_graph=True "
                           "through a cell) is not supported")


# Whether torch.func's transforms (vmap, grad, ...) are running; where this torch cannot say,
# assume they are (the custom op is right either way).
_transforms_active = getattr(torch._C, "_are_functorch_transforms_active", lambda: True)


def _run_cell(key: str, params: list[Tensor], xs: list[Tensor], state0: list[Tensor],
              lengths: Tensor) -> list[Tensor]:
    """torch.ops.rnndsl.cell_forward(...), through `_EagerCell` where nothing traces it, and
    by the inference kernels where no gradient will be asked for."""
    tensors = (*params, *xs, *state0)
    if (torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.jit.is_scripting()
            or _transforms_active()
            or any(type(t) not in (Tensor, nn.Parameter) for t in tensors)):
        return torch.ops.rnndsl.cell_forward(key, params, xs, state0, lengths)
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)):
        return _pass(key, params, xs, state0, lengths, save=False)
    return list(_EagerCell.apply(key, (len(params), len(xs), len(state0)), lengths, *tensors))


def cell_apply(cell: Cell | str, params, x, state0=None, lengths=None):
    """One layer, one direction: run `cell` (a Cell or a registered key) over `x` (T, B, n)
    (a list in `cell.inputs` order if it has several inputs). `params`: a dict by name or a
    list in `cell.params` order; `state0`: None, a dict, or a list in `cell.states` order.
    Returns (outputs, final states), each a dict by name. Differentiable."""
    key = cell if isinstance(cell, str) else register(cell)
    cell = _cell(key)
    params = [params[p] for p in cell.params] if isinstance(params, dict) else list(params)
    xs = list(x) if isinstance(x, (list, tuple)) else [x]
    T, B = xs[0].shape[0], xs[0].shape[1]
    sizes = _sizes(cell, params, xs, [])
    if state0 is None:
        state0 = {}
    if isinstance(state0, dict):
        state0 = [state0[s] if s in state0 else xs[0].new_zeros((B, sizes[size]))
                  for s, size in cell.states.items()]
    if lengths is None:
        lengths = torch.full((B,), T, dtype=torch.int64)
    else:
        lengths = torch.as_tensor(lengths, dtype=torch.int64, device="cpu")
    res = _run_cell(key, params, xs, list(state0), lengths)
    n_o = len(cell.outputs)
    return dict(zip(cell.outputs, res[:n_o])), dict(zip(cell.states, res[n_o:-1]))


# -- ONNX: torch.onnx.export of a model that runs these ops -------------------------------------
ONNX_DOMAIN = "rnndsl"


def onnx_translation_table() -> dict:
    """The translation of rnndsl's op for PyTorch's ONNX exporter:
    `torch.onnx.export(model, args, path, dynamo=True,
    custom_translation_table=rnndsl.torch.onnx_translation_table())`. Each cell (per sizes and
    dtype) becomes a model-local ONNX function of domain `rnndsl` whose body is one `Scan` over
    time (rnndsl's ONNX target), so the model runs in ONNX Runtime with nothing of rnndsl."""
    return {torch.ops.rnndsl.cell_forward.default: _onnx_cell_forward}


def _onnx_cell_forward(key, params, xs, state0, lengths):
    import onnx_ir
    import onnxscript

    from rnndsl.backend.onnx_export import cell_function

    cell = _cell(key)
    sizes = {k: int(n) for k, n in _sizes(cell, params, xs, state0).items()}
    dtype = (params or xs)[0].dtype.numpy()
    signature = json.dumps([key, sorted(sizes.items()), dtype.str])
    name = f"{re.sub(r'[^A-Za-z0-9]', '_', cell.name)}_" \
           f"{hashlib.sha256(signature.encode()).hexdigest()[:12]}"
    tracer = onnxscript.evaluator.default()
    if not isinstance(getattr(tracer, "functions", None), dict):  # another exporter's tracer
        raise RuntimeError("rnndsl's ONNX translation runs inside torch.onnx.export(..., "
                           "dynamo=True) of torch 2.9 or later")
    function = cell_function(cell.step, sizes, dtype, ONNX_DOMAIN, name)
    tracer.functions[(ONNX_DOMAIN, name, "")] = onnx_ir.serde.deserialize_function(function)
    call = onnxscript.values.Op(onnxscript.values.Opset(ONNX_DOMAIN, 1), name,
                                _schema(function, (params or xs)[0].dtype))
    return call(*params, *xs, *state0, lengths)


def _schema(function, elem):
    """The signature of a cell's ONNX function, for the exporter's tracer: its float inputs
    and outputs, int64 lengths and tape."""
    from onnx.defs import OpSchema

    def parameter(name: str):
        return OpSchema.FormalParameter(name, "tensor(int64)" if name in ("lengths", "tape")
                                        else f"tensor({elem.name.lower()})")

    return OpSchema(function.name, function.domain, 1,
                    inputs=[parameter(n) for n in function.input],
                    outputs=[parameter(n) for n in function.output])


# -- torch's own recurrent modules --------------------------------------------------------------
# nn.LSTM(proj_size=P) as a spec: the hidden state is projected, h = W_hr @ (o * tanh(c)), so h
# has P features and c has `hidden`; the recurrent weights read the projected h.
LSTM_PROJ_YAML = """
name: lstm_proj
summary: LSTM with a projected hidden state (Sak et al. 2014), as torch.nn.LSTM(proj_size=...)
sizes: [input, hidden, proj]
inputs: {x: input}
states: {h: proj, c: hidden}
outputs: [h]
equations: |
  i = sigmoid(W_ii @ x + b_ii + W_hi @ h_prev + b_hi)
  f = sigmoid(W_if @ x + b_if + W_hf @ h_prev + b_hf)
  g = tanh(W_ig @ x + b_ig + W_hg @ h_prev + b_hg)
  o = sigmoid(W_io @ x + b_io + W_ho @ h_prev + b_ho)
  c = f * c_prev + i * g
  h = W_hr @ (o * tanh(c))
"""

_LSTM_LAYOUT = {"weight_ih": ("W_ii", "W_if", "W_ig", "W_io"),
                "weight_hh": ("W_hi", "W_hf", "W_hg", "W_ho"),
                "bias_ih": ("b_ii", "b_if", "b_ig", "b_io"),
                "bias_hh": ("b_hi", "b_hf", "b_hg", "b_ho")}
_ELMAN_LAYOUT = {"weight_ih": ("W_ih",), "weight_hh": ("W_hh",), "bias_ih": ("b_ih",),
                 "bias_hh": ("b_hh",)}
# spec name -> (torch class, nonlinearity, {torch weight kind: spec parameters, block by block})
# in the order of torch's parameters.
TORCH_LAYOUT = {
    "lstm": (nn.LSTM, None, _LSTM_LAYOUT),
    "lstm_proj": (nn.LSTM, None, {**_LSTM_LAYOUT, "weight_hr": ("W_hr",)}),
    "gru": (nn.GRU, None, {
        "weight_ih": ("W_ir", "W_iz", "W_in"), "weight_hh": ("W_hr", "W_hz", "W_hn"),
        "bias_ih": ("b_ir", "b_iz", "b_in"), "bias_hh": ("b_hr", "b_hz", "b_hn")}),
    "elman": (nn.RNN, "tanh", _ELMAN_LAYOUT),
    "elman_relu": (nn.RNN, "relu", _ELMAN_LAYOUT),
}
_ONE_STEP = (nn.LSTMCell, nn.GRUCell, nn.RNNCell)  # torch's single-step cells: one layer


def _torch_kind(module: nn.Module) -> str:
    """Which entry of TORCH_LAYOUT a torch module (nn.LSTM, nn.GRU, nn.RNN or their cells) is."""
    if isinstance(module, nn.LSTM):
        return "lstm_proj" if module.proj_size else "lstm"
    if isinstance(module, (nn.GRU, nn.GRUCell)):
        return "gru"
    if isinstance(module, nn.LSTMCell):
        return "lstm"
    if isinstance(module, (nn.RNN, nn.RNNCell)):
        return "elman" if module.nonlinearity == "tanh" else "elman_relu"
    raise TypeError("expected an nn.LSTM, nn.GRU, nn.RNN, nn.LSTMCell, nn.GRUCell or nn.RNNCell, "
                    f"got {type(module).__name__}")


def is_bias(name: str) -> bool:
    """What `bias=False` removes: parameters named `b` or `b_...`."""
    return name == "b" or name.startswith("b_")


class _Params(nn.Module):
    """One layer and direction's parameters, under the spec's names."""

    def __init__(self, cell: Cell, shapes: dict, bias: bool, dtype, device):
        super().__init__()
        for p in cell.params:
            t = torch.zeros(shapes[p], dtype=dtype, device=device)
            if bias or not is_bias(p):
                setattr(self, p, nn.Parameter(t))
            else:  # held at zero, as nn.LSTM(bias=False) has no bias
                self.register_buffer(p, t, persistent=False)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the kernels run in for parameters of `dtype`: half and bfloat16 are computed
    in float32 (and cast back, gradients included), as the kernels exist for float32 and
    float64 only."""
    if dtype in (torch.float32, torch.float64):
        return dtype
    if dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    raise TypeError(f"rnndsl computes in float32 or float64 (half and bfloat16 through "
                    f"float32); got {dtype}")


def _check_dropout(dropout) -> float:
    if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) \
            or not 0 <= dropout <= 1:
        raise ValueError(f"dropout must be a number in [0, 1], got {dropout!r} (the positional "
                         "order is nn.LSTM's: input_size, hidden_size, num_layers, bias, "
                         "batch_first, dropout, bidirectional, proj_size)")
    return float(dropout)


# -- the module ---------------------------------------------------------------------------------
class RNN(nn.Module):
    """A recurrent layer stack built from any spec, shaped like `nn.LSTM` / `nn.GRU` / `nn.RNN`.

    `RNN(spec, input_size, hidden_size, num_layers=1, bias=True, batch_first=False,
    dropout=0.0, bidirectional=False, proj_size=0, *, sizes=None, target=None, device=None,
    dtype=None)`: the spec comes first, then nn.LSTM's arguments in nn.LSTM's order, so
    `RNN("lstm", *args, **kwargs)` is `nn.LSTM(*args, **kwargs)`.
    `spec`: a path, a built-in name ('lstm') or YAML text, or a compiled Cell. The size of
    the cell's input is `input_size` (for layer 0; later layers take the previous layer's
    output, both directions concatenated), the size named `hidden` (else the first state's
    size) is `hidden_size`, `proj_size` is the size named `proj` (for the spec 'lstm' it selects
    `LSTM_PROJ_YAML`, nn.LSTM's projected LSTM); any other size comes from `sizes={name: n}`.

    `forward(input, hx=None, lengths=None)`: input (T, B, I), (B, T, I) with batch_first,
    (T, I) unbatched, or a PackedSequence. `hx`: for a cell with one state a tensor
    (layers*dirs, B, n), else a tuple of them in the spec's state order (for the LSTM spec:
    (h0, c0), as nn.LSTM). Returns (output, final states) in the same layouts, where output
    is the cell's first output sequence of the last layer (both directions concatenated).
    With `lengths` (B,) or a PackedSequence, each sequence stops at its length: its final
    state is the one at its last step, outputs past it are zero, and the reverse direction
    reads each sequence from its own last step, exactly as torch's modules do. float16 and
    bfloat16 modules compute in float32 and return (and take gradients in) their own dtype.

    Parameters are `nn.Parameter`s under the spec's names: `l0.W_hi`, `l1_reverse.b_ii`.
    `bias=False` holds every parameter named `b` or `b_...` at zero (not trained). For a spec
    with a torch twin (exactly the parameters of a TORCH_LAYOUT entry: lstm, lstm_proj, gru,
    elman, elman_relu), `state_dict()` has torch's keys and stacked blocks (`weight_ih_l0`,
    `bias_hh_l1_reverse`), so nn.LSTM loads it, and `load_state_dict` takes torch's keys or
    the spec's names.
    """

    def __init__(self, spec, input_size: int, hidden_size: int, num_layers: int = 1,
                 bias: bool = True, batch_first: bool = False, dropout: float = 0.0,
                 bidirectional: bool = False, proj_size: int = 0, *, sizes: dict | None = None,
                 target: str | None = None, device=None, dtype=None):
        super().__init__()
        if proj_size and isinstance(spec, str) and spec == "lstm":
            spec = LSTM_PROJ_YAML
        cell = spec if isinstance(spec, Cell) else (
            compiler.compile(spec) if target is None else compiler.compile(spec, target=target))
        if isinstance(cell, TreeCell):
            raise ValueError(f"'{cell.name}' is a tree cell; RNN runs sequences (use TreeRNN)")
        if len(cell.inputs) != 1:
            raise ValueError(f"RNN needs a cell with one input sequence; {cell.name} has "
                             f"{', '.join(cell.inputs)}")
        if num_layers < 1:
            raise ValueError("num_layers must be at least 1")
        self.dropout = _check_dropout(dropout)
        if proj_size < 0 or (proj_size and proj_size >= hidden_size):
            raise ValueError(f"proj_size must be 0 or less than hidden_size ({hidden_size}), "
                             f"got {proj_size}")
        extra_sizes = dict(sizes or {})
        if proj_size:
            if "proj" not in cell.sizes:
                raise ValueError(f"proj_size sets the size named 'proj', and {cell.name} has "
                                 f"none (sizes: {', '.join(cell.sizes)})")
            extra_sizes["proj"] = proj_size
        self.cell = cell
        self.key = register(cell)
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.bias, self.batch_first, self.bidirectional = bias, batch_first, bool(bidirectional)
        self.proj_size = proj_size
        self.num_directions = 2 if bidirectional else 1
        x_size = next(iter(cell.inputs.values()))
        h_size = cell.width_size
        self.extra_sizes = extra_sizes
        base = {**self.extra_sizes, h_size: hidden_size}
        out_shape = cell.step.shape_of(cell.outputs[0])
        out_size = base.get(out_shape[0]) if out_shape else 1
        if out_size is None:
            raise ValueError(f"the output '{cell.outputs[0]}' has size '{out_shape[0]}': "
                             "pass sizes={...}")
        self.output_size = out_size
        self.layer_sizes = []
        for layer in range(num_layers):
            n_in = input_size if layer == 0 else out_size * self.num_directions
            layer_sizes = {**base, x_size: n_in}
            missing = [s for s in cell.sizes if s not in layer_sizes]
            if missing:
                raise ValueError(f"{cell.name} needs size(s) {', '.join(missing)}: pass "
                                 "sizes={...}")
            self.layer_sizes.append(layer_sizes)
        dtype = dtype or torch.get_default_dtype()
        for layer in range(num_layers):
            shapes = cell.param_shapes(**self.layer_sizes[layer])
            for d in range(self.num_directions):
                self.add_module(self._name(layer, d), _Params(cell, shapes, bias, dtype, device))
        self.reset_parameters()
        self.twin = self._find_twin()
        if self.twin is not None:
            self.register_state_dict_post_hook(_state_dict_as_torch)
            self.register_load_state_dict_pre_hook(_load_torch_state_dict)

    # -- parameters ---------------------------------------------------------------------------
    @staticmethod
    def _name(layer: int, direction: int) -> str:
        return f"l{layer}{'_reverse' if direction else ''}"

    def layer_params(self, layer: int, direction: int = 0) -> list[Tensor]:
        """That layer and direction's parameters (and zero biases), in `cell.params` order."""
        mod = getattr(self, self._name(layer, direction))
        return [getattr(mod, p) for p in self.cell.params]

    def reset_parameters(self) -> None:
        """Each parameter's init from the spec (PyTorch's default U(-1/sqrt(hidden), ..) unless
        the spec says otherwise), seeded from torch's random generator."""
        with torch.no_grad():
            for layer in range(self.num_layers):
                for d in range(self.num_directions):
                    seed = int(torch.randint(0, 2**62, ()))
                    arrays = self.cell.init_params(seed=seed, dtype=np.float64,
                                                   **self.layer_sizes[layer])
                    mod = getattr(self, self._name(layer, d))
                    for p, a in arrays.items():
                        t = getattr(mod, p)
                        if isinstance(t, nn.Parameter):
                            t.copy_(torch.from_numpy(a))

    def flatten_parameters(self) -> None:
        """Nothing to do (here for code written for nn.LSTM on cuDNN)."""

    def extra_repr(self) -> str:
        s = f"{self.cell.name}, {self.input_size}, {self.hidden_size}"
        if self.num_layers != 1:
            s += f", num_layers={self.num_layers}"
        for k, default in (("bias", True), ("batch_first", False), ("dropout", 0.0),
                           ("bidirectional", False), ("proj_size", 0)):
            if getattr(self, k) != default:
                s += f", {k}={getattr(self, k)}"
        return s

    # -- running ------------------------------------------------------------------------------
    def forward(self, input, hx=None, lengths=None):
        packed = isinstance(input, PackedSequence)
        if packed:
            if lengths is not None:
                raise ValueError("a PackedSequence carries its own lengths")
            x, lengths = _unpack(input)  # (T, B, I), batch in the caller's order
        else:
            x = input.transpose(0, 1) if self.batch_first and input.dim() == 3 else input
        unbatched = x.dim() == 2
        if unbatched:
            x = x.unsqueeze(1)
        if x.dim() != 3 or x.shape[2] != self.input_size:
            raise ValueError(f"expected input (T, B, {self.input_size}), got {tuple(x.shape)}")
        first = self.layer_params(0)[0] if self.cell.params else x
        for what, t in (("the input is", x), ("the parameters are", first)):
            if t.device.type not in ("cpu", "cuda"):
                raise RuntimeError(
                    f"rnndsl.torch.RNN runs its kernels on the CPU or a CUDA GPU, and {what} "
                    f"on '{t.device}'" + (" (a module made on the meta device needs "
                                          "to_empty(device=...) and reset_parameters() first)"
                                          if t.device.type == "meta" else ""))
        if x.device != first.device:
            raise RuntimeError(f"the input is on '{x.device}' and the parameters on "
                               f"'{first.device}'")
        dtype = first.dtype
        if x.dtype != dtype:
            raise TypeError(f"input is {x.dtype} but the parameters are {dtype}")
        compute = _compute_dtype(dtype)
        T, B = x.shape[0], x.shape[1]
        states = self._initial_states(hx, B, x, unbatched)
        if lengths is None:
            lengths = torch.full((B,), T, dtype=torch.int64)
            flip = None
        else:
            lengths = torch.as_tensor(lengths, dtype=torch.int64, device="cpu")
            flip = _reversal_index(lengths, T).to(x.device)
        n_o = len(self.cell.outputs)
        finals = [[] for _ in self.cell.states]
        layer_in = x.to(compute)
        for layer in range(self.num_layers):
            outs = []
            for d in range(self.num_directions):
                i = layer * self.num_directions + d
                seq = layer_in if d == 0 else _reverse(layer_in, flip)
                res = _run_cell(
                    self.key, [p.to(compute) for p in self.layer_params(layer, d)],
                    [seq.contiguous()], [s[i].to(compute) for s in states], lengths)
                outs.append(res[0] if d == 0 else _reverse(res[0], flip))
                for k in range(len(finals)):
                    finals[k].append(res[n_o + k])
            layer_in = outs[0] if len(outs) == 1 else torch.cat(outs, 2)
            if self.dropout and self.training and layer < self.num_layers - 1:
                layer_in = F.dropout(layer_in, self.dropout, True)
        output = layer_in.to(dtype)
        h_n = [torch.stack(f, 0).to(dtype) for f in finals]
        if unbatched:
            output, h_n = output.squeeze(1), [h.squeeze(1) for h in h_n]
        if packed:
            output = _repack(output, lengths, input)
        elif self.batch_first and not unbatched:
            output = output.transpose(0, 1)
        return output, (h_n[0] if len(h_n) == 1 else tuple(h_n))

    def _initial_states(self, hx, B: int, x: Tensor, unbatched: bool) -> list[Tensor]:
        n_states = len(self.cell.states)
        LD = self.num_layers * self.num_directions
        shapes = [(LD, B, self.layer_sizes[-1][size]) for size in self.cell.states.values()]
        if hx is None:
            return [x.new_zeros(shape) for shape in shapes]
        hx = [hx] if isinstance(hx, Tensor) else list(hx)
        if len(hx) != n_states:
            raise ValueError(f"{self.cell.name} has {n_states} state(s) "
                             f"({', '.join(self.cell.states)}); got {len(hx)} initial state(s)")
        if unbatched:
            hx = [h.unsqueeze(1) for h in hx]
        for h, shape, s in zip(hx, shapes, self.cell.states):
            if tuple(h.shape) != shape:
                raise ValueError(f"initial state '{s}' must be {shape}, got {tuple(h.shape)}")
            if h.dtype != x.dtype:
                raise TypeError(f"initial state '{s}' is {h.dtype} but the input is {x.dtype}")
        return hx

    # -- torch's modules ----------------------------------------------------------------------
    @classmethod
    def from_torch(cls, module: nn.Module, spec=None, target: str | None = None) -> "RNN":
        """An RNN with the weights of `module`: an nn.LSTM (also with proj_size), nn.GRU or
        nn.RNN (every layer, both directions, both biases), or one of their single-step cells
        nn.LSTMCell, nn.GRUCell, nn.RNNCell (one layer). `spec` defaults to the spec of that
        module ('lstm', LSTM_PROJ_YAML, 'gru', 'elman', 'elman_relu'); a variant spec with the
        same parameter names (plus others, which keep their init) loads them too."""
        kind = _torch_kind(module)
        if spec is None:
            spec = "lstm" if kind == "lstm_proj" else kind
        w = module.weight_ih if isinstance(module, _ONE_STEP) else module.weight_ih_l0
        m = cls(spec, module.input_size, module.hidden_size, getattr(module, "num_layers", 1),
                module.bias, getattr(module, "batch_first", False),
                getattr(module, "dropout", 0.0), getattr(module, "bidirectional", False),
                getattr(module, "proj_size", 0), target=target, dtype=w.dtype, device=w.device)
        m.load_torch_weights(module)
        return m

    def load_torch_weights(self, module: nn.Module) -> None:
        """Copy the weights of an nn.LSTM / nn.GRU / nn.RNN (or their cells) of the same shape
        into this module."""
        kind = _torch_kind(module)
        one_step = isinstance(module, _ONE_STEP)
        if one_step and (self.num_layers, self.num_directions) != (1, 1):
            raise ValueError(f"{type(module).__name__} is one layer in one direction; this "
                             f"module has {self.num_layers} layer(s), {self.num_directions} "
                             "direction(s)")
        with torch.no_grad():
            for attr, names, layer, d in self._layout(kind, module.bias):
                src = getattr(module, attr.rsplit("_l", 1)[0] if one_step else attr)
                for name, block in zip(names, src.chunk(len(names), 0)):
                    dst = getattr(getattr(self, self._name(layer, d)), name, None)
                    if dst is None:
                        raise ValueError(f"the spec '{self.cell.name}' has no parameter '{name}' "
                                         f"for {attr} of {type(module).__name__}")
                    if dst.shape != block.shape:
                        raise ValueError(f"{self._name(layer, d)}.{name} is {tuple(dst.shape)} "
                                         f"but {attr} gives {tuple(block.shape)}")
                    dst.copy_(block)

    def to_torch(self) -> nn.Module:
        """The nn.LSTM / nn.GRU / nn.RNN with this module's weights (for a spec with a torch
        twin: see `torch_kind`)."""
        kind = self.torch_kind()
        cls, nonlinearity, _ = TORCH_LAYOUT[kind]
        w = self.layer_params(0)[0]
        kw = {"nonlinearity": nonlinearity} if nonlinearity else {}
        if kind == "lstm_proj":
            kw["proj_size"] = self.extra_sizes["proj"]
        module = cls(self.input_size, self.hidden_size, self.num_layers, self.bias,
                     self.batch_first, self.dropout, self.bidirectional, dtype=w.dtype,
                     device=w.device, **kw)
        module.load_state_dict(self.state_dict())
        return module

    def torch_kind(self) -> str:
        """Which of torch's cells this module's spec is (a key of TORCH_LAYOUT): the one whose
        parameters are exactly the spec's (for Elman with tanh or ReLU, also by the name)."""
        if self.twin is None:
            raise ValueError(f"the spec '{self.cell.name}' is not one of torch's cells "
                             f"({', '.join(TORCH_LAYOUT)})")
        return self.twin

    def _find_twin(self) -> str | None:
        for kind, (_, _, layout) in TORCH_LAYOUT.items():
            names = {n for block in layout.values() for n in block}
            if set(self.cell.params) == names and (self.cell.name == kind or kind not in
                                                   ("elman", "elman_relu")):
                return kind
        return None

    def _layout(self, kind: str, bias: bool):
        """(torch attribute, spec parameters block by block, layer, direction)."""
        _, _, layout = TORCH_LAYOUT[kind]
        for layer in range(self.num_layers):
            for d in range(self.num_directions):
                for base, names in layout.items():
                    if bias or not base.startswith("bias"):
                        yield f"{base}_l{layer}{'_reverse' if d else ''}", names, layer, d

    # -- training checkpoints -----------------------------------------------------------------
    @classmethod
    def from_checkpoint(cls, path, target: str | None = None) -> "RNN":
        """The recurrent network of a training checkpoint (`rnndsl train --save`) as a module:
        its spec, hidden size, layers and weights (`param/layer{l}.fwd.*` -> `l{l}.*`,
        `.bwd.` -> `l{l}_reverse.*`), in the checkpoint's dtype. The task's head is not part
        of it. Networks with residual or dense connections, or the 'separate' and 'alternate'
        bidirectional modes, have no nn.LSTM shape and are refused."""
        config, params = _read_checkpoint(path)
        bidirectional = config.get("bidirectional")
        unsupported = [f"{k}={config.get(k)!r}" for k in ("residual", "dense")
                       if config.get(k)]
        if bidirectional not in (None, "concat"):
            unsupported.append(f"bidirectional={bidirectional!r}")
        if unsupported:
            raise ValueError(f"{path}: a network with {', '.join(unsupported)} has no "
                             "nn.LSTM-shaped equivalent")
        cell = compiler.compile(config["spec"]) if target is None else \
            compiler.compile(config["spec"], target=target)
        x_size = next(iter(cell.inputs.values()))
        input_size = _size_from(cell, params, "layer0.fwd.", x_size, path)
        hidden = config["hidden"]
        sizes = {s: hidden for s in cell.sizes if s not in (x_size, "hidden")}
        m = cls(cell, input_size, hidden, config["layers"], bidirectional=bool(bidirectional),
                sizes=sizes, dtype=getattr(torch, config.get("dtype", "float32")))
        with torch.no_grad():
            for key, dst in m._checkpoint_names():
                if key not in params:
                    raise ValueError(f"{path}: no array param/{key}")
                dst.copy_(torch.from_numpy(params[key]))
        return m

    def to_checkpoint(self, path, template) -> None:
        """Write a training checkpoint: `template` (a checkpoint of the same network, from
        `rnndsl train --save`) with this module's weights in place of its network's, every
        other entry (head, optimizer state, step, settings) kept, so `rnndsl train --resume`
        continues from these weights. Written whole, then renamed into place."""
        with np.load(Path(template), allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
        for key, src in self._checkpoint_names():
            old = arrays.get(f"param/{key}")
            if old is None or old.shape != tuple(src.shape):
                raise ValueError(f"{template}: param/{key} is "
                                 f"{'missing' if old is None else tuple(old.shape)}, this "
                                 f"module's is {tuple(src.shape)}")
            arrays[f"param/{key}"] = src.detach().cpu().numpy().astype(old.dtype)
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, **arrays)
        tmp.replace(path)

    def _checkpoint_names(self):
        """(name in a training checkpoint, this module's parameter) for every parameter."""
        for layer in range(self.num_layers):
            for d in range(self.num_directions):
                mod = getattr(self, self._name(layer, d))
                for p in self.cell.params:
                    t = getattr(mod, p)
                    if isinstance(t, nn.Parameter):
                        yield f"layer{layer}.{'bwd' if d else 'fwd'}.{p}", t


def _read_checkpoint(path) -> tuple[dict, dict]:
    try:
        with np.load(Path(path), allow_pickle=False) as data:
            config = json.loads(str(data["config"]))
            params = {k.removeprefix("param/"): data[k] for k in data.files
                      if k.startswith("param/")}
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"{path}: not a readable training checkpoint ({exc})") from None
    return config, params


def _size_from(cell: Cell, params: dict, prefix: str, size: str, path) -> int:
    """The value of `size` in the checkpoint, read off a parameter's shape."""
    for p, info in cell.params.items():
        if size in info.shape and prefix + p in params:
            return params[prefix + p].shape[info.shape.index(size)]
    raise ValueError(f"{path}: no parameter of {prefix} tells the size '{size}'")


# -- state dicts in torch's layout ------------------------------------------------------------
def _state_dict_as_torch(module: RNN, state_dict, prefix: str, local_metadata) -> None:
    """The spec's names of a torch twin stacked into torch's parameters, in torch's order."""
    for attr, names, layer, d in module._layout(module.twin, module.bias):
        keys = [f"{prefix}{module._name(layer, d)}.{n}" for n in names]
        state_dict[prefix + attr] = torch.cat([state_dict.pop(k) for k in keys], 0)


def _load_torch_state_dict(module: RNN, state_dict, prefix: str, *_) -> None:
    """torch's stacked parameters split into the spec's names (keys already under the spec's
    names load as they are)."""
    for attr, names, layer, d in module._layout(module.twin, module.bias):
        stacked = state_dict.pop(prefix + attr, None)
        if stacked is not None:
            for n, block in zip(names, stacked.chunk(len(names), 0)):
                state_dict[f"{prefix}{module._name(layer, d)}.{n}"] = block


def _reversal_index(lengths: Tensor, T: int) -> Tensor:
    """idx[t, b]: where step t of sequence b's reversal reads from (its own length honoured;
    padding stays where it is). Its own inverse."""
    t = torch.arange(T, dtype=torch.int64)[:, None]
    return torch.where(t < lengths[None, :], lengths[None, :] - 1 - t, t)


def _reverse(x: Tensor, index: Tensor | None) -> Tensor:
    if index is None:
        return x.flip(0)
    return x.gather(0, index[:, :, None].expand(-1, -1, x.shape[2]))


# PackedSequence <-> padded (T, B, n), without pack_padded_sequence / pad_packed_sequence, which
# torch.compile does not trace: packed data is time-major with each step's live sequences in
# sorted order, so every padded row's place in it is a running count of live rows. Shapes stay
# those of the input, so a compiled model neither breaks its graph nor recompiles.
def _packed_places(packed: PackedSequence) -> tuple[Tensor, Tensor]:
    """(lengths in sorted order (B,), each padded row's row in packed.data, or a spare row
    past its end for padding (T*B,))."""
    batch_sizes = packed.batch_sizes
    B = packed.sorted_indices.shape[0]
    lengths = (batch_sizes[:, None] > torch.arange(B)[None, :]).sum(0)
    live = (torch.arange(batch_sizes.shape[0])[:, None] < lengths[None, :]).reshape(-1)
    return lengths, torch.where(live, torch.cumsum(live, 0) - 1, packed.data.shape[0])


def _unpack(packed: PackedSequence) -> tuple[Tensor, Tensor]:
    """(padded (T, B, n) in the caller's batch order, lengths (B,))."""
    if packed.sorted_indices is None:  # packed from sorted input: B is a value, not a shape
        return pad_packed_sequence(packed)
    lengths, place = _packed_places(packed)  # on the CPU, as batch_sizes
    data = torch.cat([packed.data, packed.data.new_zeros((1, packed.data.shape[1]))])
    padded = data.index_select(0, place.to(data.device)).reshape(
        packed.batch_sizes.shape[0], -1, packed.data.shape[1])
    return (padded.index_select(1, packed.unsorted_indices),
            lengths.index_select(0, packed.unsorted_indices.cpu()))


def _repack(output: Tensor, lengths: Tensor, like: PackedSequence) -> PackedSequence:
    """Pack `output` (T, B, n) with the batch order and batch sizes of the input `like`."""
    if like.sorted_indices is None:
        data = pack_padded_sequence(output, lengths, enforce_sorted=True).data
    else:
        _, place = _packed_places(like)
        T, B, n = output.shape
        rows = like.data.shape[0]
        flat = output.index_select(1, like.sorted_indices).reshape(T * B, n)
        data = output.new_zeros((rows + 1, n)).index_put((place.to(output.device),), flat)[:rows]
    return PackedSequence(data, like.batch_sizes, like.sorted_indices, like.unsorted_indices)


# -- tree cells ---------------------------------------------------------------------------------
class _TreeFunction(torch.autograd.Function):
    """A tree cell over a batch of trees as one autograd node: the inputs (N, n) and the
    parameters in, every node's outputs out; backward runs the cell's levels from the roots.
    The levels' gathers and sums are NumPy work, so the tensors are CPU tensors."""

    @staticmethod
    def forward(ctx, cell: TreeCell, batch: TreeBatch, x: Tensor, *params: Tensor):
        with _kernel_threads():
            fwd = cell.forward(dict(zip(cell.params, map(_host, params))),
                               batch.with_inputs(_host(x)), save=any(ctx.needs_input_grad))
        ctx.cell, ctx.fwd = cell, fwd
        ctx.save_for_backward(x, *params)
        return tuple(_tensor(fwd.outputs[o], x, fresh=True) for o in cell.outputs)

    @staticmethod
    def backward(ctx, *d_outputs):
        cell = ctx.cell
        x, *saved = ctx.saved_tensors
        params = dict(zip(cell.params, map(_host, saved)))
        given = {o: _host(d) for o, d in zip(cell.outputs, d_outputs) if d is not None}
        with _kernel_threads():
            grads = cell.backward(params, ctx.fwd, given)
        ctx.fwd = None  # the tape is used once
        d_x = _tensor(grads.inputs[next(iter(cell.inputs))], x)
        return (None, None, d_x, *(_tensor(grads.params[p], x) for p in cell.params))


def _host(t: Tensor) -> np.ndarray:
    if t.device.type != "cpu":
        raise RuntimeError(f"tree cells run on CPU tensors; got a tensor on '{t.device}'")
    return _array(t)


def tree_apply(cell: TreeCell, params: list[Tensor], batch: TreeBatch, x: Tensor | None = None
               ) -> tuple[Tensor, ...]:
    """A tree cell over `batch` with autograd: `params` in the order of `cell.params`, `x` the
    (N, n) inputs (the batch's own when None). Returns every node's outputs, (N, n) each, in
    the order of `cell.outputs`."""
    if x is None:
        x = torch.from_numpy(np.asarray(batch.inputs, dtype=_host(params[0]).dtype))
    return _TreeFunction.apply(cell, batch, x, *params)


class TreeRNN(nn.Module):
    """A tree cell (a spec with `structure: tree`) as a module: `forward(batch, x=None)` gives
    every node's first output (N, hidden) and each tree's root (trees, hidden). `x` (N, input)
    replaces the batch's inputs, so that gradients reach, say, an embedding layer."""

    def __init__(self, spec, input_size: int, hidden_size: int, seed: int = 0,
                 dtype: torch.dtype = torch.float32, target: str = "cpu"):
        super().__init__()
        self.cell = spec if isinstance(spec, TreeCell) else compiler.compile(spec, target=target)
        if not isinstance(self.cell, TreeCell):
            raise ValueError(f"'{self.cell.name}' is a sequence cell; TreeRNN runs tree cells "
                             "(use RNN)")
        sizes = {s: {"input": input_size, "hidden": hidden_size}.get(s) for s in self.cell.sizes}
        missing = [s for s, n in sizes.items() if n is None]
        if missing:
            raise ValueError(f"{self.cell.name} has sizes {', '.join(missing)} beside input and "
                             "hidden, which TreeRNN cannot tell")
        init = self.cell.init_params(seed=seed, dtype=np.float64, **sizes)
        self.weights = nn.ParameterDict({p: nn.Parameter(torch.tensor(v, dtype=dtype))
                                         for p, v in init.items()})

    def forward(self, batch: TreeBatch, x: Tensor | None = None) -> tuple[Tensor, Tensor]:
        params = [self.weights[p] for p in self.cell.params]
        if x is not None and x.dtype != params[0].dtype:
            x = x.to(params[0].dtype)
        outputs = tree_apply(self.cell, params, batch, x)
        return outputs[0], outputs[0][torch.from_numpy(batch.roots)]

