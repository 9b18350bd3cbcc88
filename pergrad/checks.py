"""Validation of models, inputs, losses and numeric arguments, with messages that say what to
do."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree


class InputError(ValueError):
    """Bad input to :class:`pergrad.PerExample`: the message says what was wrong and the fix."""


def is_positive_int(value: object) -> bool:
    """Whether ``value`` is an ``int`` ``>= 1`` (a ``bool`` is not)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def positive_int(name: str, value: object, what: str) -> None:
    """Raise ``ValueError("Invalid {name}: {value!r}; {what}")`` unless ``value`` is an ``int``
    ``>= 1``; ``what`` says what to pass instead."""
    if not is_positive_int(value):
        raise ValueError(f"Invalid {name}: {value!r}; {what}")


def positive_number(name: str, value: object, what: str) -> None:
    """As :func:`positive_int`, for an ``int`` or ``float`` ``> 0`` (NaN is not)."""
    if not (_is_number(value) and value > 0):
        raise ValueError(f"Invalid {name}: {value!r}; {what}")


def non_negative_number(name: str, value: object, what: str) -> None:
    """As :func:`positive_int`, for an ``int`` or ``float`` ``>= 0`` (NaN is not)."""
    if not (_is_number(value) and value >= 0):
        raise ValueError(f"Invalid {name}: {value!r}; {what}")


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def batch(
    inputs: Tensor | Sequence[Tensor] | Mapping[str, Tensor],
    target: Tensor,
    allow_empty: bool = False,
) -> tuple[tuple[Tensor, ...] | dict[str, Tensor], int]:
    """Normalize ``inputs`` to a tuple (passed as ``model(*inputs)``) or a dict (passed as
    ``model(**inputs)``) and return it with the batch size ``B``.

    Raises:
        TypeError: an input or the target is not a Tensor.
        InputError: a tensor has no batch dimension, the tensors disagree on ``B``, or ``B = 0``
            (unless ``allow_empty``: a data-parallel rank may hold no examples).
    """
    if isinstance(inputs, Tensor):
        inputs = (inputs,)
    elif isinstance(inputs, Mapping):
        inputs = dict(inputs)
    elif isinstance(inputs, Sequence) and not isinstance(inputs, str):
        inputs = tuple(inputs)
    else:
        raise TypeError(
            f"inputs must be a Tensor, a tuple of Tensors passed as model(*inputs), or a dict "
            f"of Tensors passed as model(**inputs), got {type(inputs).__name__}"
        )
    if not inputs:
        raise InputError(
            f"inputs is an empty {type(inputs).__name__}: pass at least one Tensor for the model"
        )
    keyed = isinstance(inputs, dict)
    named = [
        (f"inputs[{key!r}]" if keyed else f"inputs[{key}]", x)
        for key, x in (inputs.items() if keyed else enumerate(inputs))
    ]
    for name, x in named:
        if not isinstance(x, Tensor):
            raise TypeError(
                f"{name} is a {type(x).__name__}, not a Tensor: every input must be a "
                f"Tensor with the batch on dim 0 (convert it with torch.as_tensor; pass "
                f"options that are not tensors through functools.partial or the model's config)"
            )
    if not isinstance(target, Tensor):
        raise TypeError(
            f"target is a {type(target).__name__}, not a Tensor: pass the targets as a Tensor "
            f"with the batch on dim 0"
        )
    named.append(("target", target))
    for name, x in named:
        if x.dim() == 0:
            raise InputError(
                f"{name} is 0-dimensional: every input and the target carry the batch on dim 0"
            )
    sizes = {name: x.shape[0] for name, x in named}
    if len(set(sizes.values())) > 1:
        listed = ", ".join(f"{name}: {b}" for name, b in sizes.items())
        raise InputError(f"inputs and target disagree on the batch size (dim 0): {listed}")
    size = sizes["target"]
    if size == 0 and not allow_empty:
        raise InputError("the batch is empty (B = 0): pass at least one example")
    return inputs, size


