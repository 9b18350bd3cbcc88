"""``nn.PReLU``: ``y = max(0, x) + w · min(0, x)``, one slope per channel (dim 1) or one for
all, so ``g_b = Σ δ_b ⊙ min(0, x_b)`` over example ``b``'s positions of each channel:
``B × C`` numbers, small enough to form at once."""

from __future__ import annotations

from torch import Tensor, nn

from pergrad.rules.base import Call, register_rule


@register_rule(nn.PReLU)
def prelu(layer: nn.PReLU, call: Call) -> dict[str, Tensor]:
    x, delta = call.input, call.output_grad
    slope = delta * x.clamp(max=0)  # δ ⊙ min(0, x): what the slope multiplies
    if layer.num_parameters == 1:
        return {"weight": slope.reshape(len(slope), -1).sum(1, keepdim=True)}
    return {"weight": slope.reshape(*slope.shape[:2], -1).sum(2)}
