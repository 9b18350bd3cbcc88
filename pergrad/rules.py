"""Per-layer rules: ``Σ_b g_b`` and ``Σ_b g_b²`` of a layer's parameters, from its inputs and
output gradients.

For one call of a layer on a batch, with inputs ``a`` and output gradients ``δ = ∂(Σ_b ℓ_b)/∂out``
(the batch on dim 0 of both), a rule returns, for every parameter of the layer, the sum over
examples of the per-example gradient and of its square. None of them forms the ``B``
per-example gradients of a large parameter all at once:

- ``Linear`` on ``(B, in)``: ``Σ_b g_b = δᵀa`` and ``Σ_b g_b² = (δ²)ᵀ(a²)``, two matrix
  products; on ``(B, …, in)``, ``g_b = δ_bᵀ a_b`` summed over the middle dimensions, a few
  examples at a time.
- ``Conv1d``/``Conv2d``: the same on unfolded input patches, per group, a few examples at a time.
- ``Embedding``: ``g_b`` has one row per distinct token of example ``b``: a scatter-add per
  (example, token), then scattered into the vocabulary, plain and squared.
- ``LayerNorm``/``GroupNorm``: ``g_b = Σ δ_b ⊙ â_b`` (weight) and ``Σ δ_b`` (bias) over the
  positions of example ``b``, with ``â`` the normalized input: ``B × d`` numbers.
- ``MultiheadAttention`` (``batch_first=True``): attention is recomputed from the saved inputs
  to get the gradients of the query, key and value projections and of the attention output;
  the projections are then ``Linear`` rules.

:func:`rule_for` gives the rule for a layer as it is configured, or ``None``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

CHUNK_ELEMENTS = 1 << 24
"""A chunked rule forms per-example gradients of at most about this many numbers at once."""

Moments = tuple[Tensor, Tensor]
"""``(Σ_b g_b, Σ_b g_b²)`` of one parameter."""


def _step(per_example: int) -> int:
    """How many examples' gradients of ``per_example`` numbers fit in :data:`CHUNK_ELEMENTS`."""
    return max(1, CHUNK_ELEMENTS // max(1, per_example))


def _per_position(x: Tensor) -> Tensor:
    """``(B, …, d) -> (B, positions, d)``."""
    return x.reshape(len(x), -1, x.shape[-1])


def _moments(per_example: Tensor) -> Moments:
    """``(Σ_b g_b, Σ_b g_b²)`` of per-example gradients ``(B, *shape)``."""
    return per_example.sum(0), per_example.square().sum(0)


def _input(args: tuple, kwargs: dict) -> Tensor:
    return args[0] if args else kwargs["input"]


def linear_moments(a: Tensor, delta: Tensor) -> Moments:
    """A Linear weight's moments, ``g_b = δ_bᵀ a_b``, for ``a (B, …, in)``, ``δ (B, …, out)``."""
    if a.dim() == 2:
        return delta.T @ a, delta.square().T @ a.square()
    a, delta = _per_position(a), _per_position(delta)
    total = delta.flatten(0, 1).T @ a.flatten(0, 1)
    squares = torch.zeros_like(total)
    step = _step(total.numel())
    for start in range(0, len(a), step):
        squares += (
            torch.bmm(delta[start : start + step].mT, a[start : start + step]).square().sum(0)
        )
    return total, squares


def bias_moments(delta: Tensor) -> Moments:
    """A Linear bias's moments, ``g_b = Σ_positions δ_b``, for ``δ (B, …, out)``."""
    return _moments(delta if delta.dim() == 2 else _per_position(delta).sum(1))


def _linear(module: nn.Linear, args: tuple, kwargs: dict, delta: Tensor) -> dict[str, Moments]:
    return {"weight": linear_moments(_input(args, kwargs), delta), "bias": bias_moments(delta)}


def _conv(
    module: nn.Conv1d | nn.Conv2d, args: tuple, kwargs: dict, delta: Tensor
) -> dict[str, Moments]:
    x = _input(args, kwargs)
    one_d = isinstance(module, nn.Conv1d)  # a Conv1d is a Conv2d of height 1
    padding = module._reversed_padding_repeated_twice
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    kernel, dilation, stride = (
        (1, *v) if one_d else v for v in (module.kernel_size, module.dilation, module.stride)
    )
    groups, shape = module.groups, module.weight.shape
    delta = delta.reshape(len(delta), groups, shape[0] // groups, -1)
    total = x.new_zeros(groups, shape[0] // groups, shape[1:].numel())
    squares = torch.zeros_like(total)
    step = _step(max(total.numel(), shape[1:].numel() * delta.shape[-1]))
    for start in range(0, len(x), step):
        padded = F.pad(x[start : start + step], padding, mode=mode)
        patches = F.unfold(padded.unsqueeze(-2) if one_d else padded, kernel, dilation, 0, stride)
        patches = patches.reshape(len(patches), groups, total.shape[-1], -1)
        grads = torch.einsum("bgol,bgil->bgoi", delta[start : start + step], patches)
        total += grads.sum(0)
        squares += grads.square().sum(0)
    return {
        "weight": (total.reshape(shape), squares.reshape(shape)),
        "bias": _moments(delta.sum(-1).flatten(1)),
    }


def _embedding(
    module: nn.Embedding, args: tuple, kwargs: dict, delta: Tensor
) -> dict[str, Moments]:
    tokens = _input(args, kwargs)
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
    rows = unique % module.num_embeddings
    total, squares = (delta.new_zeros(module.weight.shape) for _ in range(2))
    total.index_add_(0, rows, per_example_rows)
    squares.index_add_(0, rows, per_example_rows.square())
    return {"weight": (total, squares)}


def _affine(weight_grads: Tensor, bias_grads: Tensor) -> dict[str, Moments]:
    """Moments of a norm layer's affine parameters from their per-example gradients."""
    return {"weight": _moments(weight_grads), "bias": _moments(bias_grads)}


def _layer_norm(
    module: nn.LayerNorm, args: tuple, kwargs: dict, delta: Tensor
) -> dict[str, Moments]:
    x = _input(args, kwargs)
    shape = module.normalized_shape
    normalized = F.layer_norm(x, shape, eps=module.eps)
    positions = lambda t: t.reshape(len(t), -1, *shape).sum(1)  # noqa: E731
    return _affine(positions(delta * normalized), positions(delta))


def _group_norm(
    module: nn.GroupNorm, args: tuple, kwargs: dict, delta: Tensor
) -> dict[str, Moments]:
    x = _input(args, kwargs)
    normalized = F.group_norm(x, module.num_groups, eps=module.eps)
    positions = lambda t: t.reshape(len(t), module.num_channels, -1).sum(-1)  # noqa: E731
    return _affine(positions(delta * normalized), positions(delta))


def _additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """A boolean attention mask (True: masked out) as an additive one; a float mask as it is."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(
            mask, float("-inf")
        )
    return mask.to(dtype)


def _attention(
    module: nn.MultiheadAttention, args: tuple, kwargs: dict, delta: Tensor
) -> dict[str, Moments]:
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
    weights = [linear_moments(x, g) for x, g in zip(inputs, projected_grads)]
    biases = [bias_moments(g) for g in projected_grads]
    return {
        "in_proj_weight": tuple(torch.cat(parts) for parts in zip(*weights)),
        "in_proj_bias": tuple(torch.cat(parts) for parts in zip(*biases)),
        "out_proj.weight": linear_moments(attended.detach(), delta),
        "out_proj.bias": bias_moments(delta),
    }


Rule = Callable[[nn.Module, tuple, dict, Tensor], dict[str, Moments]]

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


def rule_for(module: nn.Module) -> Rule | None:
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