def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters that get per-example gradients: ``requires_grad``, named as in
    ``model.named_parameters()`` (a tied parameter appears once, under its first name).

    Raises:
        InputError: there is nothing to differentiate.
    """
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise InputError(
            f"{type(model).__name__} has no trainable floating-point parameter: nothing to "
            f"differentiate. Give it float parameters with requires_grad=True."
        )
    return params


def may_mix(module: nn.Module) -> bool:
    """Whether ``module`` is of a type that can make one example's gradient depend on the
    others (:func:`no_batch_mixing` decides, as it is configured)."""
    return isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.Embedding, nn.EmbeddingBag))


def no_batch_mixing(named: list[tuple[str, nn.Module]]) -> None:
    """Refuse layers whose gradient for one example depends on the other examples, among the
    ``(name, module)`` pairs given (the model's, or those :func:`may_mix` picks).

    Raises:
        InputError: a BatchNorm layer is in training mode, or an embedding scales its
            gradient by the batch's token counts.
    """
    for name, module in named:
        where = f"layer '{name or type(module).__name__}' ({type(module).__name__})"
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training:
            raise InputError(
                f"{where} is in training mode, where it normalizes with the statistics of the "
                f"whole batch, so no example has a gradient of its own. Put it in eval mode "
                f"({accessor(name)}.eval()) or replace it with GroupNorm or LayerNorm."
            )
        if isinstance(module, (nn.Embedding, nn.EmbeddingBag)) and module.scale_grad_by_freq:
            raise InputError(
                f"{where} has scale_grad_by_freq=True: it divides each token's gradient by the "
                f"token's count in the whole batch, so no example has a gradient of its own. "
                f"Set {accessor(name)}.scale_grad_by_freq = False."
            )


def accessor(name: str) -> str:
    """Python that reaches the submodule ``name`` from ``model``: ``model.encoder.layers[0]``."""
    parts = (f"[{part}]" if part.isdigit() else f".{part}" for part in name.split(".") if part)
    return "model" + "".join(parts)


def per_example_loss(
    loss: object, batch_size: int, whole_batch: int | None = None, graph: bool = True
) -> Tensor:
    """Return ``loss`` if it holds one loss per example, shape ``(B,)``; ``whole_batch`` is the
    batch the user passed, where a mode calls ``loss_fn`` on fewer examples at a time;
    ``graph``: it must depend on the parameters (it was computed with gradients).

    Raises:
        InputError: the loss is not a floating-point Tensor of shape ``(B,)`` that depends on
            the parameters.
    """
    if not isinstance(loss, Tensor):
        raise InputError(f"loss_fn returned a {type(loss).__name__}, not a Tensor of shape (B,)")
    if loss.shape != (batch_size,):
        hint = (
            " It looks reduced over the batch: use reduction='none', "
            "e.g. nn.CrossEntropyLoss(reduction='none')."
            if loss.dim() == 0
            else " Reduce every dimension but the batch, e.g. loss.flatten(1).mean(1)."
        )
        where = (
            ""
            if whole_batch is None
            else (
                f" (this mode calls it on {batch_size} example(s) at a time of your batch of "
                f"{whole_batch})"
            )
        )
        raise InputError(
            f"loss_fn must return one loss per example, shape (B,): ({batch_size},){where}, "
            f"got shape {tuple(loss.shape)}.{hint}"
        )
    if not loss.is_floating_point():
        raise InputError(f"loss_fn returned dtype {loss.dtype}: losses must be floating point")
    if graph and not loss.requires_grad:
        raise InputError(
            "the losses do not depend on any trainable parameter (they have no autograd "
            "graph): loss_fn must not detach them, call .item() or run under torch.no_grad(), "
            "the model's output must reach them, and the model must compute what it uses from "
            "its parameters in each call (not keep a tensor computed from them in an earlier "
            "one)"
        )
    return loss


def model_and_loss(model: object, loss_fn: object) -> None:
    """Raise ``TypeError`` unless ``model`` is an ``nn.Module`` and ``loss_fn`` callable."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")


def finite(grads: dict[str, Tensor], what: str) -> None:
    """Raise if any gradient statistic is NaN or infinite.

    The sum of every tensor's 1-norm (one multi-tensor kernel; a sum each for sparse tensors)
    finds it: a NaN or an infinity makes it non-finite. Only then is every element checked, to
    name the parameters (a sum that overflowed names none, and passes).

    Raises:
        FloatingPointError: naming the parameters whose ``what`` is not finite.
    """
    if not grads:
        return
    tensors = list(grads.values())
    if any(g.is_sparse for g in tensors):  # no multi-tensor norm for them: a sum each
        norms = [g.abs().sum() for g in tensors]
    else:
        norms = torch._foreach_norm(tensors, 1)
    if math.isfinite(torch.stack(norms).sum().item()):  # an overflow alone: cleared below
        return
    bad = [name for name, g in grads.items() if not bool(torch.isfinite(g).all())]
    if bad:
        raise FloatingPointError(
            f"non-finite {what} for parameter(s) {', '.join(bad)}: some example's loss or "
            f"gradient is NaN or infinite. Nothing was accumulated; inspect engine.last_losses, "
            f"lower the learning rate, or skip this batch."
        )


