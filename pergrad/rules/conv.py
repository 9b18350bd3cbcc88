"""``nn.Conv1d``, ``nn.Conv2d``, ``nn.Conv3d``: a ``Linear`` on unfolded input patches, per group.

With ``a_bt`` the input patch that output position ``t`` sees (``in/groups · kernel`` numbers
in the weight's order) and ``δ_bt`` the output gradient there, ``g_b = Σ_t δ_btᵀ a_bt`` per
group. The moments come from per-example gradients formed a few examples at a time, or, for
few output positions (a 3×3 convolution on a 1×1 map), from the position-pair expansion,
whichever costs less; the bias is ``g_b = Σ_t δ_bt``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pergrad.rules.base import (
    REDUCE_ELEMENTS,
    Call,
    Moments,
    chunks,
    pair_moments,
    pairs_cheaper,
    reduce_fresh,
    register_rule,
)

Conv = nn.Conv1d | nn.Conv2d | nn.Conv3d


def patches(x: Tensor, layer: Conv) -> Tensor:
    """The input patches each output position sees, ``(groups, B, positions, in/groups ·
    kernel)`` in the weight's order, from strided views of the padded input."""
    mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
    x = F.pad(x, layer._reversed_padding_repeated_twice, mode=mode)
    spatial = len(layer.kernel_size)
    for dim, (k, s, d) in enumerate(zip(layer.kernel_size, layer.stride, layer.dilation)):
        x = x.unfold(2 + dim, (k - 1) * d + 1, s)[..., ::d]  # appends the window's dimension
    batch, groups = len(x), layer.groups
    x = x.view(batch, groups, -1, *x.shape[2:])  # (B, groups, in/groups, *out, *kernel)
    order = (1, 0, *range(3, 3 + spatial), 2, *range(3 + spatial, 3 + 2 * spatial))
    count = x.shape[3 : 3 + spatial].numel()
    return x.permute(order).reshape(groups, batch, count, -1)


def _grouped_delta(layer: Conv, delta: Tensor) -> Tensor:
    """``δ (B, out, *positions) -> (groups, B, positions, out/groups)``."""
    groups = layer.groups
    delta = delta.reshape(len(delta), groups, layer.out_channels // groups, -1)
    return delta.permute(1, 0, 3, 2)


def _weight_grads(layer: Conv, x: Tensor, delta: Tensor) -> Tensor:
    a, d = patches(x, layer), _grouped_delta(layer, delta)
    groups, batch = a.shape[:2]
    g = torch.bmm(d.flatten(0, 1).mT, a.flatten(0, 1))  # (groups·B, out/groups, patch)
    return g.view(groups, batch, *g.shape[1:]).transpose(0, 1).reshape(batch, *layer.weight.shape)


def _moments(layer: Conv, call: Call) -> dict[str, Moments]:
    x, delta = call.input, call.output_grad
    shape, batch = layer.weight.shape, len(x)
    count = delta[0, 0].numel()
    found = {}
    if pairs_cheaper(batch * layer.groups, count, shape[0] // layer.groups, shape[1:].numel()):
        a, d = patches(x, layer), _grouped_delta(layer, delta)
        total = torch.bmm(d.flatten(1, 2).mT, a.flatten(1, 2))
        found["weight"] = (total.reshape(shape), pair_moments(d, a).reshape(shape))
    else:
        per_example = max(shape.numel(), layer.groups * shape[1:].numel() * count)
        parts = chunks(batch, per_example, REDUCE_ELEMENTS)
        found["weight"] = reduce_fresh(_weight_grads(layer, x[i:j], delta[i:j]) for i, j in parts)
    if layer.bias is not None:
        g = delta.flatten(2).sum(-1)
        found["bias"] = (g.sum(0), g.square().sum(0))
    return found


def conv(layer: Conv, call: Call) -> dict[str, Tensor]:
    found = {"weight": _weight_grads(layer, call.input, call.output_grad)}
    if layer.bias is not None:
        found["bias"] = call.output_grad.flatten(2).sum(-1)
    return found


for _type in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
    register_rule(_type, moments=_moments)(conv)
