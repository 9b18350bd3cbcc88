"""``nn.LayerNorm``, ``nn.GroupNorm``, ``nn.RMSNorm``: with ``â`` the normalized input,
``g_b = Σ δ_b ⊙ â_b`` for the weight and ``Σ δ_b`` for the bias, summed over the positions
of example ``b``: ``B × d`` numbers, small enough to form at once."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from pergrad.rules.base import Call, register_rule


def _affine(layer: nn.Module, normalized: Tensor, delta: Tensor, shape) -> dict[str, Tensor]:
    """Weight and bias gradients, summing ``(B, …, *shape)`` down to ``(B, *shape)``."""
    per_example = lambda t: t.reshape(len(t), -1, *shape).sum(1)  # noqa: E731
    found = {}
    if getattr(layer, "weight", None) is not None:
        found["weight"] = per_example(delta * normalized)
    if getattr(layer, "bias", None) is not None:
        found["bias"] = per_example(delta)
    return found


@register_rule(nn.LayerNorm, features=lambda layer: len(layer.normalized_shape))
def layer_norm(layer: nn.LayerNorm, call: Call) -> dict[str, Tensor]:
    shape = layer.normalized_shape
    normalized = F.layer_norm(call.input, shape, eps=layer.eps)
    return _affine(layer, normalized, call.output_grad, shape)


@register_rule(nn.RMSNorm, features=lambda layer: len(layer.normalized_shape))
def rms_norm(layer: nn.RMSNorm, call: Call) -> dict[str, Tensor]:
    shape = layer.normalized_shape
    normalized = F.rms_norm(call.input, shape, eps=layer.eps)
    return _affine(layer, normalized, call.output_grad, shape)


@register_rule(nn.GroupNorm)
def group_norm(layer: nn.GroupNorm, call: Call) -> dict[str, Tensor]:
    x, delta = call.input, call.output_grad
    normalized = F.group_norm(x, layer.num_groups, eps=layer.eps)
    channels = (layer.num_channels,)
    per_channel = lambda t: t.reshape(len(t), layer.num_channels, -1).transpose(1, 2)  # noqa: E731
    return _affine(layer, per_channel(normalized), per_channel(delta), channels)
