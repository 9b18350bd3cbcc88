"""``nn.RNN``, ``nn.GRU``, ``nn.LSTM``, the call's sequences ``(B, T, in)`` (a
``batch_first=False`` layer's ``(T, B, in)`` come with the batch moved to the front).

Every step of every layer and direction forms an input part ``u_t = W_ih x_t + b_ih`` and a
hidden part ``v_t = W_hh h_{t-1} + b_hh`` of its gates, so, with ``δu_t`` and ``δv_t`` the
gradients of the loss at them (equal, but for a GRU's ``n`` gate, where ``v`` is scaled by
``r``),

    g_b(W_ih) = Σ_t δu_bt x_btᵀ,   g_b(b_ih) = Σ_t δu_bt,
    g_b(W_hh) = Σ_t δv_bt h_b,t-1ᵀ,   g_b(b_hh) = Σ_t δv_bt,

as for a ``Linear`` over the steps. The rule runs the recurrence once on the batch, unrolled
with the layer's own weights in PyTorch's gate order (LSTM ``i, f, g, o``; GRU ``r, z, n``),
takes every ``δu_t`` and ``δv_t`` from one backward pass of ``δ`` through it, and forms the
sums above. The unrolled output is compared with the layer's own on every call; where they
differ, the rule steps aside.

Outside the rule, and so computed by another path: an initial state passed in, packed
sequences, LSTM's ``proj_size``, dropout between layers in training
mode, and a final state ``h_n`` (or ``c_n``) that reaches the loss (a rule sees the gradient
of the output sequence only).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pergrad.checks import agree
from pergrad.rules.base import Call, register_rule


def _supports(layer: nn.RNNBase) -> str | None:
    if getattr(layer, "proj_size", 0):
        return "proj_size > 0"
    if layer.dropout and layer.training:
        return "dropout between layers in training mode"
    return None


class _Unrolled:
    """The recurrence of one layer and direction on the batch, keeping what the per-example
    gradients need: its inputs ``x``, the states ``h_{t-1}`` and the pre-activations."""

    def __init__(self, layer: nn.RNNBase, suffix: str, x: Tensor, reverse: bool):
        get = lambda name: getattr(layer, f"{name}{suffix}", None)  # noqa: E731
        self.names = {
            kind: f"{kind}{suffix}" for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
        }
        w_ih, w_hh, b_ih, b_hh = (get(k) for k in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))
        self.x = x
        self.inputs = _tracked(torch.nn.functional.linear(x, w_ih.detach(), _detach(b_ih)))
        mode = layer.mode
        steps = range(x.shape[1])
        h = x.new_zeros(len(x), layer.hidden_size)
        c = h
        hidden_parts, previous, outputs = [], [], [None] * x.shape[1]
        for t in reversed(steps) if reverse else steps:
            previous.append(h)
            part = _tracked(torch.nn.functional.linear(h, w_hh.detach(), _detach(b_hh)))
            hidden_parts.append(part)
            z = self.inputs[:, t]
            if mode == "LSTM":
                i, f, g, o = (z + part).chunk(4, dim=-1)
                c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                h = torch.sigmoid(o) * torch.tanh(c)
            elif mode == "GRU":
                r_i, z_i, n_i = z.chunk(3, dim=-1)
                r_h, z_h, n_h = part.chunk(3, dim=-1)
                r, update = torch.sigmoid(r_i + r_h), torch.sigmoid(z_i + z_h)
                h = (1 - update) * torch.tanh(n_i + r * n_h) + update * h
            else:
                act = torch.tanh if mode == "RNN_TANH" else torch.relu
                h = act(z + part)
            outputs[t] = h
        if reverse:
            previous.reverse()
            hidden_parts.reverse()
        self.previous = torch.stack(previous, 1)  # h_{t-1}: (B, T, H)
        self.hidden_parts = hidden_parts  # W_hh h_{t-1} + b_hh, one (B, G) per step
        self.output = torch.stack(outputs, 1)  # (B, T, H)

    def grads(self, input_grad: Tensor, hidden_grads: list[Tensor]) -> dict[str, Tensor]:
        """Per-example gradients from ``δ`` at the input part ``(B, T, G)`` and at each
        step's hidden part."""
        hidden_grad = torch.stack(hidden_grads, 1)  # (B, T, G)
        found = {
            self.names["weight_ih"]: torch.einsum("btg,bti->bgi", input_grad, self.x.detach()),
            self.names["weight_hh"]: torch.einsum(
                "btg,bth->bgh", hidden_grad, self.previous.detach()
            ),
            self.names["bias_ih"]: input_grad.sum(1),
            self.names["bias_hh"]: hidden_grad.sum(1),
        }
        return found


def _tracked(tensor: Tensor) -> Tensor:
    """``tensor``, with autograd asked to give its gradient (a leaf where nothing before it
    needs one: the first layer's input part, the first step's hidden part)."""
    return tensor if tensor.requires_grad else tensor.requires_grad_()


def _detach(tensor: Tensor | None) -> Tensor | None:
    return None if tensor is None else tensor.detach()


def recurrent(layer: nn.RNNBase, call: Call) -> dict[str, Tensor]:
    if len(call.args) != 1 or call.kwargs or not isinstance(call.input, Tensor):
        raise ValueError("an initial state or packed sequences: outside the rule")
    with torch.enable_grad():
        sequence = call.input.detach()
        runs = []
        for k in range(layer.num_layers):
            directions = []
            for reverse in (False, True)[: 2 if layer.bidirectional else 1]:
                suffix = f"_l{k}" + ("_reverse" if reverse else "")
                directions.append(_Unrolled(layer, suffix, sequence, reverse))
            runs += directions
            sequence = torch.cat([run.output for run in directions], dim=-1)
        tensors = [t for run in runs for t in (run.inputs, *run.hidden_parts)]
        found = torch.autograd.grad(sequence, tensors, call.output_grad, allow_unused=True)
    with torch.no_grad():  # the layer's own output (its forward alone, no hooks)
        if layer.batch_first:
            expected = type(layer).forward(layer, call.input)[0]
        else:  # the call has the batch on dim 0, as every call a rule reads
            expected = type(layer).forward(layer, call.input.transpose(0, 1))[0].transpose(0, 1)
    if not agree(sequence.detach(), expected):
        raise ValueError("the unrolled recurrence differs from the layer's output")
    grads, offset = {}, 0
    for run in runs:
        count = 1 + len(run.hidden_parts)
        parts = [
            torch.zeros_like(t) if g is None else g
            for t, g in zip(tensors[offset : offset + count], found[offset : offset + count])
        ]
        grads.update(run.grads(parts[0], parts[1:]))
        offset += count
    owned = dict(layer.named_parameters())
    return {name: g for name, g in grads.items() if name in owned}


for _kind in (nn.RNN, nn.GRU, nn.LSTM):
    register_rule(_kind, supports=_supports)(recurrent)
