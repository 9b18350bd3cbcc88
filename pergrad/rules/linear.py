"""``nn.Linear``: ``g_b = δ_bᵀ a_b`` (summed over positions), ``g_b = δ_b`` for the bias.

On ``(B, in)`` the moments are two matrix products, ``Σ_b g_b = δᵀa`` and
``Σ_b g_b² = (δ²)ᵀ(a²)``, and each example's squared norm is ``|g_b|² = |δ_b|²·|a_b|²``. On
``(B, …, in)`` the moments come from per-example gradients formed a few examples at a time,
or, for few positions, from the position-pair expansion
(:func:`pergrad.rules.base.pair_moments`), whichever costs less; the norms from
``|g_b|² = Σ_{t,t'} (δ_bt·δ_bt')(a_bt·a_bt')`` where that costs less than forming ``g_b``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pergrad.reduce import REDUCE_ELEMENTS, Moments, chunked_moments_in_place, chunks
from pergrad.rules.base import (
    Call,
    gram_cheaper,
    pair_moments,
    pairs_cheaper,
    positions,
    register_rule,
)


def weight_grads(a: Tensor, delta: Tensor) -> Tensor:
    """``g_b = Σ_t δ_btᵀ a_bt`` for ``a (B, …, in)``, ``δ (B, …, out)``: ``(B, out, in)``."""
    if a.dim() == 2:
        return delta.unsqueeze(2) * a.unsqueeze(1)
    return torch.bmm(positions(delta).mT, positions(a))


def bias_grads(delta: Tensor) -> Tensor:
    """``g_b = Σ_t δ_bt`` for ``δ (B, …, out)``: ``(B, out)``."""
    return delta if delta.dim() == 2 else positions(delta).sum(1)


def weight_moments(a: Tensor, delta: Tensor) -> Moments:
    """``(Σ_b g_b, Σ_b g_b²)`` of :func:`weight_grads` without all ``B`` gradients at once."""
    if a.dim() == 2:
        return Moments(delta.T @ a, delta.square().T @ a.square())
    a, delta = positions(a), positions(delta)
    (batch, count, columns), rows = a.shape, delta.shape[-1]
    if pairs_cheaper(batch, count, rows, columns):
        grad_sum = delta.reshape(-1, rows).T @ a.reshape(-1, columns)
        pairs = pair_moments(delta.unsqueeze(0), a.unsqueeze(0), grad_sum.unsqueeze(0))
        return Moments(grad_sum, pairs[0])
    parts = chunks(batch, rows * columns, REDUCE_ELEMENTS)
    return chunked_moments_in_place(torch.bmm(delta[i:j].mT, a[i:j]) for i, j in parts)


def weight_norms(a: Tensor, delta: Tensor) -> Tensor | None:
    """``|g_b|²`` of :func:`weight_grads`, ``(B,)``, or ``None`` where forming ``g_b`` costs
    less than the closed form."""
    if a.dim() == 2:
        return delta.square().sum(1) * a.square().sum(1)
    a, delta = positions(a), positions(delta)
    if not gram_cheaper(a.shape[1], delta.shape[-1], a.shape[-1]):
        return None
    return (torch.bmm(delta, delta.mT) * torch.bmm(a, a.mT)).sum((1, 2))


def bias_norms(delta: Tensor) -> Tensor:
    """``|g_b|²`` of :func:`bias_grads`, ``(B,)``."""
    return bias_grads(delta).square().sum(1)


def bias_moments(delta: Tensor) -> Moments:
    g = bias_grads(delta)
    return Moments(g.sum(0), g.square().sum(0))


def _moments(layer: nn.Linear, call: Call) -> dict[str, Moments]:
    a, delta = call.input, call.output_grad
    if a.dim() == 2:  # δ² serves the weight's squares and the bias's
        squares = delta.square()
        found = {"weight": Moments(torch.mm(delta.t(), a), torch.mm(squares.t(), a.square()))}
        if layer.bias is not None:
            found["bias"] = Moments(torch.sum(delta, 0), torch.sum(squares, 0))
        return found
    found = {"weight": weight_moments(a, delta)}
    if layer.bias is not None:
        found["bias"] = bias_moments(delta)
    return found


def _norms(layer: nn.Linear, call: Call) -> dict[str, Tensor] | None:
    weight = weight_norms(call.input, call.output_grad)
    if weight is None:
        return None
    found = {"weight": weight}
    if layer.bias is not None:
        found["bias"] = bias_norms(call.output_grad)
    return found


@register_rule(nn.Linear, moments=_moments, norms=_norms, features=lambda layer: 1)
def linear(layer: nn.Linear, call: Call) -> dict[str, Tensor]:
    found = {"weight": weight_grads(call.input, call.output_grad)}
    if layer.bias is not None:
        found["bias"] = bias_grads(call.output_grad)
    return found
