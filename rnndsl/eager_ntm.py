"""The Neural Turing Machine (Graves, Wayne & Danihelka 2014) as a PyTorch user writes it: an
eager module with an `nn.LSTMCell` controller, one `nn.Linear` per head that emits all of the
head's parameters at once, and a Python loop over time. It is the peer that the built-in
`ntm` spec (specs/ntm.yaml) is checked against (tests/test_matrix_torch.py) and timed against.

It computes what specs/ntm.yaml computes, written independently: the write head addresses the
previous memory, erases and adds; the read head addresses the memory just written and reads
from it; the output is a linear map of the controller's output and the read vector. Each head
has a learned start weighting (softmax of a parameter per slot) that it interpolates with in
place of a zero previous weighting, as the spec does: from zero weightings and a zero memory
the addressing would otherwise stay uniform over the slots.
`load_rnndsl` copies an rnndsl parameter dict of that spec into the module; `stacked` builds
the module's parameters from rnndsl's tensors for torch.func.functional_call.

Needs PyTorch (the optional extra).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

SHIFTS = 3  # the shift distribution covers -1, 0, +1
# What each head's linear layer emits, in order, as the spec's (weight, bias): a key, a key
# strength, an interpolation gate, the shift logits, a sharpening; the write head also an erase
# and an add vector. A single row is a vector weight and a scalar bias in the spec.
READ_HEAD = (("W_read_key", "b_read_key"), ("w_read_strength", "b_read_strength"),
             ("w_read_gate", "b_read_gate"), ("W_read_shift", "b_read_shift"),
             ("w_read_sharpening", "b_read_sharpening"))
WRITE_HEAD = tuple((w.replace("read", "write"), b.replace("read", "write"))
                   for w, b in READ_HEAD) + (("W_erase", "b_erase"), ("W_add", "b_add"))


class EagerNTM(nn.Module):
    """An LSTM-controlled NTM with one read and one write head; memory of slots x width.
    forward(x (T, B, input), state=None, lengths=None) -> (y (T, B, hidden), final state),
    the state a dict h, c, M, w_read, w_write, r as specs/ntm.yaml names them."""

    def __init__(self, input_size: int, hidden: int, slots: int, width: int,
                 dtype=torch.float32):
        super().__init__()
        self.sizes = {"input": input_size, "hidden": hidden, "slots": slots, "width": width}
        self.controller = nn.LSTMCell(input_size + width, hidden, dtype=dtype)
        self.read_head = nn.Linear(hidden, width + 3 + SHIFTS, dtype=dtype)
        self.write_head = nn.Linear(hidden, 3 * width + 3 + SHIFTS, dtype=dtype)
        self.output = nn.Linear(hidden + width, hidden, dtype=dtype)
        bound = hidden ** -0.5  # nn.Linear's init on the controller's output, as rnndsl's
        self.read_start, self.write_start = (
            nn.Parameter(torch.empty(slots, dtype=dtype).uniform_(-bound, bound))
            for _ in range(2))

    def initial_state(self, batch: int) -> dict:
        p = self.output.weight
        zeros = lambda *shape: torch.zeros(batch, *shape, dtype=p.dtype)  # noqa: E731
        s = self.sizes
        return {"h": zeros(s["hidden"]), "c": zeros(s["hidden"]),
                "M": zeros(s["slots"], s["width"]), "w_read": zeros(s["slots"]),
                "w_write": zeros(s["slots"]), "r": zeros(s["width"])}

    def forward(self, x, state: dict | None = None, lengths=None):
        T, B = x.shape[:2]
        state = dict(state or self.initial_state(B))
        width = self.sizes["width"]
        outputs = []
        for t in range(T):
            h, c = self.controller(torch.cat([x[t], state["r"]], -1), (state["h"], state["c"]))
            *addressing, erase, add = self.write_head(h).split(
                [width, 1, 1, SHIFTS, 1, width, width], -1)
            w_write = self.address(state["M"], state["w_write"], self.write_start, *addressing)
            erase = torch.sigmoid(erase)
            M = state["M"] * (1 - w_write[:, :, None] * erase[:, None, :]) + \
                w_write[:, :, None] * add[:, None, :]
            w_read = self.address(M, state["w_read"], self.read_start,
                                  *self.read_head(h).split([width, 1, 1, SHIFTS, 1], -1))
            r = torch.einsum("bs,bsw->bw", w_read, M)
            y = self.output(torch.cat([h, r], -1))
            new = {"h": h, "c": c, "M": M, "w_read": w_read, "w_write": w_write, "r": r}
            if lengths is None:
                state = new
                outputs.append(y)
                continue
            live = torch.as_tensor(t < lengths)
            state = {k: torch.where(live.view(-1, *(1,) * (v.dim() - 1)), v, state[k])
                     for k, v in new.items()}
            outputs.append(torch.where(live[:, None], y, torch.zeros_like(y)))
        return torch.stack(outputs), state

    @staticmethod
    def address(M, w_prev, start, key, strength, gate, shift, sharpening):
        """Section 3.3: content, interpolation, circular shift, sharpening. The interpolation
        takes the learned start weighting softmax(start) for what w_prev lacks of summing to 1
        (all of it at a zero w_prev, none once w_prev is a weighting)."""
        similarity = F.cosine_similarity(M, key[:, None, :], dim=-1, eps=1e-8)
        content = torch.softmax(F.softplus(strength) * similarity, -1)
        gate = torch.sigmoid(gate)
        missing = torch.relu(1 - w_prev.sum(-1, keepdim=True))
        gated = gate * content + (1 - gate) * (w_prev + missing * torch.softmax(start, -1))
        shift = torch.softmax(shift, -1)
        shifted = sum(shift[:, k, None] * torch.roll(gated, k - SHIFTS // 2, dims=-1)
                      for k in range(SHIFTS))
        sharpened = shifted ** (1 + F.softplus(sharpening))
        return sharpened / sharpened.sum(-1, keepdim=True).clamp_min(1e-30)

    # -- rnndsl's parameters ------------------------------------------------------------------
    def stacked(self, params: dict) -> dict:
        """The module's parameters (by `named_parameters` names) made from those of the built-in
        `ntm` spec (arrays or tensors by rnndsl's names), joined with torch.cat, so that
        autograd through torch.func.functional_call reaches rnndsl's tensors."""
        tensor = lambda p: torch.as_tensor(params[p])  # noqa: E731
        out = {}
        for head, layout in (("read_head", READ_HEAD), ("write_head", WRITE_HEAD)):
            hidden = self.sizes["hidden"]
            out[f"{head}.weight"] = torch.cat([tensor(w).reshape(-1, hidden) for w, _ in layout])
            out[f"{head}.bias"] = torch.cat([tensor(b).reshape(-1) for _, b in layout])
        out["output.weight"], out["output.bias"] = tensor("W_output"), tensor("b_output")
        out["read_start"], out["write_start"] = tensor("w_read_start"), tensor("w_write_start")
        split = self.sizes["input"] + self.sizes["width"]  # W_controller multiplies [x, r, h]
        W = tensor("W_controller")
        out["controller.weight_ih"], out["controller.weight_hh"] = W[:, :split], W[:, split:]
        out["controller.bias_ih"] = tensor("b_controller")
        out["controller.bias_hh"] = torch.zeros_like(out["controller.bias_ih"])
        return out

    @torch.no_grad()
    def load_rnndsl(self, params: dict):
        """Copy the parameters of the built-in `ntm` spec (arrays by rnndsl's names)."""
        own = dict(self.named_parameters())
        for name, value in self.stacked(params).items():
            own[name].copy_(value)
