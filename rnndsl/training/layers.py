"""Networks of compiled cells: stacked layers, bidirectional, residual and dense connections.

`Network(cell, input_size, hidden, layers=1, bidirectional=None, residual=False, dense=None,
sizes=None)` runs a compiled cell with one input sequence as a multi-layer network over
time-major NumPy batches (T, B, n), and backpropagates through it by calling the cell's own
backward pass once per layer and direction.

Terms. A layer runs one cell per direction, `fwd` (and `bwd` when bidirectional). A cell's
output is its first output sequence; its width H is that output's size (`hidden`, or a size
given in `sizes`, as Jordan's `output`). A *stream* is what flows from layer to layer: each
layer reads its stream's input `u` and writes the stream's output `y`, of the same width W in
every layer. `hidden` sets the size named `hidden` (else the size of the cell's first state);
the cell's input size is `input_size` in layer 0 and whatever the stream carries above.

bidirectional
  None         one stream, one direction: y = out_fwd (W = H).
  "concat"     one stream, both directions read u: y = [out_fwd, out_bwd] (W = 2H), the next
               layer reads both, as torch.nn.LSTM(bidirectional=True).
  "separate"   two streams, `fwd` and `bwd`: a stack of forward cells and a stack of backward
               cells that never mix (W = H); the network output is [y_fwd, y_bwd] of the top.
  "alternate"  two streams that swap at every layer: layer l's fwd output is layer l+1's bwd
               input and its bwd output is layer l+1's fwd input; output [y_fwd, y_bwd] of the
               top layer.
  The bwd direction reads each sequence reversed within its own length (step t < L_b reads
  step L_b-1-t; padding stays in place), and its outputs are un-reversed the same way, so
  output step t of either direction belongs to input step t.

residual=True
  Every layer of every stream adds its input to its output: y = out + u, or y = out + u @ P.T
  where the widths differ (layer 0 when input_size != W; every layer under dense="concat"),
  P = `layer{l}.proj` (W, width of u), no bias. In "concat" mode the stream, and so the
  residual, is the concatenation of both directions.

dense
  Each stream of layer l > 0 reads the network input x and the outputs of all lower layers
  along its own path (in "alternate" mode the path zigzags between the streams, as the data
  does; in "separate" mode it stays in its stream). Layer 0 reads x alone.
  "concat"  u = [x, y_0, ..., y_{l-1}] concatenated (width input_size + l*W), as DenseNet.
  "add"     u = x @ Q.T + y_0 + ... + y_{l-1}: the layer outputs have width W already; x is
            projected by Q = `layer{l}.xproj` (W, input_size) only where input_size != W.

lengths
  Steps t >= lengths[b] are padding. The network input is zeroed there, so every stream and
  the output are zero there (the cells output zeros past a length, and sums and projections
  of zeros are zeros), and the incoming gradient is zeroed there, so no gradient flows from
  padding into parameters or the input.

state0 (Network.run, Network.backward_states)
  Each cell may start from given states instead of zeros, and the final states of every cell
  are returned, keyed by (layer, direction): {(0, "fwd"): {"h": (B, n), "c": (B, n)}}. A
  direction's final state is the state after its last step inside each sequence (for "bwd",
  after reading input step 0). This is what an encoder hands to a decoder, and what lets a
  one-directional network run one step at a time (generation) without rerunning the prefix.

Parameters are one flat dict: `layer{l}.{fwd|bwd}.{p}` for the cell's parameter p, and
`layer{l}.proj` / `layer{l}.xproj` for the projections, with `.fwd` / `.bwd` appended in the
two-stream modes ("separate", "alternate"): `layer1.proj.bwd`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rnndsl.backend.blas import matmul, weight_grad
from rnndsl.engines.cell import Cell, _common_dtype, _lengths, init_array

MODES = (None, "concat", "separate", "alternate")
DENSE = (None, "add", "concat")
X = "x"  # the key of the network input among the values that streams read


@dataclass
class _Tape:
    lengths: np.ndarray
    values: dict  # X -> network input (padding zeroed); (layer, stream) -> that output
    inputs: dict  # (layer, stream) -> u, what the stream's cells read
    cells: dict  # (layer, direction) -> the cell's Forward


@dataclass
class NetworkRun:
    """What `Network.run` returns: the output, every cell's final states, the tape."""
    y: np.ndarray  # (T, B, output_size)
    states: dict  # (layer, direction) -> {state name: (B, n)}
    tape: _Tape | None  # None when run with save=False


