"""Per-layer rules: ``Σ_b g_b`` and ``Σ_b g_b²`` of a layer's parameters, from its inputs and
output gradients.

For one call of a layer on a batch, with inputs ``a`` and output gradients ``δ = ∂(Σ_b ℓ_b)/∂out``
(the batch on dim 0 of both), a rule returns, for every parameter of the layer, either the
per-example gradients ``(B, *shape)`` (``per_example=True``, for ``grads()``) or their
moments ``(Σ_b g_b, Σ_b g_b²)``. For the moments, none of them forms the ``B`` per-example
gradients of a large parameter all at once:

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
from collections.abc import Callable, Iterable

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


def _reduce(chunks: Iterable[Tensor], per_example: bool) -> Tensor | Moments:
    """Per-example gradients, given a few examples at a time: concatenated, or their moments."""
    if per_example:
        chunks = list(chunks)
        return chunks[0] if len(chunks) == 1 else torch.cat(chunks)
    total = squares = 0
    for grads in chunks:
        total, squares = total + grads.sum(0), squares + grads.square().sum(0)
    return total, squares


def _finish(grads: Tensor, per_example: bool) -> Tensor | Moments:
    """Per-example gradients of a small parameter: as they are, or their moments."""
    return grads if per_example else _moments(grads)


def _input(args: tuple, kwargs: dict) -> Tensor:
    return args[0] if args else kwargs["input"]


def linear_weight(a: Tensor, delta: Tensor, per_example: bool) -> Tensor | Moments:
    """A Linear weight's ``g_b = δ_bᵀ a_b`` (summed over positions) for ``a (B, …, in)``,
    ``δ (B, …, out)``; on ``(B, in)`` its moments are ``δᵀa`` and ``(δ²)ᵀ(a²)``."""
    if a.dim() == 2:
        if per_example:
            return delta.unsqueeze(2) * a.unsqueeze(1)
        return delta.T @ a, delta.square().T @ a.square()
    a, delta = _per_position(a), _per_position(delta)
    step = len(a) if per_example else _step(delta.shape[-1] * a.shape[-1])
    chunks = (
        torch.bmm(delta[start : start + step].mT, a[start : start + step])
        for start in range(0, len(a), step)
    )
    return _reduce(chunks, per_example)


def linear_bias(delta: Tensor, per_example: bool) -> Tensor | Moments:
    """A Linear bias's ``g_b = Σ_positions δ_b`` for ``δ (B, …, out)``."""
    return _finish(delta if delta.dim() == 2 else _per_position(delta).sum(1), per_example)


def _linear(module: nn.Linear, args: tuple, kwargs: dict, delta: Tensor, per_example: bool):
    return {
        "weight": linear_weight(_input(args, kwargs), delta, per_example),
        "bias": linear_bias(delta, per_example),
    }


def _patches(x: Tensor, module: nn.Conv1d | nn.Conv2d) -> Tensor:
    """The input patches each output position sees, ``(B·groups, positions, in/groups · kernel)``
    in the weight's order, from strided views of the padded input."""
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    x = F.pad(x, module._reversed_padding_repeated_twice, mode=mode)
    spatial = len(module.kernel_size)
    for dim, (k, s, d) in enumerate(zip(module.kernel_size, module.stride, module.dilation)):
        x = x.unfold(2 + dim, (k - 1) * d + 1, s)[..., ::d]  # appends the window's dimension
    batch, groups = len(x), module.groups
    x = x.view(batch, groups, -1, *x.shape[2:])  # (B, groups, in/groups, *out, *kernel)
    order = (0, 1, *range(3, 3 + spatial), 2, *range(3 + spatial, 3 + 2 * spatial))
    positions = x.shape[3 : 3 + spatial].numel()
    return x.permute(order).reshape(batch * groups, positions, -1)