def distinct_weights(size: int, like: Tensor) -> Tensor:
    """Distinct weights ``c_b`` in [1, 2), one per example, for the check
    ``Σ_b c_b g_b = ∇ Σ_b c_b ℓ_b``, which a permutation or a mix-up of per-example gradients
    fails; float64, on ``like``'s device. Deterministic (``1 + frac(b·φ)``): no random state
    is drawn. Cast to bfloat16 the first two agree at 95 examples."""
    return (1 + torch.arange(size, dtype=torch.float64) * GOLDEN % 1).to(like.device)


GOLDEN = (5**0.5 - 1) / 2
"""The golden ratio's fractional part: ``frac(i·φ)`` spreads any count of indices evenly
over [0, 1), each one different."""


TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 3e-2, torch.bfloat16: 3e-2}
"""How far two computations of the same values in a dtype may differ, relative to the largest:
rounding grown through a deep network, in different kernels, and no more."""


def agree(actual: Tensor, expected: Tensor, precision: torch.dtype | None = None) -> bool:
    """Whether two computations of the same values agree, to :data:`TOLERANCE` of the
    precision they ran in (``precision``; else autocast's dtype where it is on, else the
    dtype of ``expected``) and relative to the largest finite entry; NaN and infinities must
    stand in the same places."""
    device = expected.device.type
    tolerance = TOLERANCE.get(precision or autocast_dtype(device) or expected.dtype, 1e-4)
    if actual.shape != expected.shape:
        return False
    scale = expected.abs().max() if expected.numel() else expected.new_zeros(())
    if expected.numel() and bool(torch.isfinite(scale)):  # the common case, in two passes
        if bool((actual - expected).abs().max() <= tolerance * scale):
            return True
    finite = expected[torch.isfinite(expected)]
    scale = float(finite.abs().max()) if finite.numel() else 0.0
    return torch.allclose(actual, expected, rtol=tolerance, atol=tolerance * scale, equal_nan=True)


def autocast_dtype(device: str | None = None) -> torch.dtype | None:
    """The dtype autocast computes in on the ``device`` type where it is on there (any of
    ``"cpu"`` and ``"cuda"`` for ``None``), else ``None``."""
    for kind in ("cpu", "cuda") if device is None else (device,):
        if kind in ("cpu", "cuda") and torch.is_autocast_enabled(kind):
            return torch.get_autocast_dtype(kind)
    return None


def separable(loss_fn, output: object, target: Tensor, losses: Tensor) -> None:
    """Refuse a ``loss_fn`` whose loss of one example depends on the others (normalised by the
    batch's token count, say): the first half of the batch's losses, computed from its rows
    of the output and target alone, must be the first half of the losses.

    The rows are the first ``B/2`` of every output tensor whose dim 0 has size ``B``; where no
    such slice can be formed or ``loss_fn`` cannot take it, nothing is concluded.

    Raises:
        InputError: the losses differ, saying what to use instead.
    """
    size = len(target)
    if size < 2:
        return
    half = size // 2
    cut = [False]

    def first_half(x):
        if isinstance(x, Tensor) and x.dim() and x.shape[0] == size:
            cut[0] = True
            return x[:half]
        return x

    with torch.no_grad():
        sliced = pytree.tree_map(first_half, output)
        if not cut[0]:
            return
        try:
            alone = loss_fn(sliced, target[:half])
        except Exception:  # a loss_fn that cannot take the slice: nothing to conclude
            return
        if not isinstance(alone, Tensor) or alone.shape != (half,):
            return
        if agree(alone.to(losses.dtype), losses[:half].detach()):
            return
    raise InputError(
        f"loss_fn's loss of an example depends on the other examples of the batch: the first "
        f"{half} losses, computed from those examples alone, differ from the same losses "
        f"computed in the whole batch. A loss normalised over the batch (a mean over all of "
        f"its tokens, a softmax over its examples) changes with the batch size and chunk_size, "
        f"and has no per-example gradient. Return one loss per example that depends on that "
        f"example alone: for Hugging Face heads, pergrad.losses.causal_lm, "
        f"pergrad.losses.classification or pergrad.losses.token_classification."
    )
