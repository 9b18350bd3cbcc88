"""Per-layer rules: ``Σ_b g_b²`` of a layer's parameters from its inputs and output gradients.

For one call of a layer on a batch, with inputs ``a`` and output gradients ``δ = ∂(Σ_b ℓ_b)/∂out``
(the batch on dim 0 of both), a rule returns, for every parameter of the layer, the sum over
examples of the squared per-example gradient. None of them forms the ``B`` per-example
gradients of a large parameter all at once:

- ``Linear`` on ``(B, in)``: ``Σ_b g_b² = (δ²)ᵀ(a²)``, one matrix product; on ``(B, …, in)``,
  ``g_b = δ_bᵀ a_b`` summed over the middle dimensions, a few examples at a time.
- ``Conv1d``/``Conv2d``: the same on unfolded input patches, per group, a few examples at a time.
- ``Embedding``: ``g_b`` has one row per distinct token of example ``b``: a scatter-add per
  (example, token), squared, then scattered into the vocabulary.
- ``LayerNorm``/``GroupNorm``: ``g_b = Σ δ_b ⊙ â_b`` (weight) and ``Σ δ_b`` (bias) over the
  positions of example ``b``, with ``â`` the normalized input: ``B × d`` numbers.
- ``MultiheadAttention`` (``batch_first=True``): attention is recomputed from the saved inputs
  to get the gradients of the query, key and value projections and of the attention output;
  the projections are then ``Linear`` rules.

``covers(module)`` says whether a rule handles the module as configured, and which of its
parameters (names relative to it) the rule accounts for.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

CHUNK_ELEMENTS = 1 << 24
"""A chunked rule forms per-example gradients of at most about this many numbers at once."""

SqSums = dict[str, Tensor]


def _step(per_example: int) -> int:
    """How many examples' gradients of ``per_example`` numbers fit in :data:`CHUNK_ELEMENTS`."""
    return max(1, CHUNK_ELEMENTS // max(1, per_example))


def _per_position(x: Tensor) -> Tensor:
    """``(B, …, d) -> (B, positions, d)``."""
    return x.reshape(len(x), -1, x.shape[-1])


def linear_sq(a: Tensor, delta: Tensor) -> Tensor:
    """A Linear weight's ``Σ_b g_b² = Σ_b (δ_bᵀ a_b)²`` for ``a (B, …, in)``, ``δ (B, …, out)``."""
    if a.dim() == 2:
        return delta.square().T @ a.square()
    a, delta = _per_position(a), _per_position(delta)
    total = a.new_zeros(delta.shape[-1], a.shape[-1])
    step = _step(total.numel())
    for start in range(0, len(a), step):
        total += torch.bmm(delta[start : start + step].mT, a[start : start + step]).square().sum(0)
    return total


def bias_sq(delta: Tensor) -> Tensor:
    """``Σ_b (Σ_positions δ_b)²`` for ``δ (B, …, out)``: a Linear bias's ``Σ_b g_b²``."""
    return _per_position(delta).sum(1).square().sum(0)


def _linear(module: nn.Linear, args: tuple, kwargs: dict, delta: Tensor) -> SqSums:
    a = args[0] if args else kwargs["input"]
    if a.dim() == 2:  # one position per example: square δ once for both parameters
        delta_sq = delta.square()
        return {"weight": delta_sq.T @ a.square(), "bias": delta_sq.sum(0)}
    return {"weight": linear_sq(a, delta), "bias": bias_sq(delta)}


def _conv(module: nn.Conv1d | nn.Conv2d, args: tuple, kwargs: dict, delta: Tensor) -> SqSums:
    x = args[0] if args else kwargs["input"]
    one_d = isinstance(module, nn.Conv1d)  # a Conv1d is a Conv2d of height 1
    padding = module._reversed_padding_repeated_twice
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    kernel, dilation, stride = (
        (1, *v) if one_d else v for v in (module.kernel_size, module.dilation, module.stride)
    )
    groups, shape = module.groups, module.weight.shape
    delta = delta.reshape(len(delta), groups, shape[0] // groups, -1)
    total = x.new_zeros(groups, shape[0] // groups, shape[1:].numel())
    step = _step(max(total.numel(), shape[1:].numel() * delta.shape[-1]))
    for start in range(0, len(x), step):
        padded = F.pad(x[start : start + step], padding, mode=mode)
        patches = F.unfold(padded.unsqueeze(-2) if one_d else padded, kernel, dilation, 0, stride)
        patches = patches.reshape(len(patches), groups, total.shape[-1], -1)
        total += (
            torch.einsum("bgol,bgil->bgoi", delta[start : start + step], patches).square().sum(0)
        )
    return {"weight": total.reshape(shape), "bias": delta.sum(-1).square().sum(0).flatten()}


def _embedding(module: nn.Embedding, args: tuple, kwargs: dict, delta: Tensor) -> SqSums:
    tokens = args[0] if args else kwargs["input"]
    tokens, delta = tokens.reshape(len(tokens), -1), _per_position(delta)
    example = torch.arange(len(tokens), device=tokens.device).unsqueeze(1).expand_as(tokens)
    keys = example * module.num_embeddings + tokens
    if module.padding_idx is not None:  # the padding row gets no gradient
        keep = tokens != module.padding_idx
        keys, delta = keys[keep], delta[keep]
    else:
        keys, delta = keys.flatten(), delta.reshape(-1, delta.shape[-1])
    unique, position = torch.unique(keys, return_inverse=True)
    per_example_rows = delta.new_zeros(len(unique), delta.shape[-1]).index_add_(0, position, delta)
    total = delta.new_zeros(module.weight.shape)
    return {
        "weight": total.index_add_(0, unique % module.num_embeddings, per_example_rows.square())
    }


def _affine_sq(weight_grads: Tensor, bias_grads: Tensor) -> SqSums:
    """``Σ_b g_b²`` of a norm layer's affine parameters from their per-example gradients."""
    return {"weight": weight_grads.square().sum(0), "bias": bias_grads.square().sum(0)}


def _layer_norm(module: nn.LayerNorm, args: tuple, kwargs: dict, delta: Tensor) -> SqSums:
    x = args[0] if args else kwargs["input"]
    shape = module.normalized_shape
    normalized = F.layer_norm(x, shape, eps=module.eps)
    positions = lambda t: t.reshape(len(t), -1, *shape).sum(1)  # noqa: E731
    return _affine_sq(positions(delta * normalized), positions(delta))


def _group_norm(module: nn.GroupNorm, args: tuple, kwargs: dict, delta: Tensor) -> SqSums:
    x = args[0] if args else kwargs["input"]
    normalized = F.group_norm(x, module.num_groups, eps=module.eps)
    positions = lambda t: t.reshape(len(t), module.num_channels, -1).sum(-1)  # noqa: E731
    return _affine_sq(positions(delta * normalized), positions(delta))


def _additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """A boolean attention mask (True: masked out) as an additive one; a float mask as it is."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(
            mask, float("-inf")
        )
    return mask.to(dtype)


def _attention(module: nn.MultiheadAttention, args: tuple, kwargs: dict, delta: Tensor) -> SqSums:
    call = inspect.signature(module.forward).bind(*args, **kwargs)
    call.apply_defaults()
    given = call.arguments
    inputs = (given["query"], given["key"], given["value"])
    batch, length, width, heads = (
        len(inputs[0]),
        inputs[0].shape[1],
        module.embed_dim,
        module.num_heads,
    )
    weights = module.in_proj_weight.detach().chunk(3)
    biases = (None,) * 3 if module.in_proj_bias is None else module.in_proj_bias.detach().chunk(3)
    # as F.multi_head_attention_forward: a causal hint replaces the mask only when nothing else
    # needs it; otherwise the masks are merged into one additive mask
    padding, mask = given["key_padding_mask"], given["attn_mask"]
    causal = given["is_causal"] and padding is None and not given["need_weights"]
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
        split = [p.view(batch, -1, heads, width // heads).transpose(1, 2) for p in projected]
        attended = F.scaled_dot_product_attention(*split, attn_mask=merged, is_causal=causal)
        attended = attended.transpose(1, 2).reshape(batch, length, width)
        projected_grads = torch.autograd.grad(
            attended, projected, delta @ module.out_proj.weight.detach()
        )
    return {
        "in_proj_weight": torch.cat([linear_sq(x, g) for x, g in zip(inputs, projected_grads)]),
        "in_proj_bias": torch.cat([bias_sq(g) for g in projected_grads]),
        "out_proj.weight": linear_sq(attended.detach(), delta),
        "out_proj.bias": bias_sq(delta),
    }


Rule = Callable[[nn.Module, tuple, dict, Tensor], SqSums]

RULES: dict[type[nn.Module], Rule] = {
    nn.Linear: _linear,
    nn.Conv1d: _conv,
    nn.Conv2d: _conv,
    nn.Embedding: _embedding,
    nn.LayerNorm: _layer_norm,
    nn.GroupNorm: _group_norm,
    nn.MultiheadAttention: _attention,
}
"""The rule for each layer type (exact type: a subclass may compute something else)."""


def covers(module: nn.Module) -> Rule | None:
    """The rule for ``module`` as it is configured, or ``None`` where no rule applies."""
    rule = RULES.get(type(module))
    if isinstance(module, nn.Embedding) and (module.scale_grad_by_freq or module.sparse):
        return None  # the gradient depends on the whole batch's token counts, or is sparse
    if isinstance(module, nn.MultiheadAttention) and not (
        module.batch_first
        and module.in_proj_weight is not None
        and module.bias_k is None
        and not module.add_zero_attn
        and (module.dropout == 0 or not module.training)
    ):
        return None
    return rule
