"""Hugging Face ``transformers.pytorch_utils.Conv1D`` (GPT-2's projections): a ``Linear``
whose weight is stored transposed, ``y = x W + b`` with ``W (in, out)``; so ``g_b`` is the
``Linear`` rule's, transposed. Registered by name: ``transformers`` is not imported."""

from __future__ import annotations

from torch import Tensor, nn

from pergrad.reduce import Moments
from pergrad.rules import linear
from pergrad.rules.base import Call, register_rule


def _moments(layer: nn.Module, call: Call) -> dict[str, Moments]:
    weight = linear.weight_moments(call.input, call.output_grad)
    return {
        "weight": Moments(weight.grad_sum.T, weight.sq_sum.T),
        "bias": linear.bias_moments(call.output_grad),
    }


def _norms(layer: nn.Module, call: Call) -> dict[str, Tensor] | None:
    weight = linear.weight_norms(call.input, call.output_grad)
    if weight is None:
        return None
    return {"weight": weight, "bias": linear.bias_norms(call.output_grad)}


@register_rule(
    "transformers.pytorch_utils.Conv1D", moments=_moments, norms=_norms, features=lambda layer: 1
)
def conv1d(layer: nn.Module, call: Call) -> dict[str, Tensor]:
    return {
        "weight": linear.weight_grads(call.input, call.output_grad).mT,
        "bias": linear.bias_grads(call.output_grad),
    }
