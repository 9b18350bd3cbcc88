"""``nn.Embedding``: ``g_b`` has one row per distinct token of example ``b``, the sum of ``δ``
over that token's positions (the ``padding_idx`` row gets none).

The moments scatter-add ``δ`` per (example, token), then scatter those rows into the
vocabulary, plain and squared: never ``B × vocabulary`` numbers. ``|g_b|²`` is the sum of the
squares of example ``b``'s rows.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pergrad.reduce import Moments
from pergrad.rules.base import Call, positions, register_rule


def _rows(layer: nn.Embedding, call: Call) -> tuple[Tensor, Tensor]:
    """``keys = b · vocabulary + token`` and ``δ`` for every position, padding left out."""
    tokens, delta = call.input, call.output_grad
    batch, vocabulary = len(tokens), layer.num_embeddings
    tokens, delta = tokens.reshape(batch, -1), positions(delta)
    example = torch.arange(batch, device=tokens.device).unsqueeze(1)
    keys = example * vocabulary + tokens
    if layer.padding_idx is not None:
        keep = tokens != layer.padding_idx
        return keys[keep], delta[keep]
    return keys.flatten(), delta.reshape(-1, delta.shape[-1])


def _example_rows(layer: nn.Embedding, call: Call) -> tuple[Tensor, Tensor]:
    """The distinct keys ``b · vocabulary + token`` and, for each, its row of ``g_b``: the
    sum of ``δ`` over that token's positions in example ``b``."""
    keys, delta = _rows(layer, call)
    unique, position = keys.unique(return_inverse=True)
    return unique, delta.new_zeros(len(unique), delta.shape[-1]).index_add_(0, position, delta)


def _moments(layer: nn.Embedding, call: Call) -> dict[str, Moments]:
    unique, per_example_rows = _example_rows(layer, call)
    vocabulary, width = layer.weight.shape
    rows = unique % vocabulary
    grad_sum, sq_sum = (per_example_rows.new_zeros(vocabulary, width) for _ in range(2))
    grad_sum.index_add_(0, rows, per_example_rows)
    sq_sum.index_add_(0, rows, per_example_rows.square())
    return {"weight": Moments(grad_sum, sq_sum)}


def _norms(layer: nn.Embedding, call: Call) -> dict[str, Tensor]:
    unique, per_example_rows = _example_rows(layer, call)
    examples = unique // layer.num_embeddings
    squares = per_example_rows.square().sum(1)
    return {"weight": squares.new_zeros(call.batch_size).index_add_(0, examples, squares)}


def _supports(layer: nn.Embedding) -> str | None:
    return "sparse=True gives sparse gradients" if layer.sparse else None


@register_rule(
    nn.Embedding, moments=_moments, supports=_supports, norms=_norms, features=lambda layer: 1
)
def embedding(layer: nn.Embedding, call: Call) -> dict[str, Tensor]:
    keys, delta = _rows(layer, call)
    batch, (vocabulary, width) = call.batch_size, layer.weight.shape
    grads = delta.new_zeros(batch * vocabulary, width).index_add_(0, keys, delta)
    return {"weight": grads.view(batch, vocabulary, width)}
