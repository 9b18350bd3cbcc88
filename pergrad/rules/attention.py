"""``nn.MultiheadAttention`` (packed input projection): the attention is recomputed from the
saved inputs to get the output gradients of the query, key and value projections; each
projection, and the output projection, is then a ``Linear`` rule.

The rule reads the ``δ`` of both outputs: where the averaged (or per-head) attention weights
reach the loss, the weights are computed explicitly, ``softmax(QKᵀ/√d + mask)``, as
``F.multi_head_attention_forward`` computes them with ``need_weights=True``, and checked
against the layer's. A layer with ``batch_first=False`` is read with its examples moved to
dim 0 (:mod:`pergrad.regroup`), its 3-D mask ``(B·heads, L, S)`` with each example's heads."""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pergrad.checks import agree
from pergrad.reduce import Moments
from pergrad.rules import linear
from pergrad.rules.base import Call, register_rule


def _additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """A boolean attention mask (True: masked out) as an additive one; a float mask as it is."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(
            mask, float("-inf")
        )
    return mask.to(dtype)


def _projections(layer: nn.MultiheadAttention, call: Call):
    """The query, key and value inputs, their projections' output gradients, the attention
    output before the output projection, and ``δ`` of the layer's output, all batch first.

    Raises:
        ValueError: the attention weights computed again differ from the layer's.
    """
    bound = inspect.signature(layer.forward).bind(*call.args, **call.kwargs)
    bound.apply_defaults()
    given = bound.arguments
    inputs = (given["query"], given["key"], given["value"])
    delta = call.output_grad
    if not layer.batch_first and not call.regrouped:  # (T, B, E) as the layer took it
        inputs, delta = tuple(x.transpose(0, 1) for x in inputs), delta.transpose(0, 1)
    batch, length, width, heads = len(delta), inputs[0].shape[1], layer.embed_dim, layer.num_heads
    weights = layer.in_proj_weight.detach().chunk(3)
    biases = (None,) * 3 if layer.in_proj_bias is None else layer.in_proj_bias.detach().chunk(3)
    # as F.multi_head_attention_forward: a causal hint replaces the mask only when nothing else
    # needs it; otherwise the masks are merged into one additive mask
    padding, mask = given["key_padding_mask"], given["attn_mask"]
    need_weights = given["need_weights"]
    causal = given["is_causal"] and padding is None and not need_weights
    merged = None
    if mask is not None and not causal:
        merged = _additive(mask, delta.dtype)
        merged = merged.view(batch, heads, *merged.shape[-2:]) if merged.dim() == 3 else merged
    if padding is not None:
        padding = _additive(padding, delta.dtype).view(batch, 1, 1, -1)
        merged = padding if merged is None else merged + padding
    with torch.enable_grad():
        projected = [
            F.linear(x.detach(), w, b).requires_grad_() for x, w, b in zip(inputs, weights, biases)
        ]
        q, k, v = [p.view(batch, -1, heads, width // heads).transpose(1, 2) for p in projected]
        outputs, deltas = [], [delta @ layer.out_proj.weight.detach()]
        if need_weights:  # explicitly, as the layer computes them
            scores = (q / (width // heads) ** 0.5) @ k.transpose(-2, -1)
            probabilities = torch.softmax(scores if merged is None else scores + merged, -1)
            attended = probabilities @ v
            average = given["average_attn_weights"]
            outputs.append(probabilities.mean(1) if average else probabilities)
            deltas.append(call.output_grads[1])
        else:
            attended = F.scaled_dot_product_attention(q, k, v, attn_mask=merged, is_causal=causal)
        attended = attended.transpose(1, 2).reshape(batch, length, width)
        if need_weights and not agree(outputs[0].detach(), call.outputs[1], call.precision):
            raise ValueError("the attention weights computed again differ from the layer's")
        grads = torch.autograd.grad([attended, *outputs], projected, deltas)
    return inputs, grads, attended.detach(), delta


def _moments(layer: nn.MultiheadAttention, call: Call) -> dict[str, Moments]:
    inputs, grads, attended, delta = _projections(layer, call)
    stacked = lambda parts: Moments(*map(torch.cat, zip(*parts)))  # noqa: E731  q, k, v rows
    found = {
        "in_proj_weight": stacked([linear.weight_moments(x, g) for x, g in zip(inputs, grads)]),
        "out_proj.weight": linear.weight_moments(attended, delta),
    }
    if layer.in_proj_bias is not None:
        found["in_proj_bias"] = stacked([linear.bias_moments(g) for g in grads])
        found["out_proj.bias"] = linear.bias_moments(delta)
    return found


def _supports(layer: nn.MultiheadAttention) -> str | None:
    if layer.in_proj_weight is None:
        return "separate query, key and value projections (kdim or vdim)"
    if layer.bias_k is not None or layer.add_zero_attn:
        return "add_bias_kv or add_zero_attn"
    if layer.dropout and layer.training:
        return "attention dropout in training mode"
    return None


@register_rule(nn.MultiheadAttention, moments=_moments, supports=_supports, all_outputs=True)
def multihead_attention(layer: nn.MultiheadAttention, call: Call) -> dict[str, Tensor]:
    inputs, grads, attended, delta = _projections(layer, call)
    found = {
        "in_proj_weight": torch.cat([linear.weight_grads(x, g) for x, g in zip(inputs, grads)], 1),
        "out_proj.weight": linear.weight_grads(attended, delta),
    }
    if layer.in_proj_bias is not None:
        found["in_proj_bias"] = torch.cat([linear.bias_grads(g) for g in grads], 1)
        found["out_proj.bias"] = linear.bias_grads(delta)
    return found
