"""Golden text of the printed forward IR and derived backward equations of LSTM and GRU.

The golden files were checked by hand against the textbook derivations, which are also
written out below line by line, so a change to the printer or to grad shows up as a diff to
review. Regenerate with RNNDSL_UPDATE_GOLDEN=1 only after reviewing that diff.
"""
import os
from pathlib import Path

import pytest

import rnndsl

GOLDEN = Path(__file__).parent / "golden"

# Hand derivation. LSTM: c = f*c_prev + i*g, h = o*tanh(c), gates sigmoid(.) / tanh(.) of
# their pre-activations; the adjoint of c collects d_c_next and the path through h.
LSTM_BY_HAND = [
    "d_c = d_c_next + d_h * o * (1 - tanh(c) ** 2)",
    "d_g = d_c * i",
    "d_g_pre = d_g * (1 - g ** 2)",
    "d_i = d_c * g",
    "d_i_pre = d_i * i * (1 - i)",
    "d_f = d_c * c_prev",
    "d_f_pre = d_f * f * (1 - f)",
    "d_o = d_h * tanh(c)",
    "d_o_pre = d_o * o * (1 - o)",
    "d_c_prev = d_c * f",
    "d_h_prev = W_hg.T @ d_g_pre + W_hi.T @ d_i_pre + W_hf.T @ d_f_pre + W_ho.T @ d_o_pre",
    "d_x = W_ig.T @ d_g_pre + W_ii.T @ d_i_pre + W_if.T @ d_f_pre + W_io.T @ d_o_pre",
    "d_W_hf += outer(d_f_pre, h_prev)",
    "d_W_io += outer(d_o_pre, x)",
    "d_b_ii += d_i_pre",
    "d_b_hi += d_i_pre",
]
# GRU (torch): h = (1-z)*n + z*h_prev, n = tanh(W_in x + b_in + r*(W_hn h_prev + b_hn)).
# d_n_3 is the adjoint of (W_hn @ h_prev + b_hn): d_n_pre * r.
GRU_BY_HAND = [
    "d_n = d_h * (1 - z)",
    "d_n_pre = d_n * (1 - n ** 2)",
    "d_n_3 = d_n_pre * r",
    "d_r = d_n_pre * (W_hn @ h_prev + b_hn)",
    "d_r_pre = d_r * r * (1 - r)",
    "d_z = d_h * h_prev - d_h * n",
    "d_z_pre = d_z * z * (1 - z)",
    "d_h_prev = d_h * z + W_hn.T @ d_n_3 + W_hr.T @ d_r_pre + W_hz.T @ d_z_pre",
    "d_x = W_ir.T @ d_r_pre + W_in.T @ d_n_pre + W_iz.T @ d_z_pre",
    "d_W_hn += outer(d_n_3, h_prev)",
    "d_b_hn += d_n_3",
    "d_b_in += d_n_pre",
]


def _compare(text: str, name: str):
    path = GOLDEN / name
    if os.environ.get("RNNDSL_UPDATE_GOLDEN"):
        path.write_text(text + "\n")
    assert text + "\n" == path.read_text(), f"{name} changed; review the diff"


@pytest.mark.parametrize("spec", ["lstm", "gru"])
def test_golden(spec):
    cell = rnndsl.compile(spec)
    _compare(cell.step.equations(), f"{spec}_forward.txt")
    _compare(cell.backward_ir.equations(), f"{spec}_backward.txt")


@pytest.mark.parametrize("spec, lines", [("lstm", LSTM_BY_HAND), ("gru", GRU_BY_HAND)])
def test_backward_reads_as_the_hand_derivation(spec, lines):
    printed = rnndsl.compile(spec).backward_ir.equations().splitlines()
    for line in lines:
        assert line in printed, line


def test_forward_prints_as_written():
    """The printed forward IR is the spec's equations (parenthesised only where needed)."""
    for spec in ("lstm", "gru"):
        text = rnndsl.compiler.load(spec).equations[0].text.strip()
        assert rnndsl.compile(spec).step.equations() == text
