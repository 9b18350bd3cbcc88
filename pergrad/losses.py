"""Per-example losses ``(B,)`` for the common heads, on a model's output as it comes: a
Hugging Face ``ModelOutput`` (its ``logits``), a tuple (its first element) or a tensor.

Each is what Hugging Face's own loss gives for one example alone, so that
``PerExample(model, losses.causal_lm)`` trains a language model as its ``Trainer`` would,
with one loss per example instead of one per batch. Logits in half precision are upcast to
float32 first, as Hugging Face does; others keep their dtype.

>>> engine = pergrad.PerExample(model, pergrad.losses.causal_lm)
>>> labels = ids.masked_fill(mask == 0, -100)   # padding does not count
>>> loss = engine.backward({"input_ids": ids, "attention_mask": mask}, labels)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from pergrad.checks import InputError


def causal_lm(
    output: object, labels: Tensor, ignore_index: int = -100, reduction: str = "mean"
) -> Tensor:
    """The next-token loss of each sequence: ``ℓ_b = (1/n_b) Σ_t CE(logits[b, t], labels[b,
    t+1])`` over its ``n_b`` counted tokens (labels not ``ignore_index``), or their sum with
    ``reduction="sum"``.

    Args:
        output: the model's output; its logits ``(B, T, V)``.
        labels: ``(B, T)``, the input ids as a rule, ``ignore_index`` where not counted
            (padding). Shifted here: position ``t`` predicts label ``t + 1``.
        ignore_index: the label of tokens that do not count.
        reduction: ``"mean"`` over each sequence's counted tokens (Hugging Face's loss of a
            batch of one) or ``"sum"``.

    Raises:
        InputError: labels not shaped ``(B, T)`` like the logits, a bad ``reduction``, or with
            ``"mean"``, a sequence with no counted token.
    """
    logits = _logits(output, "causal_lm")
    _check_labels(labels, logits.shape[:2], "causal_lm", "(B, T): the input ids as a rule")
    if reduction not in ("mean", "sum"):
        raise InputError(f"Invalid reduction: {reduction!r}; choose 'mean' or 'sum'")
    return _token_losses(logits[:, :-1], labels[:, 1:], ignore_index, reduction, "causal_lm")


def token_classification(output: object, labels: Tensor, ignore_index: int = -100) -> Tensor:
    """The mean cross-entropy over each sequence's counted tokens:
    ``ℓ_b = (1/n_b) Σ_t CE(logits[b, t], labels[b, t])``.

    Args:
        output: the model's output; its logits ``(B, T, C)``.
        labels: ``(B, T)`` class indices, ``ignore_index`` where not counted.

    Raises:
        InputError: labels not shaped ``(B, T)`` like the logits, or a sequence with no
            counted token.
    """
    logits = _logits(output, "token_classification")
    _check_labels(labels, logits.shape[:2], "token_classification", "(B, T)")
    return _token_losses(logits, labels, ignore_index, "mean", "token_classification")


def classification(output: object, labels: Tensor) -> Tensor:
    """The cross-entropy of each example: ``ℓ_b = CE(logits[b], labels[b])``.

    Args:
        output: the model's output; its logits ``(B, C)``.
        labels: ``(B,)`` class indices.

    Raises:
        InputError: labels not shaped ``(B,)``, or a label outside ``0..C-1`` (``-100``
            included: every example counts, so none can be ignored).
    """
    logits = _logits(output, "classification")
    _check_labels(labels, logits.shape[:1], "classification", "(B,): one class per example")
    classes = logits.shape[-1]
    if _concrete(labels) and not bool(((labels >= 0) & (labels < classes)).all()):
        raise InputError(
            f"classification: labels {labels.tolist()} hold a class outside 0..{classes - 1}; "
            f"every example needs a class (an ignored one would count as a zero loss)"
        )
    return F.cross_entropy(_upcast(logits), labels, reduction="none")


def _token_losses(
    logits: Tensor, labels: Tensor, ignore_index: int, reduction: str, name: str
) -> Tensor:
    batch, length = labels.shape
    token = F.cross_entropy(
        _upcast(logits).reshape(batch * length, -1),
        labels.reshape(-1),
        ignore_index=ignore_index,
        reduction="none",
    ).view(batch, length)
    if reduction == "sum":
        return token.sum(1)
    counts = (labels != ignore_index).sum(1)
    if _concrete(counts) and not bool(counts.all()):
        empty = (counts == 0).nonzero().flatten().tolist()
        raise InputError(
            f"{name}: example(s) {empty} have no counted token (every label is "
            f"ignore_index={ignore_index}), so their mean loss is 0/0. Leave them out of the "
            f"batch, or use reduction='sum'."
        )
    return token.sum(1) / counts


def _concrete(labels: Tensor) -> bool:
    """Whether the labels' values can be read: not under ``torch.func``'s transforms, where
    an example is checked alone, one at a time, without its values (``mode="func"``)."""
    return not torch._C._functorch.is_functorch_wrapped_tensor(labels)


def _logits(output: object, name: str) -> Tensor:
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, (tuple, list)) and output:
        logits = output[0]
    if logits is None and isinstance(output, Tensor):
        logits = output
    if not isinstance(logits, Tensor):
        raise InputError(
            f"{name}: the model's output is a {type(output).__name__} without logits: pass a "
            f"model that returns logits, a tuple starting with them, or an output with .logits"
        )
    return logits


def _check_labels(labels: object, shape: torch.Size, name: str, must: str) -> None:
    if not isinstance(labels, Tensor):
        raise InputError(f"{name}: labels is a {type(labels).__name__}, not a Tensor {must}")
    if labels.shape != shape:
        raise InputError(
            f"{name}: labels has shape {tuple(labels.shape)}, the logits need "
            f"{tuple(shape)}: pass labels {must}"
        )


def _upcast(logits: Tensor) -> Tensor:
    """Half-precision logits in float32, as Hugging Face's losses take them; others as they
    are."""
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
