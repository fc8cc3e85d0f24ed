"""Every built-in spec's derived gradients agree with central differences (float64)."""
import numpy as np
import pytest

import rnndsl
from rnndsl.engines.gradcheck import gradcheck

from engines import WEIGHTINGS, as_weightings

BUILTINS = sorted(rnndsl.builtin_specs())


def test_all_builtins_present():
    assert set(BUILTINS) >= {
        "elman", "elman_relu", "jordan", "lstm_1997", "lstm", "peephole_lstm", "gru", "gru_cho",
        "gru1", "gru2", "gru3", "mgu", "indrnn", "layernorm_lstm"}


# gradcheck's hidden size is 3: slstm's heads must divide it
CONSTANTS = {"slstm": {"heads": 3}}


def weighting_states(cell, spec: str, B: int, size: int) -> dict | None:
    """Random initial states as gradcheck draws them, the weightings as_weightings's;
    None (gradcheck's own) for a cell without such states."""
    if spec not in WEIGHTINGS:
        return None
    rng = np.random.default_rng(size)
    sizes = {s: size + k for k, s in enumerate(cell.sizes)}
    state0 = {s: 0.5 * rng.standard_normal((B, *(sizes[d] for d in (n if isinstance(n, tuple)
                                                                     else (n,)))))
              for s, n in cell.states.items()}
    return as_weightings(cell, state0)


@pytest.mark.parametrize("with_lengths", [False, True], ids=["full", "lengths"])
@pytest.mark.parametrize("spec", BUILTINS)
def test_gradcheck(spec, with_lengths):
    kernels = spec in rnndsl.compiler.kernel_specs()  # matrix cells included
    cell = rnndsl.compile(spec, target="cpu" if kernels else "reference",
                          constants=CONSTANTS.get(spec))
    # B=3: one full sequence, one shorter, one empty (its initial state passes straight out)
    lengths = np.array([3, 2, 0]) if with_lengths else None
    # eps 1e-5: the loss's rounding, a few units in the last place of a loss near 7, over
    # 2 eps, is what the NTM's gradients of ~1e-3 differ by at eps 1e-6 (up to 1.3e-6 of
    # them, its kernels' analytic gradients equal to the reference's to 1e-17), while the
    # central differences' truncation at 1e-5 is of order 1e-10
    result = gradcheck(cell, T=3, B=3, size=2, seed=3, lengths=lengths, eps=1e-5,
                       state0=weighting_states(cell, spec, B=3, size=2))
    name, err = result.worst
    assert err < 1e-6, f"{spec}: {name} relative error {err:.2e}"
    # every parameter, the input and every initial state was checked
    assert len(result.errors) == len(cell.params) + len(cell.inputs) + len(cell.states)


@pytest.mark.parametrize("spec", BUILTINS)
def test_summary_names_a_paper(spec):
    s = rnndsl.compiler.load(spec).summary
    assert s and "\n" not in s and any(ch.isdigit() for ch in s), s
