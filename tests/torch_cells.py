"""Specs the PyTorch bridge tests use: torch's own cells, and a peephole LSTM.

The GRU and Elman specs are the built-in ones once they exist; until then, these texts
(same parameter names as torch's gate blocks)."""
import rnndsl

GRU_YAML = """
name: gru
summary: GRU as torch.nn.GRU (gate blocks r, z, n)
sizes: [input, hidden]
inputs: {x: input}
states: {h: hidden}
outputs: [h]
equations: |
  r = sigmoid(W_ir @ x + b_ir + W_hr @ h_prev + b_hr)
  z = sigmoid(W_iz @ x + b_iz + W_hz @ h_prev + b_hz)
  n = tanh(W_in @ x + b_in + r * (W_hn @ h_prev + b_hn))
  h = (1 - z) * n + z * h_prev
"""

ELMAN_YAML = """
name: elman
summary: Elman network as torch.nn.RNN (tanh)
sizes: [input, hidden]
inputs: {x: input}
states: {h: hidden}
outputs: [h]
equations: |
  h = tanh(W_ih @ x + b_ih + W_hh @ h_prev + b_hh)
"""

ELMAN_RELU_YAML = ELMAN_YAML.replace("name: elman", "name: elman_relu").replace(
    "h = tanh(", "h = relu(").replace("(tanh)", "(relu)")

PEEPHOLE_YAML = """
name: lstm_peephole
summary: LSTM with peephole connections (Gers & Schmidhuber 2000)
sizes: [input, hidden]
inputs: {x: input}
states: {h: hidden, c: hidden}
outputs: [h]
params:
  b_f: {init: ones}
equations: |
  i = sigmoid(W_i @ x + U_i @ h_prev + p_i * c_prev + b_i)
  f = sigmoid(W_f @ x + U_f @ h_prev + p_f * c_prev + b_f)
  c = f * c_prev + i * tanh(W_c @ x + U_c @ h_prev + b_c)
  o = sigmoid(W_o @ x + U_o @ h_prev + p_o * c + b_o)
  h = o * tanh(c)
"""


def spec(name: str) -> str:
    """The built-in spec if it exists, else the text above."""
    if name in rnndsl.builtin_specs():
        return name
    return {"gru": GRU_YAML, "elman": ELMAN_YAML, "elman_relu": ELMAN_RELU_YAML}[name]