def _conv(module: nn.Conv1d | nn.Conv2d, args: tuple, kwargs: dict, delta: Tensor, per_example):
    x = _input(args, kwargs)
    shape, groups = module.weight.shape, module.groups
    delta = delta.reshape(len(delta), shape[0], -1)  # (B, out, positions)
    patch_numbers = groups * shape[1:].numel() * delta.shape[-1]  # one example's patches
    step = len(x) if per_example else _step(max(shape.numel(), patch_numbers))

    def chunks():
        for start in range(0, len(x), step):
            part = delta[start : start + step]
            part = part.reshape(len(part) * groups, shape[0] // groups, -1)
            grads = torch.bmm(part, _patches(x[start : start + step], module))
            yield grads.reshape(-1, *shape)

    return {
        "weight": _reduce(chunks(), per_example),
        "bias": _finish(delta.sum(-1), per_example),
    }


def _embedding(module: nn.Embedding, args: tuple, kwargs: dict, delta: Tensor, per_example):
    tokens = _input(args, kwargs)
    batch, (vocabulary, width) = len(tokens), module.weight.shape
    tokens, delta = tokens.reshape(batch, -1), _per_position(delta)
    example = torch.arange(batch, device=tokens.device).unsqueeze(1).expand_as(tokens)
    keys = example * vocabulary + tokens
    if module.padding_idx is not None:  # the padding row gets no gradient
        keep = tokens != module.padding_idx
        keys, delta = keys[keep], delta[keep]
    else:
        keys, delta = keys.flatten(), delta.reshape(-1, delta.shape[-1])
    if per_example:
        grads = delta.new_zeros(batch * vocabulary, width).index_add_(0, keys, delta)
        return {"weight": grads.view(batch, vocabulary, width)}
    unique, position = torch.unique(keys, return_inverse=True)
    per_example_rows = delta.new_zeros(len(unique), width).index_add_(0, position, delta)
    rows = unique % vocabulary
    total, squares = (delta.new_zeros(vocabulary, width) for _ in range(2))
    total.index_add_(0, rows, per_example_rows)
    squares.index_add_(0, rows, per_example_rows.square())
    return {"weight": (total, squares)}


def _affine(weight_grads: Tensor, bias_grads: Tensor, per_example: bool):
    """A norm layer's affine parameters, from their per-example gradients."""
    return {"weight": _finish(weight_grads, per_example), "bias": _finish(bias_grads, per_example)}


def _layer_norm(module: nn.LayerNorm, args: tuple, kwargs: dict, delta: Tensor, per_example):
    x = _input(args, kwargs)
    shape = module.normalized_shape
    normalized = F.layer_norm(x, shape, eps=module.eps)
    positions = lambda t: t.reshape(len(t), -1, *shape).sum(1)  # noqa: E731
    return _affine(positions(delta * normalized), positions(delta), per_example)


def _group_norm(module: nn.GroupNorm, args: tuple, kwargs: dict, delta: Tensor, per_example):
    x = _input(args, kwargs)
    normalized = F.group_norm(x, module.num_groups, eps=module.eps)
    positions = lambda t: t.reshape(len(t), module.num_channels, -1).sum(-1)  # noqa: E731
    return _affine(positions(delta * normalized), positions(delta), per_example)


def _additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """A boolean attention mask (True: masked out) as an additive one; a float mask as it is."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(
            mask, float("-inf")
        )
    return mask.to(dtype)


def _attention(
    module: nn.MultiheadAttention, args: tuple, kwargs: dict, delta: Tensor, per_example
):
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

    def stacked(parts: list) -> Tensor | Moments:  # q, k, v rows of the packed projection
        return torch.cat(parts, 1) if per_example else tuple(map(torch.cat, zip(*parts)))

    return {
        "in_proj_weight": stacked(
            [linear_weight(x, g, per_example) for x, g in zip(inputs, projected_grads)]
        ),
        "in_proj_bias": stacked([linear_bias(g, per_example) for g in projected_grads]),
        "out_proj.weight": linear_weight(attended.detach(), delta, per_example),
        "out_proj.bias": linear_bias(delta, per_example),
    }


Rule = Callable[[nn.Module, tuple, dict, Tensor, bool], "dict[str, Tensor | Moments]"]
"""``rule(layer, args, kwargs, δ, per_example)``: per parameter name, ``(B, *shape)`` per-example
gradients if ``per_example``, else their moments."""

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
