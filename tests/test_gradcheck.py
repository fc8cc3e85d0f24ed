"""Every built-in spec's derived gradients agree with central differences (float64)."""
import numpy as np
import pytest

import rnndsl
from rnndsl.engines.gradcheck import gradcheck

BUILTINS = sorted(rnndsl.builtin_specs())


def test_all_builtins_present():
    assert set(BUILTINS) >= {
        "elman", "elman_relu", "jordan", "lstm_1997", "lstm", "peephole_lstm", "gru", "gru_cho",
        "gru1", "gru2", "gru3", "mgu", "indrnn", "layernorm_lstm"}


@pytest.mark.parametrize("with_lengths", [False, True], ids=["full", "lengths"])
@pytest.mark.parametrize("spec", BUILTINS)
def test_gradcheck(spec, with_lengths):
    cell = rnndsl.compile(spec)  # the cpu kernels, cells with matrix values included
    # B=3: one full sequence, one shorter, one empty (its initial state passes straight out)
    lengths = np.array([3, 2, 0]) if with_lengths else None
    result = gradcheck(cell, T=3, B=3, size=2, seed=3, lengths=lengths)
    name, err = result.worst
    assert err < 1e-6, f"{spec}: {name} relative error {err:.2e}"
    # every parameter, the input and every initial state was checked
    assert len(result.errors) == len(cell.params) + len(cell.inputs) + len(cell.states)


@pytest.mark.parametrize("spec", BUILTINS)
def test_summary_names_a_paper(spec):
    s = rnndsl.compiler.load(spec).summary
    assert s and "\n" not in s and any(ch.isdigit() for ch in s), s
