"""``nn.RNN``, ``nn.GRU``, ``nn.LSTM``: batch-first or not, several layers, both directions, an
initial state, packed sequences of any lengths in any order, a final state that reaches the
loss.

Every step of every layer and direction forms an input part ``u_t = W_ih x_t + b_ih`` and a
hidden part ``v_t = W_hh h_{t-1} + b_hh`` of its gates, so, with ``δu_t`` and ``δv_t`` the
gradients of the loss at them (equal, but for a GRU's ``n`` gate, where ``v`` is scaled by
``r``),

    g_b(W_ih) = Σ_t δu_bt x_btᵀ,   g_b(b_ih) = Σ_t δu_bt,
    g_b(W_hh) = Σ_t δv_bt h_b,t-1ᵀ,   g_b(b_hh) = Σ_t δv_bt,

as for a ``Linear`` over the steps. The rule reads the call in the layer's own layout
(``own_layout``): each *column* of the layer's batch (an index along its batch dimension, or
a packed sequence in the order its ``unsorted_indices`` restore) is one sequence, whose rows
and initial state must hold one example's data or none's (:attr:`Call.examples`). It runs the
recurrence on the columns, padded to the longest, with the layer's own weights in PyTorch's
gate order (LSTM ``i, f, g, o``; GRU ``r, z, n``), a step changing only the sequences that
have not ended; takes every ``δu_t`` and ``δv_t`` from one backward pass of the ``δ`` of the
output and of the final states through it; forms the sums above per column, and adds each
column's to its example's. The unrolled outputs and final states are compared with the
layer's own on every call; where they differ, the rule steps aside.

Outside the rule: LSTM's ``proj_size``, dropout between layers in training mode, unbatched
input, and a sequence holding no example's data whose output reaches the loss.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

from pergrad.checks import agree
from pergrad.rules.base import Call, register_rule


def _supports(layer: nn.RNNBase) -> str | None:
    if getattr(layer, "proj_size", 0):
        return "proj_size > 0"
    if layer.dropout and layer.training:
        return "dropout between layers in training mode"
    return None


class _Unrolled:
    """The recurrence of one layer and direction on the columns, keeping what the
    per-example gradients need: its inputs ``x``, the states ``h_{t-1}`` and the
    pre-activations."""

    def __init__(self, layer: nn.RNNBase, suffix: str, x: Tensor, state, active, reverse: bool):
        get = lambda name: getattr(layer, f"{name}{suffix}", None)  # noqa: E731
        self.names = {
            kind: f"{kind}{suffix}" for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
        }
        w_ih, w_hh, b_ih, b_hh = (get(k) for k in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))
        self.x = x
        self.inputs = _tracked(torch.nn.functional.linear(x, w_ih.detach(), _detach(b_ih)))
        mode = layer.mode
        steps = range(x.shape[1])
        h, c = state
        hidden_parts, previous, outputs = [], [], [None] * x.shape[1]
        for t in reversed(steps) if reverse else steps:
            previous.append(h)
            part = _tracked(torch.nn.functional.linear(h, w_hh.detach(), _detach(b_hh)))
            hidden_parts.append(part)
            z = self.inputs[:, t]
            new_c = None
            if mode == "LSTM":
                i, f, g, o = (z + part).chunk(4, dim=-1)
                new_c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                new_h = torch.sigmoid(o) * torch.tanh(new_c)
            elif mode == "GRU":
                r_i, z_i, n_i = z.chunk(3, dim=-1)
                r_h, z_h, n_h = part.chunk(3, dim=-1)
                r, update = torch.sigmoid(r_i + r_h), torch.sigmoid(z_i + z_h)
                new_h = (1 - update) * torch.tanh(n_i + r * n_h) + update * h
            else:
                act = torch.tanh if mode == "RNN_TANH" else torch.relu
                new_h = act(z + part)
            if active is None:
                h, c = new_h, new_c
                outputs[t] = h
            else:  # a sequence that has ended keeps its state and outputs zeros
                h = torch.where(active[:, t], new_h, h)
                c = None if new_c is None else torch.where(active[:, t], new_c, c)
                outputs[t] = new_h * active[:, t]
        if reverse:
            previous.reverse()
            hidden_parts.reverse()
        self.previous = torch.stack(previous, 1)  # h_{t-1}: (B, T, H)
        self.hidden_parts = hidden_parts  # W_hh h_{t-1} + b_hh, one (B, G) per step
        self.output = torch.stack(outputs, 1)  # (B, T, H)
        self.final = (h, c)

    def grads(self, input_grad: Tensor, hidden_grads: list[Tensor]) -> dict[str, Tensor]:
        """Per-column gradients from ``δ`` at the input part ``(B, T, G)`` and at each
        step's hidden part."""
        hidden_grad = torch.stack(hidden_grads, 1)  # (B, T, G)
        return {
            self.names["weight_ih"]: torch.einsum("btg,bti->bgi", input_grad, self.x.detach()),
            self.names["weight_hh"]: torch.einsum(
                "btg,bth->bgh", hidden_grad, self.previous.detach()
            ),
            self.names["bias_ih"]: input_grad.sum(1),
            self.names["bias_hh"]: hidden_grad.sum(1),
        }


def _tracked(tensor: Tensor) -> Tensor:
    """``tensor``, with autograd asked to give its gradient (a leaf where nothing before it
    needs one: the first layer's input part, the first step's hidden part)."""
    return tensor if tensor.requires_grad else tensor.requires_grad_()