def reverse_within(a: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """`a` (T, B, n) with each sequence's first lengths[b] steps in reverse order and its
    padding left in place. It is its own inverse, and so also its own backward pass."""
    t = np.arange(a.shape[0])[:, None]
    index = np.where(t < lengths, lengths - 1 - t, t)
    return np.take_along_axis(a, index[:, :, None], axis=0)


def _zero_padding(a: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """`a` (T, B, n) with the steps past each sequence's length zeroed, in a copy; `a` itself
    when there are no such steps."""
    T = a.shape[0]
    if lengths.min(initial=T) >= T:
        return a
    return a * (np.arange(T)[:, None] < lengths)[:, :, None]


def _joined(parts: list[np.ndarray]) -> np.ndarray:
    """Parts (T, B, n_k) side by side; a lone part as it is, without a copy."""
    return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=2)


def _accumulate(adjoints: dict, key, d: np.ndarray) -> None:
    """Streams fan out (dense connections, residuals): their gradients add up."""
    adjoints[key] = adjoints[key] + d if key in adjoints else d


class Network:
    """A stack of one compiled cell: see the module docstring for what each option means."""

    def __init__(self, cell: Cell, input_size: int, hidden: int, layers: int = 1,
                 bidirectional: str | None = None, residual: bool = False,
                 dense: str | None = None, sizes: dict | None = None):
        if len(cell.inputs) != 1:
            raise ValueError(f"a Network needs a cell with one input sequence; {cell.name} has "
                             f"{len(cell.inputs)} ({', '.join(cell.inputs)})")
        if bidirectional not in MODES:
            raise ValueError(f"bidirectional must be one of {MODES}, got {bidirectional!r}")
        if dense not in DENSE:
            raise ValueError(f"dense must be one of {DENSE}, got {dense!r}")
        if layers < 1 or input_size < 1 or hidden < 1:
            raise ValueError(f"layers, input_size and hidden must be at least 1, got {layers}, "
                             f"{input_size}, {hidden}")
        self.cell, self.layers, self.input_size = cell, layers, input_size
        self.bidirectional, self.residual, self.dense = bidirectional, residual, dense
        self.x_name, x_size = next(iter(cell.inputs.items()))  # x_size: a size's name
        h_size = cell.width_size
        given = set(sizes or {}) & {x_size, h_size}
        if given:
            raise ValueError(f"sizes: {sorted(given)} are set by input_size and hidden")
        self.sizes = {**(sizes or {}), h_size: hidden}
        missing = [s for s in cell.sizes if s not in self.sizes and s != x_size]
        if missing:
            raise ValueError(f"{cell.name} needs the size(s) {', '.join(missing)}: pass "
                             f"sizes={{{', '.join(repr(s) + ': n' for s in missing)}}}")
        self.x_size = x_size
        out_shape = cell.step.shape_of(cell.outputs[0])
        if len(out_shape) != 1 or out_shape[0] == x_size:
            raise ValueError(f"{cell.name}'s output '{cell.outputs[0]}' has shape "
                             f"{list(out_shape)}: layers need a vector whose width does not "
                             "follow the input's")
        H = self.sizes[out_shape[0]]
        if bidirectional is None:
            self.streams = {"": ("fwd",)}
        elif bidirectional == "concat":
            self.streams = {"": ("fwd", "bwd")}
        else:
            self.streams = {"fwd": ("fwd",), "bwd": ("bwd",)}
        self.width = H * len(next(iter(self.streams.values())))  # W, every layer's y
        self.output_size = self.width * len(self.streams)
        self._shapes = self._param_shapes()

    def __repr__(self) -> str:
        return (f"<rnndsl.Network {self.cell.name} {self.input_size}->{self.output_size}, "
                f"{self.layers} layer(s), bidirectional={self.bidirectional}, "
                f"residual={self.residual}, dense={self.dense}>")

    # -- structure ------------------------------------------------------------------------------
    def _in_width(self, layer: int) -> int:
        if layer == 0:
            return self.input_size
        return self.input_size + layer * self.width if self.dense == "concat" else self.width

    def _feeder(self, stream: str) -> str:
        """The stream one layer down whose output this stream reads."""
        if self.bidirectional == "alternate":
            return {"fwd": "bwd", "bwd": "fwd"}[stream]
        return stream

    def _sources(self, layer: int, stream: str) -> list:
        """Keys of the values that stream reads at that layer, lowest first."""
        below = []
        for k in reversed(range(layer)):
            stream = self._feeder(stream)
            below.append((k, stream))
        if not below:
            return [X]
        return [X, *reversed(below)] if self.dense else [below[0]]

    @staticmethod
    def _name(layer: int, what: str, stream: str) -> str:
        return f"layer{layer}.{what}" + (f".{stream}" if stream else "")

    def _projections(self, layer: int, stream: str) -> dict[str, tuple[int, int]]:
        out = {}
        if self.residual and self._in_width(layer) != self.width:
            out[self._name(layer, "proj", stream)] = (self.width, self._in_width(layer))
        if self.dense == "add" and layer > 0 and self.input_size != self.width:
            out[self._name(layer, "xproj", stream)] = (self.width, self.input_size)
        return out

    def _layer_sizes(self, layer: int) -> dict[str, int]:
        return {**self.sizes, self.x_size: self._in_width(layer)}

    def _parts(self):
        """(layer, stream, its directions), in parameter order."""
        for layer in range(self.layers):
            for stream, directions in self.streams.items():
                yield layer, stream, directions

    def _param_shapes(self) -> dict[str, tuple]:
        shapes = {}
        for layer, stream, directions in self._parts():
            own = self.cell.param_shapes(**self._layer_sizes(layer))
            for d in directions:
                shapes.update({f"layer{layer}.{d}.{p}": s for p, s in own.items()})
            shapes.update(self._projections(layer, stream))
        return shapes

    def param_shapes(self) -> dict[str, tuple]:
        """Flat parameter name -> shape, e.g. 'layer0.fwd.W_ii', 'layer1.proj'."""
        return dict(self._shapes)

    # -- parameters -----------------------------------------------------------------------------
    def init_params(self, seed: int = 0, dtype=np.float32,
                    orthogonal: bool = False) -> dict[str, np.ndarray]:
        """Each cell's own init (the spec's), seeded per layer and direction from `seed`;
        projections U(-1/sqrt(fan_in), 1/sqrt(fan_in)). `orthogonal=True` makes every square
        recurrent matrix (a parameter of shape [n, n] where n is a state's size) orthogonal."""
        rng = np.random.default_rng(seed)
        recurrent = [p for p, info in self.cell.params.items()
                     if len(info.shape) == 2 and info.shape[0] == info.shape[1]
                     and info.shape[0] in self.cell.states.values()] if orthogonal else []
        params = {}
        for layer, stream, directions in self._parts():
            for d in directions:
                own_seed = int(rng.integers(2**62))
                own = self.cell.init_params(seed=own_seed, dtype=np.float64,
                                            **self._layer_sizes(layer))
                # a generator of its own, so that the other parameters stay as without
                ortho_rng = np.random.default_rng([own_seed, 1])
                for p in recurrent:
                    own[p] = init_array("orthogonal", 0.0, own[p].shape, None, ortho_rng, p)
                params.update({f"layer{layer}.{d}.{p}": v for p, v in own.items()})
            for name, (rows, cols) in self._projections(layer, stream).items():
                k = 1.0 / np.sqrt(cols)
                params[name] = rng.uniform(-k, k, (rows, cols))
        return {name: v.astype(dtype) for name, v in params.items()}

    # -- running --------------------------------------------------------------------------------
    def forward(self, params: dict, x, lengths=None, save: bool = True):
        """y (T, B, output_size) for x (T, B, input_size), and the tape for `backward` (None
        with save=False). `lengths` (B,): per-sequence lengths; y is zero past them."""
        run = self.run(params, x, lengths, save=save)
        return run.y, run.tape

    def cell_keys(self) -> list[tuple[int, str]]:
        """(layer, direction) of every cell, in parameter order: the keys of states."""
        return [(layer, d) for layer, _, directions in self._parts() for d in directions]

    def run(self, params: dict, x, lengths=None, state0: dict | None = None,
            save: bool = True) -> NetworkRun:
        """As `forward`, from initial states `state0` ({(layer, direction): {state: (B, n)}};
        a cell or state left out starts at zeros), returning every cell's final states too."""
        state0 = state0 or {}
        unknown = [k for k in state0 if k not in self.cell_keys()]
        if unknown:
            raise ValueError(f"state0: unknown cell(s) {unknown}; cells: {self.cell_keys()}")
        x = np.asarray(x)
        if x.ndim != 3 or x.shape[2] != self.input_size:
            raise ValueError(f"x must be (T, B, {self.input_size}), got shape {x.shape}")
        self._check(params)
        T, B = x.shape[:2]
        lengths = _lengths(lengths, T, B)
        # Padding is ignored: zeroed once here, it stays zero through every stream.
        values = {X: _zero_padding(x.astype(_common_dtype(params, {X: x}), copy=False), lengths)}
        inputs, cells, finals = {}, {}, {}
        for layer, stream, directions in self._parts():
            sources = [values[k] for k in self._sources(layer, stream)]
            u = self._combine(params, layer, stream, sources)
            outs = []
            for d in directions:
                fwd = self.cell.forward(self._cell_params(params, layer, d),
                                        self._orient(u, d, lengths), state0.get((layer, d)),
                                        lengths=lengths, save=save,
                                        sizes=self._layer_sizes(layer))  # the NTM's slots
                outs.append(self._orient(fwd.output, d, lengths))
                cells[(layer, d)], finals[(layer, d)] = fwd, fwd.states
            y = _joined(outs)
            if self.residual:  # a new array: the cell's own output stays as it gave it
                y = y + self._project(params, self._name(layer, "proj", stream), u)
            inputs[(layer, stream)], values[(layer, stream)] = u, y
        top = _joined([values[(self.layers - 1, s)] for s in self.streams])
        return NetworkRun(top, finals, _Tape(lengths, values, inputs, cells) if save else None)

    def backward(self, params: dict, tape: _Tape, dy, input_grads: bool = True
                 ) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
        """Gradients of a loss given dy = dL/dy (T, B, output_size): (dL/dparams with the keys
        of `params`, dL/dx (T, B, input_size), or None with input_grads=False: the first
        layer's cells then skip the GEMM of their input gradients)."""
        grads, dx, _ = self.backward_states(params, tape, dy, input_grads=input_grads)
        return grads, dx

    def backward_states(self, params: dict, tape: _Tape, dy=None, d_states: dict | None = None,
                        input_grads: bool = True):
        """As `backward`, with the gradients of the loss w.r.t. the final states of `run` too
        (`d_states`, keyed as its states; dy None: the loss reads no output), returning also
        dL/d(state0), keyed (layer, direction) -> {state: (B, n)}."""
        d_states = d_states or {}
        unknown = [k for k in d_states if k not in self.cell_keys()]
        if unknown:
            raise ValueError(f"d_states: unknown cell(s) {unknown}; cells: {self.cell_keys()}")
        if tape is None:
            raise ValueError("this forward pass ran with save=False: run it again to backpropagate")
        self._check(params)
        x = tape.values[X]
        dy = np.zeros((*x.shape[:2], self.output_size), x.dtype) if dy is None else \
            np.asarray(dy, x.dtype)
        if dy.shape != (*x.shape[:2], self.output_size):
            raise ValueError(f"dy must be {(*x.shape[:2], self.output_size)}, got {dy.shape}")
        dy = _zero_padding(dy, tape.lengths)  # what lands on padding goes nowhere
        grads: dict[str, np.ndarray] = {}
        d_state0 = {}
        adjoints = dict(zip([(self.layers - 1, s) for s in self.streams],
                            np.split(dy, len(self.streams), axis=2)))
        for layer, stream, directions in reversed(list(self._parts())):
            d_y = adjoints.pop((layer, stream))
            u = tape.inputs[(layer, stream)]
            # dL/du: needed unless u is the network's input and its gradient is not wanted
            want_du = input_grads or self._sources(layer, stream) != [X]
            du = None  # summed over the residual and the directions (never in place: a part
            # may be a view of dy)
            if self.residual:
                du = self._project_backward(params, grads, self._name(layer, "proj", stream),
                                            u, d_y, want_du)
            for d, d_out in zip(directions, np.split(d_y, len(directions), axis=2)):
                g = self.cell.backward(self._cell_params(params, layer, d), tape.cells[(layer, d)],
                                       d_outputs=self._orient(d_out, d, tape.lengths),
                                       d_states=d_states.get((layer, d)), input_grads=want_du)
                d_state0[(layer, d)] = g.state0
                grads.update({f"layer{layer}.{d}.{p}": v for p, v in g.params.items()})
                if want_du:
                    part = self._orient(g.inputs[self.x_name], d, tape.lengths)
                    du = part if du is None else du + part
            if want_du:
                self._combine_backward(params, grads, layer, stream, tape.values, du, adjoints,
                                       input_grads)
        return ({name: grads[name] for name in self._shapes}, adjoints[X] if input_grads
                else None, d_state0)

    # -- pieces of the passes -------------------------------------------------------------------
    def _check(self, params: dict) -> None:
        missing = [p for p in self._shapes if p not in params]
        extra = [p for p in params if p not in self._shapes]
        if missing or extra:
            raise ValueError(f"network parameters: missing {missing or 'none'}, unknown "
                             f"{extra or 'none'}")
        for name, shape in self._shapes.items():
            if np.shape(params[name]) != shape:
                raise ValueError(f"parameter '{name}' must have shape {shape}, got "
                                 f"{np.shape(params[name])}")

    def _cell_params(self, params: dict, layer: int, direction: str) -> dict:
        return {p: params[f"layer{layer}.{direction}.{p}"] for p in self.cell.params}

    @staticmethod
    def _orient(a: np.ndarray, direction: str, lengths: np.ndarray) -> np.ndarray:
        """Into (and, being its own inverse, out of) the time order the direction runs in."""
        return a if direction == "fwd" else reverse_within(a, lengths)

    def _project(self, params: dict, name: str, a: np.ndarray) -> np.ndarray:
        """a @ P.T, or a itself where the widths agree and there is no P."""
        return matmul(a, np.asarray(params[name], a.dtype).T) if name in self._shapes else a

    def _project_backward(self, params, grads, name, a, d, want_da: bool = True):
        """dL/da of `_project` given d = dL/d(result) (None unless `want_da`); dL/dP into
        grads."""
        if name not in self._shapes:
            return d if want_da else None
        grads[name] = weight_grad(d, a)
        return matmul(d, np.asarray(params[name], a.dtype)) if want_da else None

    def _combine(self, params, layer, stream, sources):
        """u, what the stream's cells read, from the values it reads (the network input first
        under dense connections)."""
        if len(sources) == 1:
            return sources[0]
        if self.dense == "concat":
            return np.concatenate(sources, axis=2)
        x, *below = sources
        return self._project(params, self._name(layer, "xproj", stream), x) + sum(below)

    def _combine_backward(self, params, grads, layer, stream, values, du, adjoints,
                          input_grads: bool):
        """Hand du = dL/du on to the values that u was made of (to the network's input only if
        `input_grads`)."""
        keys = self._sources(layer, stream)
        if len(keys) == 1:
            _accumulate(adjoints, keys[0], du)
        elif self.dense == "concat":
            edges = np.cumsum([values[k].shape[2] for k in keys])[:-1]
            for k, part in zip(keys, np.split(du, edges, axis=2)):
                if k != X or input_grads:
                    _accumulate(adjoints, k, part)
        else:
            name = self._name(layer, "xproj", stream)
            dx = self._project_backward(params, grads, name, values[X], du, input_grads)
            if input_grads:
                _accumulate(adjoints, X, dx)
            for k in keys[1:]:
                _accumulate(adjoints, k, du)
