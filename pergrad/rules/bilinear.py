"""``nn.Bilinear``: ``y = x₁ᵀ W x₂ + b``, so ``g_b(W)[o, i, j] = Σ_t δ_bt[o] x₁_bt[i] x₂_bt[j]``
and ``g_b(b) = Σ_t δ_bt``, summed over the positions ``t`` of example ``b``.

On ``(B, in)`` the moments have closed forms, ``Σ_b g_b = Σ_b δ_b ⊗ x₁_b ⊗ x₂_b`` and
``Σ_b g_b² = Σ_b δ_b² ⊗ x₁_b² ⊗ x₂_b²``, and each example's squared norm is
``|g_b|² = |δ_b|²·|x₁_b|²·|x₂_b|²``; with positions, per-example gradients are formed a few
examples at a time.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pergrad.reduce import Moments
from pergrad.rules.base import Call, positions, register_rule


def _inputs(call: Call) -> tuple[Tensor, Tensor, Tensor]:
    x1 = call.args[0] if call.args else call.kwargs["input1"]
    x2 = call.args[1] if len(call.args) > 1 else call.kwargs["input2"]
    return x1, x2, call.output_grad


def _bias(layer: nn.Bilinear, delta: Tensor, found: dict) -> dict:
    if layer.bias is not None:
        found["bias"] = delta if delta.dim() == 2 else positions(delta).sum(1)
    return found


def _moments(layer: nn.Bilinear, call: Call) -> dict[str, Moments] | None:
    x1, x2, delta = _inputs(call)
    if delta.dim() != 2:
        return None
    found = {
        "weight": Moments(
            torch.einsum("bo,bi,bj->oij", delta, x1, x2),
            torch.einsum("bo,bi,bj->oij", delta.square(), x1.square(), x2.square()),
        )
    }
    if layer.bias is not None:
        found["bias"] = Moments(delta.sum(0), delta.square().sum(0))
    return found


def _norms(layer: nn.Bilinear, call: Call) -> dict[str, Tensor] | None:
    x1, x2, delta = _inputs(call)
    if delta.dim() != 2:
        return None
    squared = lambda t: t.square().sum(1)  # noqa: E731
    found = {"weight": squared(delta) * squared(x1) * squared(x2)}
    if layer.bias is not None:
        found["bias"] = squared(delta)
    return found


@register_rule(nn.Bilinear, moments=_moments, norms=_norms, features=lambda layer: 1)
def bilinear(layer: nn.Bilinear, call: Call) -> dict[str, Tensor]:
    x1, x2, delta = _inputs(call)
    if delta.dim() == 2:
        weight = torch.einsum("bo,bi,bj->boij", delta, x1, x2)
    else:
        weight = torch.einsum("bto,bti,btj->boij", *map(positions, (delta, x1, x2)))
    return _bias(layer, delta, {"weight": weight})