def _detach(tensor: Tensor | None) -> Tensor | None:
    return None if tensor is None else tensor.detach()


class _Columns:
    """A call's sequences as columns ``(B', T, …)`` in the layer's batch order, each
    column's example, and, for packed sequences, which steps of each column exist."""

    def __init__(self, layer: nn.RNNBase, call: Call):
        x = call.args[0] if call.args else call.kwargs["input"]
        hx = call.args[1] if len(call.args) > 1 else call.kwargs.get("hx")
        self.packed = x if isinstance(x, PackedSequence) else None
        if self.packed is not None:
            self.x, lengths = pad_packed_sequence(x, batch_first=True)
            rows = call.examples(x.data, 0)
            ids = self.like_input(rows.unsqueeze(1), padding=-1).squeeze(2)  # (B', T)
            steps = torch.arange(self.x.shape[1], device=ids.device)
            self.active = (steps < lengths.to(ids.device).unsqueeze(1)).unsqueeze(2)
        elif x.dim() == 3:
            self.x = x if layer.batch_first else x.transpose(0, 1)
            ids = call.examples(x, 0 if layer.batch_first else 1).unsqueeze(1)
            self.active = None
        else:
            raise ValueError("unbatched input: outside the rule")
        self.x = self.x.detach()
        size = len(self.x)
        states = [] if hx is None else [hx] if isinstance(hx, Tensor) else list(hx)
        self.examples = _union([ids, *(call.examples(s, 1).unsqueeze(1) for s in states)])
        directions = 2 if layer.bidirectional else 1
        zeros = self.x.new_zeros(layer.num_layers * directions, size, layer.hidden_size)
        h0 = states[0].detach() if states else zeros
        c0 = states[1].detach() if len(states) > 1 else zeros
        self.initial = [(h0[k], c0[k] if layer.mode == "LSTM" else None) for k in range(len(h0))]

    def like_input(self, data: Tensor, padding: float = 0.0) -> Tensor:
        """Packed rows ``(N, …)`` laid out as the input's columns ``(B', T, …)``."""
        packed = self.packed
        sequence = PackedSequence(
            data, packed.batch_sizes, packed.sorted_indices, packed.unsorted_indices
        )
        return pad_packed_sequence(sequence, batch_first=True, padding_value=padding)[0]

    def output(self, layer: nn.RNNBase, output: Tensor | PackedSequence) -> Tensor:
        """The layer's output (or its ``δ``) as columns ``(B', T, …)``."""
        if self.packed is not None:
            data = output.data if isinstance(output, PackedSequence) else output
            return self.like_input(data)
        return output if layer.batch_first else output.transpose(0, 1)


def _union(ids: list[Tensor]) -> Tensor:
    """The one example each column's entries hold (``-1``: none).

    Raises:
        ValueError: a column holds several examples.
    """
    found = torch.cat(ids, 1)
    high = found.amax(1)
    low = torch.where(found >= 0, found, high.unsqueeze(1)).amin(1)
    if bool((low != high).any()):
        raise ValueError("a sequence or its initial state holds several examples' data")
    return high


def recurrent(layer: nn.RNNBase, call: Call) -> dict[str, Tensor]:
    columns = _Columns(layer, call)
    directions = 2 if layer.bidirectional else 1
    with torch.enable_grad():
        sequence, runs = columns.x, []
        for k in range(layer.num_layers):
            found = []
            for d, reverse in enumerate((False, True)[:directions]):
                suffix = f"_l{k}" + ("_reverse" if reverse else "")
                state = columns.initial[k * directions + d]
                found.append(_Unrolled(layer, suffix, sequence, state, columns.active, reverse))
            runs += found
            sequence = torch.cat([run.output for run in found], dim=-1)
        finals = [torch.stack([run.final[i] for run in runs]) for i in range(_states(layer))]
        tensors = [t for run in runs for t in (run.inputs, *run.hidden_parts)]
        deltas = [columns.output(layer, call.output_grads[0]), *call.output_grads[1:]]
        found = torch.autograd.grad([sequence, *finals], tensors, deltas, allow_unused=True)
    with torch.no_grad():  # the layer's own outputs (its forward alone, no hooks)
        output, state = type(layer).forward(layer, *call.args, **call.kwargs)
    expected = [columns.output(layer, output), *([state] if isinstance(state, Tensor) else state)]
    if not all(agree(u.detach(), e) for u, e in zip([sequence, *finals], expected)):
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
    return _by_example(layer, grads, columns.examples, deltas, call.batch_size)


def _states(layer: nn.RNNBase) -> int:
    return 2 if layer.mode == "LSTM" else 1


def _by_example(layer, grads: dict[str, Tensor], examples: Tensor, deltas, size: int):
    """Each column's gradients added to its example's.

    Raises:
        ValueError: the output of a column that holds no example's data reaches the loss.
    """
    none = examples < 0
    if bool(none.any()):
        reached = deltas[0][none].abs().sum() + sum(d[:, none].abs().sum() for d in deltas[1:])
        if bool(reached > 0):
            raise ValueError("a sequence holding no example's data reaches the loss")
    owned = dict(layer.named_parameters())
    keep = ~none
    return {
        name: g.new_zeros(size, *g.shape[1:]).index_add_(0, examples[keep], g[keep])
        for name, g in grads.items()
        if name in owned
    }


for _kind in (nn.RNN, nn.GRU, nn.LSTM):
    register_rule(_kind, supports=_supports, own_layout=True)(recurrent)
