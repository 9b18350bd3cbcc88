"""A batch of model inputs, positional or by keyword: a tuple of tensors is passed as
``model(*inputs)``, a dict of tensors (a Hugging Face tokenizer's ``BatchEncoding``, say) as
``model(**inputs)``. Every tensor carries the batch on dim 0."""

from __future__ import annotations

from torch import Tensor, nn

Inputs = tuple[Tensor, ...] | dict[str, Tensor]


def run(model: nn.Module, inputs: Inputs):
    """``model(**inputs)`` for a dict, ``model(*inputs)`` for a tuple."""
    return model(**inputs) if isinstance(inputs, dict) else model(*inputs)


def rows(inputs: Inputs, index: slice | int) -> Inputs:
    """Every tensor's rows ``index`` (a slice keeps dim 0, an int drops it)."""
    return map_tensors(lambda x: x[index], inputs)


def tensors(inputs: Inputs) -> tuple[Tensor, ...]:
    """The tensors, in order."""
    return tuple(inputs.values()) if isinstance(inputs, dict) else inputs


def map_tensors(fn, inputs: Inputs) -> Inputs:
    """``fn`` applied to every tensor, keeping the form."""
    if isinstance(inputs, dict):
        return {key: fn(x) for key, x in inputs.items()}
    return tuple(fn(x) for x in inputs)
