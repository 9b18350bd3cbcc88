"""``nn.RNNCell``, ``nn.GRUCell``, ``nn.LSTMCell``: one step of a recurrent layer.

A step forms an input part ``u = W_ih x + b_ih`` and a hidden part ``v = W_hh h + b_hh`` of
its gates, so, with ``δu`` and ``δv`` the gradients of the loss at them,

    g_b(W_ih) = δu_b x_bᵀ,   g_b(b_ih) = δu_b,   g_b(W_hh) = δv_b h_bᵀ,   g_b(b_hh) = δv_b,

a ``Linear``'s rule each, with its closed forms (``Σ_b g_b² = (δ²)ᵀ(x²)``). The gates take
``u + v`` (``δv = δu``), but for a GRU's ``n`` gate, which takes ``u^n + r ⊙ v^n``. ``δu`` and
``δv`` come from the step computed again from ``u`` and ``v`` with autograd, given the ``δ`` of
every output (an LSTM cell's ``h`` and ``c``); the step computed again must equal the layer's
outputs, else the rule steps aside.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pergrad.checks import agree
from pergrad.reduce import Moments
from pergrad.rules import linear
from pergrad.rules.base import Call, register_rule

Cell = nn.RNNCell | nn.GRUCell | nn.LSTMCell


def _step(layer: Cell, u: Tensor, v: Tensor, state: list[Tensor]) -> list[Tensor]:
    """The cell's outputs from its gates' input and hidden parts, as PyTorch computes them."""
    if isinstance(layer, nn.LSTMCell):
        i, f, g, o = (u + v).chunk(4, 1)
        c = torch.sigmoid(f) * state[1] + torch.sigmoid(i) * torch.tanh(g)
        return [torch.sigmoid(o) * torch.tanh(c), c]
    if isinstance(layer, nn.GRUCell):
        (ur, uz, un), (vr, vz, vn) = u.chunk(3, 1), v.chunk(3, 1)
        r, z = torch.sigmoid(ur + vr), torch.sigmoid(uz + vz)
        n = torch.tanh(un + r * vn)
        return [(1 - z) * n + z * state[0]]
    activation = torch.tanh if layer.nonlinearity == "tanh" else torch.relu
    return [activation(u + v)]


def _parts(layer: Cell, call: Call) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The input ``x``, the hidden state ``h``, and ``δu``, ``δv``.

    Raises:
        ValueError: the step computed again differs from the layer's outputs.
    """
    x = call.input
    hx = call.args[1] if len(call.args) > 1 else call.kwargs.get("hx")
    zeros = x.new_zeros(len(x), layer.hidden_size)
    state = [zeros, zeros] if hx is None else [hx] if isinstance(hx, Tensor) else list(hx)
    state = [s.detach() for s in state]
    with torch.enable_grad():
        u = F.linear(x.detach(), layer.weight_ih.detach(), _detached(layer.bias_ih))
        v = F.linear(state[0], layer.weight_hh.detach(), _detached(layer.bias_hh))
        u, v = u.requires_grad_(), v.requires_grad_()
        outputs = _step(layer, u, v, state)
        if len(outputs) != len(call.outputs) or not all(
            agree(o.detach(), e, call.precision) for o, e in zip(outputs, call.outputs)
        ):
            raise ValueError("the step computed again differs from the cell's output")
        delta_u, delta_v = torch.autograd.grad(outputs, [u, v], list(call.output_grads))
    return x, state[0], delta_u, delta_v


def _detached(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.detach()


def _moments(layer: Cell, call: Call) -> dict[str, Moments]:
    x, h, delta_u, delta_v = _parts(layer, call)
    found = {
        "weight_ih": linear.weight_moments(x, delta_u),
        "weight_hh": linear.weight_moments(h, delta_v),
    }
    if layer.bias:
        found["bias_ih"] = linear.bias_moments(delta_u)
        found["bias_hh"] = linear.bias_moments(delta_v)
    return found


def _norms(layer: Cell, call: Call) -> dict[str, Tensor]:
    x, h, delta_u, delta_v = _parts(layer, call)
    found = {
        "weight_ih": linear.weight_norms(x, delta_u),
        "weight_hh": linear.weight_norms(h, delta_v),
    }
    if layer.bias:
        found["bias_ih"] = linear.bias_norms(delta_u)
        found["bias_hh"] = linear.bias_norms(delta_v)
    return found


def cell(layer: Cell, call: Call) -> dict[str, Tensor]:
    x, h, delta_u, delta_v = _parts(layer, call)
    found = {
        "weight_ih": linear.weight_grads(x, delta_u),
        "weight_hh": linear.weight_grads(h, delta_v),
    }
    if layer.bias:
        found["bias_ih"] = linear.bias_grads(delta_u)
        found["bias_hh"] = linear.bias_grads(delta_v)
    return found


for _kind in (nn.RNNCell, nn.GRUCell, nn.LSTMCell):
    register_rule(_kind, moments=_moments, norms=_norms, all_outputs=True)(cell)
