"""JAX peers for the benchmarks: the built-in cells of rnndsl.peer_cells under `jax.lax.scan`
and `jax.jit`, forward and forward+backward (`jax.grad` of the sum of the outputs w.r.t. every
weight and the input). JAX is an optional extra (`pip install 'rnndsl[bench]'`), not a
dependency of rnndsl or its tests: import this module only when JAX is wanted.
"""
from __future__ import annotations

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np

from rnndsl.bench import median_time
from rnndsl.peer_cells import HandCell, stack


def _linear(x, weight, bias=None):
    y = x @ weight.T
    return y if bias is None else y + bias


def _layer_norm(v, gain, shift=None):
    y = jax.nn.standardize(v, axis=-1, epsilon=1e-5) * gain
    return y if shift is None else y + shift


JAX = SimpleNamespace(  # what rnndsl.peer_cells' hand-written cells call
    linear=_linear, sigmoid=jax.nn.sigmoid, tanh=jnp.tanh, relu=jax.nn.relu,
    chunk=lambda v, n: jnp.split(v, n, -1), layer_norm=_layer_norm)


def scan_loop(hand: HandCell, hidden: int):
    """run(weights, x) -> h (T, B, hidden): the hoisted input side, then lax.scan of the step."""

    def run(w, x):
        T, B = x.shape[:2]
        pre = hand.pre(JAX, w, x.reshape(T * B, -1)).reshape(T, B, -1)

        def body(state, xt):
            state = hand.step(JAX, w, xt, state)
            return state, state[0]

        init = tuple(jnp.zeros((B, hidden), x.dtype) for _ in range(hand.states))
        return jax.lax.scan(body, init, pre)[1]

    return run


def compiled(hand: HandCell, hidden: int):
    """The jitted forward pass, and the jitted gradients of the sum of the outputs w.r.t.
    (weights, x)."""
    run = scan_loop(hand, hidden)
    return jax.jit(run), jax.jit(jax.grad(lambda w, x: run(w, x).sum(), argnums=(0, 1)))


def time_scan(hand: HandCell, params: dict, x: np.ndarray, hidden: int, repeats: int = 7,
              timer=None) -> tuple[float, float]:
    """Median forward and forward+backward times as timer(fn, repeats) gives them
    (median_time by default, a bench.Turns' slots; its warm-up compiles), each waiting for
    the result (block_until_ready)."""
    timer = timer or median_time
    forward, gradients = compiled(hand, hidden)
    w = stack(hand, {p: jnp.asarray(v) for p, v in params.items()}, jnp.concatenate)
    x = jnp.asarray(x)
    return (timer(lambda: forward(w, x).block_until_ready(), repeats),
            timer(lambda: jax.block_until_ready(gradients(w, x)), repeats))
