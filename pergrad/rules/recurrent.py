"""``nn.RNN``, ``nn.GRU``, ``nn.LSTM``: batch-first or not, several layers, both directions, an
initial state, packed sequences of any lengths in any order, a final state that reaches the
loss.

Every step of every layer and direction forms an input part ``u_t = W_ih x_t + b_ih`` and a
hidden part ``v_t = W_hh h_{t-1} + b_hh`` of its gates, so, with ``δu_t`` and ``δv_t`` the
gradients of the loss at them,

    g_b(W_ih) = Σ_t δu_bt x_btᵀ,   g_b(b_ih) = Σ_t δu_bt,
    g_b(W_hh) = Σ_t δv_bt h_b,t-1ᵀ,   g_b(b_hh) = Σ_t δv_bt,

as for a ``Linear`` over the steps. The gates take ``u_t + v_t`` (``δv_t = δu_t``), but for a
GRU's ``n`` gate, which takes ``u^n_t + r_t ⊙ v^n_t`` (``δv^n_t = r_t ⊙ δu^n_t``). An LSTM
with ``proj_size`` projects its state, ``h_t = W_hr m_t`` with ``m_t = o_t ⊙ tanh(c_t)``, so

    g_b(W_hr) = Σ_t δh_bt m_btᵀ,   δh_t = δy_t + W_hhᵀ δu_{t'} (+ δh_n at the last step),

with ``δy_t`` the gradient at the layer's output and ``t'`` the step after ``t`` (its
direction's); ``m_t`` is recomputed from the gates and the cell states ``c_t``, one step at a
time, and ``W_hr m_t`` compared with the layer's output.

The rule runs each layer again with PyTorch's own kernel on its input parts ``u`` (all steps
in one product), given as the input of a layer whose input weights select them and whose
hidden weights are the layer's: one backward pass of the ``δ`` of the output and of the final
states through those runs gives every ``δu_t``. The states ``h_{t-1}`` are the runs' outputs
one step back (the initial state first), and ``r_t`` is recomputed from them. Everything is
read in the layer's own layout (``own_layout``): each *column* of its batch (an index along
its batch dimension, or a packed sequence in the order its ``unsorted_indices`` restore) is
one sequence, whose rows and initial state must hold one example's data or none's
(:attr:`Call.examples`); each column's sums go to its example. The runs' outputs and final
states are compared with the layer's own on every call; where they differ, the rule steps
aside.

Outside the rule: dropout between layers in training mode, unbatched input, and a sequence
holding no example's data whose output reaches the loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

from pergrad.checks import agree
from pergrad.rules.base import Call, register_rule

_KERNELS = {
    "RNN_TANH": torch.rnn_tanh,
    "RNN_RELU": torch.rnn_relu,
    "GRU": torch.gru,
    "LSTM": torch.lstm,
}


def _supports(layer: nn.RNNBase) -> str | None:
    if layer.dropout and layer.training:
        return "dropout between layers in training mode"
    return None


class _Sequences:
    """A call's sequences: its input in the layer's layout, its initial states, and how to
    read a tensor of that layout as columns ``(B', T, …)`` in the layer's batch order."""

    def __init__(self, layer: nn.RNNBase, call: Call):
        x = call.args[0] if call.args else call.kwargs["input"]
        hx = call.args[1] if len(call.args) > 1 else call.kwargs.get("hx")
        self.layer = layer
        self.packed = x if isinstance(x, PackedSequence) else None
        if self.packed is None and x.dim() != 3:
            raise ValueError("unbatched input: outside the rule")
        self.data = (x.data if self.packed is not None else x).detach()
        if self.packed is not None:
            ids = self.columns(call.examples(x.data, 0).unsqueeze(1), padding=-1).squeeze(2)
            self.lengths = pad_packed_sequence(x, batch_first=True)[1]
            self.size = len(ids)
        else:
            ids = call.examples(x, 0 if layer.batch_first else 1).unsqueeze(1)
            self.size = x.shape[0 if layer.batch_first else 1]
            self.lengths = torch.full((self.size,), x.shape[1 if layer.batch_first else 0])
        states = [] if hx is None else [hx] if isinstance(hx, Tensor) else list(hx)
        self.examples = _union([ids, *(call.examples(s, 1).unsqueeze(1) for s in states)])
        count = layer.num_layers * (2 if layer.bidirectional else 1)
        self.proj = getattr(layer, "proj_size", 0)
        self.width = self.proj or layer.hidden_size  # of h, each direction's output
        sizes = [self.width, layer.hidden_size][: 2 if layer.mode == "LSTM" else 1]
        self.initial = [
            states[i].detach() if states else self.data.new_zeros(count, self.size, n)
            for i, n in enumerate(sizes)
        ]

    def columns(self, rows: Tensor, padding: float = 0.0) -> Tensor:
        """A tensor of the layer's layout (its input's or output's, or a packed sequence's
        rows) as columns ``(B', T, …)``."""
        if self.packed is None:
            return rows if self.layer.batch_first else rows.transpose(0, 1)
        p = self.packed
        sequence = PackedSequence(rows, p.batch_sizes, p.sorted_indices, p.unsorted_indices)
        return pad_packed_sequence(sequence, batch_first=True, padding_value=padding)[0]

    def run(self, u: Tensor, k: int) -> tuple[Tensor, list[Tensor]]:
        """Layer ``k`` run by PyTorch's kernel on its input parts ``u`` (both directions'
        side by side): its output, in the layer's layout, and final states, in column
        order."""
        layer, directions = self.layer, 2 if self.layer.bidirectional else 1
        gates = u.shape[-1] // directions
        params = []
        for d in range(directions):
            select = u.new_zeros(gates, gates * directions)
            select[:, d * gates : (d + 1) * gates] = torch.eye(gates, dtype=u.dtype)
            suffix = f"_l{k}" + ("_reverse" if d else "")
            params.append(select)
            params.append(getattr(layer, f"weight_hh{suffix}").detach())
            if layer.bias:
                params += [u.new_zeros(gates), getattr(layer, f"bias_hh{suffix}").detach()]
            if self.proj:
                params.append(getattr(layer, f"weight_hr{suffix}").detach())
        hx = [h[k * directions : (k + 1) * directions] for h in self.initial]
        if self.packed is not None and self.packed.sorted_indices is not None:
            hx = [h.index_select(1, self.packed.sorted_indices) for h in hx]
        hx = tuple(hx) if layer.mode == "LSTM" else hx[0]
        kernel, options = _KERNELS[layer.mode], (layer.bias, 1, 0.0, False, layer.bidirectional)
        if self.packed is None:
            found = kernel(u, hx, params, *options, layer.batch_first)
        else:
            found = kernel(u, self.packed.batch_sizes, hx, params, *options)
        output, states = found[0], list(found[1:])
        if self.packed is not None and self.packed.unsorted_indices is not None:
            states = [s.index_select(1, self.packed.unsorted_indices) for s in states]
        return output, states

    def previous(self, output: Tensor, k: int, d: int) -> Tensor:
        """``h_{t-1}`` of layer ``k``, direction ``d``, as columns ``(B', T, H)``: its output
        one step back, the initial state first (the reverse direction starts at each
        sequence's last step)."""
        size, directions = self.width, 2 if self.layer.bidirectional else 1
        h = self.columns(output)[..., d * size : (d + 1) * size]
        first = self.initial[0][k * directions + d].unsqueeze(1)
        if d == 0:
            return torch.cat([first, h[:, :-1]], 1)
        later = torch.cat([h[:, 1:], torch.zeros_like(h[:, :1])], 1)
        steps = torch.arange(h.shape[1], device=h.device)
        inside = (steps + 1 < self.lengths.to(h.device).unsqueeze(1)).unsqueeze(2)
        return torch.where(inside, later, first)


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
    sequences = _Sequences(layer, call)
    directions = 2 if layer.bidirectional else 1
    with torch.enable_grad():
        inputs, parts, outputs, finals = sequences.data, [], [], []
        for k in range(layer.num_layers):
            names = [f"_l{k}" + ("_reverse" if d else "") for d in range(directions)]
            u = [
                _tracked(
                    F.linear(
                        inputs,
                        getattr(layer, f"weight_ih{n}").detach(),
                        getattr(layer, f"bias_ih{n}").detach() if layer.bias else None,
                    )
                )
                for n in names
            ]
            output, states = sequences.run(torch.cat(u, -1), k)
            parts.append((inputs, u))
            outputs.append(output)
            finals.append(states)
            inputs = output
        finals = [torch.cat([f[i] for f in finals]) for i in range(len(finals[0]))]
        tensors = [t for _, u in parts for t in u]
        between = outputs[:-1] if sequences.proj else []  # δy of each layer but the last
        found = torch.autograd.grad(
            [inputs, *finals], tensors + between, list(call.output_grads), allow_unused=True
        )
    ran = [inputs, *finals]
    same = all(agree(r.detach(), e, call.precision) for r, e in zip(ran, call.outputs))
    if len(ran) != len(call.outputs) or not same:
        raise ValueError("the recurrence run again differs from the layer's output")
    output_grads = [*found[len(tensors) :], call.output_grads[0]]
    grads = {}
    with torch.no_grad():
        for k, (x, u) in enumerate(parts):
            x = sequences.columns(x)
            for d, part in enumerate(u):
                delta = found[k * directions + d]
                delta = torch.zeros_like(part) if delta is None else delta
                grads.update(_sums(layer, sequences, k, d, x, part, delta, outputs[k]))
                if sequences.proj:
                    final = call.output_grads[1][k * directions + d]
                    grads.update(
                        _projection(layer, sequences, k, d, part, delta, outputs[k],
                                    output_grads[k], final, call.precision)
                    )  # fmt: skip
    return _by_example(grads, sequences, call.output_grads, call.batch_size)


def _sums(layer, sequences: _Sequences, k: int, d: int, x, u, delta, output) -> dict:
    """Each column's ``g`` of layer ``k``, direction ``d``, from ``δu`` (in the layer's
    layout)."""
    suffix = f"_l{k}" + ("_reverse" if d else "")
    delta_u = sequences.columns(delta)
    previous = sequences.previous(output, k, d)
    delta_v = delta_u
    if layer.mode == "GRU":  # δv^n = r ⊙ δu^n
        w_hh = getattr(layer, f"weight_hh{suffix}")
        b_hh = getattr(layer, f"bias_hh{suffix}") if layer.bias else None
        v = F.linear(previous, w_hh, b_hh)
        r = torch.sigmoid(sequences.columns(u.detach()).chunk(3, -1)[0] + v.chunk(3, -1)[0])
        reset, update, new = delta_u.chunk(3, -1)
        delta_v = torch.cat([reset, update, r * new], -1)
    found = {
        f"weight_ih{suffix}": torch.einsum("btg,bti->bgi", delta_u, x),
        f"weight_hh{suffix}": torch.einsum("btg,bth->bgh", delta_v, previous),
    }
    if layer.bias:
        found[f"bias_ih{suffix}"] = delta_u.sum(1)
        found[f"bias_hh{suffix}"] = delta_v.sum(1)
    return found


def _projection(
    layer, sequences: _Sequences, k, d, u, delta, output, output_grad, final, precision
):
    """Each column's ``g(W_hr)`` of layer ``k``, direction ``d`` of an LSTM with
    ``proj_size``, from ``δu`` (in the layer's layout), the layer's output and its ``δy``,
    and the ``δ`` of the final state (``precision``: autocast's, where it ran the layer).

    Raises:
        ValueError: ``W_hr m_t`` recomputed differs from the layer's output.
    """
    suffix = f"_l{k}" + ("_reverse" if d else "")
    w_hh, w_hr = getattr(layer, f"weight_hh{suffix}"), getattr(layer, f"weight_hr{suffix}")
    b_hh = getattr(layer, f"bias_hh{suffix}") if layer.bias else None
    previous = sequences.previous(output, k, d)  # h_{t-1}, (B', T, P)
    gates = sequences.columns(u) + F.linear(previous, w_hh, b_hh)
    i, f, g, o = gates.chunk(4, -1)
    i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
    steps, lengths = gates.shape[1], sequences.lengths.to(gates.device).unsqueeze(1)
    c0 = sequences.initial[1][k * (2 if layer.bidirectional else 1) + d]
    c, cells = c0, [None] * steps
    for t in range(steps) if d == 0 else reversed(range(steps)):  # c_t, in its direction
        if d:  # a reversed sequence starts at its last step
            c = torch.where(t + 1 >= lengths, c0, c)
        c = cells[t] = f[:, t] * c + i[:, t] * g[:, t]
    m = o * torch.tanh(torch.stack(cells, 1))
    width = sequences.width
    h = sequences.columns(output)[..., d * width : (d + 1) * width]
    inside = (torch.arange(steps, device=h.device) < lengths).unsqueeze(2)
    projected = torch.where(inside, F.linear(m, w_hr), 0)
    if not agree(projected, torch.where(inside, h, 0), precision):
        raise ValueError("the projected state computed again differs from the layer's output")
    delta_u = sequences.columns(delta)
    later = delta_u[:, 1:] if d == 0 else delta_u[:, :-1]  # δu of the step after each one
    zero = torch.zeros_like(delta_u[:, :1])
    following = torch.cat([later, zero] if d == 0 else [zero, later], 1) @ w_hh
    delta_h = sequences.columns(output_grad)[..., d * width : (d + 1) * width] + following
    last = (lengths - 1 if d == 0 else torch.zeros_like(lengths)).squeeze(1)
    delta_h = delta_h.index_put((torch.arange(len(last)), last), final, accumulate=True)
    return {f"weight_hr{suffix}": torch.einsum("btp,bth->bph", delta_h * inside, m)}


def _tracked(tensor: Tensor) -> Tensor:
    """``tensor``, with autograd asked to give its gradient (a leaf where nothing before it
    needs one: the first layer's input parts)."""
    return tensor if tensor.requires_grad else tensor.requires_grad_()


def _by_example(grads: dict[str, Tensor], sequences: _Sequences, deltas, size: int):
    """Each column's gradients added to its example's.

    Raises:
        ValueError: the output of a column that holds no example's data reaches the loss.
    """
    examples = sequences.examples
    none = examples < 0
    if bool(none.any()):
        reached = sequences.columns(deltas[0])[none].abs().sum()
        reached = reached + sum(d[:, none].abs().sum() for d in deltas[1:])
        if bool(reached > 0):
            raise ValueError("a sequence holding no example's data reaches the loss")
    keep = ~none
    return {
        name: g.new_zeros(size, *g.shape[1:]).index_add_(0, examples[keep], g[keep])
        for name, g in grads.items()
    }


for _kind in (nn.RNN, nn.GRU, nn.LSTM):
    register_rule(_kind, supports=_supports, own_layout=True)(recurrent)
