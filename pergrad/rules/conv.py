"""``nn.Conv1d``, ``nn.Conv2d``, ``nn.Conv3d``: a ``Linear`` on unfolded input patches, per group.

With ``a_bt`` the input patch that output position ``t`` sees (``in/groups · kernel`` numbers
in the weight's order) and ``δ_bt`` the output gradient there, ``g_b = Σ_t δ_btᵀ a_bt`` per
group. The moments come from per-example gradients formed a few examples at a time, or, for
few output positions (a 3×3 convolution on a 1×1 map), from the position-pair expansion,
whichever costs less; the bias is ``g_b = Σ_t δ_bt``.

The per-example gradients themselves come one of two ways, the same multiply-adds apart:
the unfolded patches times ``δ`` (a batched matrix product), or the weight gradient of a
convolution whose groups are the examples (the input seen as one example of ``B·in``
channels, ``groups = B·groups``), which never writes the patches. The patches hold
``positions · in/groups · kernel`` numbers per example and group, the gradients
``out/groups · in/groups · kernel``: the grouped convolution is used where the patches are
the more, ``positions > out/groups``. Measured on one CPU thread at B = 32 (ResNet-18's and
the benchmark CNN's layers), it is 1.2–2.9 times faster there, and 1.7–2.1 times slower where
the positions are a quarter of the channels or fewer (256 channels on 8×8, 512 on 4×4).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pergrad.reduce import REDUCE_ELEMENTS, Moments, chunked_moments_in_place, chunks
from pergrad.rules.base import Call, pair_moments, pairs_cheaper, register_rule

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
    """``g_b`` of the weight, ``(B, *weight.shape)``: by the grouped convolution or from the
    patches, whichever writes fewer numbers (see the module's docstring)."""
    if _grouped_cheaper(layer, delta):
        return _grouped_weight_grads(layer, x, delta)
    a, d = patches(x, layer), _grouped_delta(layer, delta)
    groups, batch = a.shape[:2]
    g = torch.bmm(d.flatten(0, 1).mT, a.flatten(0, 1))  # (groups·B, out/groups, patch)
    return g.view(groups, batch, *g.shape[1:]).transpose(0, 1).reshape(batch, *layer.weight.shape)


def _grouped_cheaper(layer: Conv, delta: Tensor) -> bool:
    """Whether the patches would outnumber the per-example gradients: ``positions >
    out/groups``."""
    return delta[0, 0].numel() > layer.out_channels // layer.groups


WEIGHT_GRADIENTS = {1: torch.nn.grad.conv1d_weight, 2: torch.nn.grad.conv2d_weight}
WEIGHT_GRADIENTS[3] = torch.nn.grad.conv3d_weight


def _grouped_weight_grads(layer: Conv, x: Tensor, delta: Tensor) -> Tensor:
    """``g_b`` as the weight gradient of one convolution with ``B·groups`` groups, on the
    padded input seen as a single example of ``B·in`` channels."""
    mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
    x = F.pad(x, layer._reversed_padding_repeated_twice, mode=mode)
    batch, spatial = len(x), len(layer.kernel_size)
    out, per_group = layer.weight.shape[:2]
    weight_gradient = WEIGHT_GRADIENTS[spatial]
    g = weight_gradient(
        x.reshape(1, -1, *x.shape[2:]),
        (batch * out, per_group, *layer.kernel_size),
        delta.reshape(1, -1, *delta.shape[2:]),
        stride=layer.stride,
        padding=0,
        dilation=layer.dilation,
        groups=batch * layer.groups,
    )
    return g.view(batch, *layer.weight.shape)


def _moments(layer: Conv, call: Call) -> dict[str, Moments]:
    x, delta = call.input, call.output_grad
    shape, batch = layer.weight.shape, len(x)
    count = delta[0, 0].numel()
    found = {}
    if pairs_cheaper(batch * layer.groups, count, shape[0] // layer.groups, shape[1:].numel()):
        a, d = patches(x, layer), _grouped_delta(layer, delta)
        grad_sum = torch.bmm(d.flatten(1, 2).mT, a.flatten(1, 2))
        squares = pair_moments(d, a, grad_sum)
        found["weight"] = Moments(grad_sum.reshape(shape), squares.reshape(shape))
    else:
        patch = 0 if _grouped_cheaper(layer, delta) else layer.groups * shape[1:].numel() * count
        parts = chunks(batch, max(shape.numel(), patch), REDUCE_ELEMENTS)
        found["weight"] = chunked_moments_in_place(
            _weight_grads(layer, x[i:j], delta[i:j]) for i, j in parts
        )
    if layer.bias is not None:
        g = delta.flatten(2).sum(-1)
        found["bias"] = Moments(g.sum(0), g.square().sum(0))
    return found


def conv(layer: Conv, call: Call) -> dict[str, Tensor]:
    found = {"weight": _weight_grads(layer, call.input, call.output_grad)}
    if layer.bias is not None:
        found["bias"] = call.output_grad.flatten(2).sum(-1)
    return found


for _type in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
    register_rule(_type, moments=_moments)(conv)
