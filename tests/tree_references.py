"""The built-in tree cells written in PyTorch as one would by hand: one node at a time,
recursing into its children (a missing child reads zeros). Independent of rnndsl: the oracle
of tests/test_trees.py and the eager baseline of benchmarks/tree_bench.py."""
import torch


def recursive_nn(p, x, kids, i):
    hs = [recursive_nn(p, x, kids, k) for k in kids[i]]
    hs += [torch.zeros_like(p["b"])] * (2 - len(hs))
    return torch.tanh(p["W_x"] @ x[i] + p["W_l"] @ hs[0] + p["W_r"] @ hs[1] + p["b"])


def binary_tree_lstm(p, x, kids, i):
    """Tai et al. (2015), N-ary Tree-LSTM, N = 2: returns (h, c) of node i."""
    below = [binary_tree_lstm(p, x, kids, k) for k in kids[i]]
    zero = torch.zeros_like(p["b_i"])
    below += [(zero, zero)] * (2 - len(below))
    (hl, cl), (hr, cr) = below

    def gate(g, act):
        return act(p[f"W_{g}"] @ x[i] + p[f"U_{g}_l"] @ hl + p[f"U_{g}_r"] @ hr + p[f"b_{g}"])

    i_, o, u = gate("i", torch.sigmoid), gate("o", torch.sigmoid), gate("u", torch.tanh)
    f_l = torch.sigmoid(p["W_f"] @ x[i] + p["U_f_ll"] @ hl + p["U_f_lr"] @ hr + p["b_f"])
    f_r = torch.sigmoid(p["W_f"] @ x[i] + p["U_f_rl"] @ hl + p["U_f_rr"] @ hr + p["b_f"])
    c = i_ * u + f_l * cl + f_r * cr
    return o * torch.tanh(c), c


def child_sum_tree_lstm(p, x, kids, i):
    """Tai et al. (2015), Child-Sum Tree-LSTM: returns (h, c) of node i."""
    below = [child_sum_tree_lstm(p, x, kids, k) for k in kids[i]]
    h_tilde = sum((h for h, _ in below), torch.zeros_like(p["b_i"]))
    i_ = torch.sigmoid(p["W_i"] @ x[i] + p["U_i"] @ h_tilde + p["b_i"])
    o = torch.sigmoid(p["W_o"] @ x[i] + p["U_o"] @ h_tilde + p["b_o"])
    u = torch.tanh(p["W_u"] @ x[i] + p["U_u"] @ h_tilde + p["b_u"])
    c = i_ * u
    for h_k, c_k in below:
        c = c + torch.sigmoid(p["W_f"] @ x[i] + p["U_f"] @ h_k + p["b_f"]) * c_k
    return o * torch.tanh(c), c


REFERENCES = {"recursive_nn": (recursive_nn, 2), "binary_tree_lstm": (binary_tree_lstm, 2),
              "child_sum_tree_lstm": (child_sum_tree_lstm, 4)}
