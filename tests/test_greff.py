"""The LSTM variants of Greff et al. 2017 ("LSTM: A Search Space Odyssey", sec. 2 and 3) in
examples/greff: each spec passes the checker, has exactly the parameters its variant has, and
computes what the paper's equations compute (a NumPy transcription of them, below)."""
from pathlib import Path

import numpy as np
import pytest

import rnndsl
from tests.engines import problem

GREFF = Path(__file__).resolve().parent.parent / "examples" / "greff"
VARIANTS = ("vanilla", "NIG", "NFG", "NOG", "NIAF", "NOAF", "NP", "CIFG", "FGR")


def sigmoid(v):
    return 1 / (1 + np.exp(-v))


def greff(variant: str, p: dict, xs: np.ndarray, state0: dict) -> np.ndarray:
    """The block outputs y of the paper's vanilla LSTM (eq. 1-6), changed as `variant` says."""
    y, c = state0["y"], state0["c"]
    gates = {g: state0.get(g) for g in "ifo"}  # FGR: the gates of the step before
    ys = []
    for x in xs:
        def net(g, cell=None):
            v = x @ p[f"W_{g}"].T + y @ p[f"R_{g}"].T + p[f"b_{g}"]
            if cell is not None and variant != "NP":
                v = v + p[f"p_{g}"] * cell
            if variant == "FGR" and g != "z":
                v = v + sum(gates[h] @ p[f"R_{h}{g}"].T for h in "ifo")
            return v
        z = net("z") if variant == "NIAF" else np.tanh(net("z"))
        i = 1.0 if variant == "NIG" else sigmoid(net("i", c))
        f = 1 - i if variant == "CIFG" else 1.0 if variant == "NFG" else sigmoid(net("f", c))
        c = z * i + c * f
        o = 1.0 if variant == "NOG" else sigmoid(net("o", c))
        y = (c if variant == "NOAF" else np.tanh(c)) * o
        gates = {"i": i, "f": f, "o": o}
        ys.append(y)
    return np.stack(ys)


def parameters(variant: str) -> set[str]:
    gone = {"NIG": "i", "NFG": "f", "CIFG": "f", "NOG": "o"}.get(variant)
    gates = [g for g in "zifo" if g != gone]
    names = {f"{kind}_{g}" for g in gates for kind in "WRb"}
    if variant != "NP":
        names |= {f"p_{g}" for g in gates if g != "z"}
    if variant == "FGR":
        names |= {f"R_{h}{g}" for h in "ifo" for g in "ifo"}
    return names


def test_the_folder_holds_the_nine_variants():
    assert sorted(p.stem for p in GREFF.glob("*.yaml")) == sorted(VARIANTS)


@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_is_the_papers(variant):
    cell = rnndsl.compile(GREFF / f"{variant}.yaml", target="reference")
    assert set(cell.params) == parameters(variant)
    params, xs, state0 = problem(cell, T=5, B=3, seed=1)
    run = cell.forward(params, xs, state0)
    np.testing.assert_allclose(run.outputs["y"], greff(variant, params, xs["x"], state0),
                               rtol=1e-12, atol=1e-12)


def test_vanilla_is_the_built_in_peephole_lstm():
    vanilla = rnndsl.compile(GREFF / "vanilla.yaml", target="reference")
    peephole = rnndsl.compile("peephole_lstm", target="reference")
    params, xs, state0 = problem(vanilla, T=4, B=2, seed=2)
    names = {"z": "g", "i": "i", "f": "f", "o": "o"}
    renamed = {}
    for g, h in names.items():
        renamed.update({f"W_i{h}": params[f"W_{g}"], f"W_h{h}": params[f"R_{g}"],
                        f"b_{h}": params[f"b_{g}"]})
        if g != "z":
            renamed[f"w_c{h}"] = params[f"p_{g}"]
    assert set(renamed) == set(peephole.params)
    ours = vanilla.forward(params, xs, state0).outputs["y"]
    theirs = peephole.forward(renamed, xs, {"h": state0["y"], "c": state0["c"]}).outputs["h"]
    np.testing.assert_allclose(ours, theirs, rtol=1e-12, atol=1e-12)
