"""What a mode that runs each example alone (``func``, ``loop``) must agree with: the batch.

Such a mode is right by construction for a model whose loss of example ``b`` depends on
example ``b`` alone. For one that combines examples (a mean over the batch pergrad could not
follow), each example's loss computed alone differs from its loss in the batch, and the
gradients of the losses computed alone are not the gradients of the loss the model gives.
:func:`compare` compares the two and refuses the second kind.

A model that draws random numbers (dropout) draws other numbers for the batch than for each
example alone, so there the comparison runs, both ways, with every random draw fixed
(:class:`pergrad.randomness.FixedRandom`): the batch and the examples alone then compute the
same function when the model does not combine examples.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from pergrad import checks
from pergrad import inputs as batch
from pergrad.randomness import ENDS, FixedRandom, RandomState


def batch_losses(model, loss_fn, inputs: batch.Inputs, target: Tensor) -> Tensor:
    """The per-example losses of one plain forward pass of the whole batch, without
    gradients, the model's buffers (running statistics) left as they were."""
    with torch.no_grad(), buffers_kept(model):
        losses = loss_fn(batch.run(model, inputs), target)
        return checks.per_example_loss(losses, len(target), graph=False)


@contextmanager
def buffers_kept(model: nn.Module) -> Iterator[None]:
    """The model's buffers as they were when entered, once left: a pass made only to compare
    changes no running statistic."""
    saved = [(b, b.clone()) for b in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


def compare(mode, inputs, target: Tensor, alone: Tensor, in_batch: Tensor, random: bool, why: str):
    """Refuse per-example losses that ``mode`` computed one example at a time (``alone``)
    and that differ from the same losses in the batch (``in_batch``), to the rounding of the
    lowest precision the model computes in. Where the model drew random numbers (``random``),
    both are computed again with every draw fixed, at each end of its range
    (:data:`pergrad.randomness.ENDS`), the random state and the model's buffers left as they
    were.

    Raises:
        InputError: saying so, with ``why``: what pergrad knows of where examples combine.
    """
    precision = _lowest_precision(mode.model)
    if not random:
        return _check(alone, in_batch, precision, mode.name, why, "")
    with RandomState().replays(), buffers_kept(mode.model):
        for end in ENDS:
            with FixedRandom(end):
                in_batch = batch_losses(mode.model, mode.loss_fn, inputs, target)
                alone = mode.losses(inputs, target)
            fixed = f" with every random draw fixed at its {end} end"
            _check(alone, in_batch, precision, mode.name, why, fixed)


def _lowest_precision(model: nn.Module) -> torch.dtype | None:
    """The half-precision dtype the model's parameters are in, where some are."""
    found = {p.dtype for p in model.parameters() if p.is_floating_point()}
    return next((dtype for dtype in (torch.bfloat16, torch.float16) if dtype in found), None)


def _check(alone: Tensor, in_batch: Tensor, precision, mode: str, why: str, fixed: str) -> None:
    alone, in_batch = alone.detach().to(in_batch.dtype), in_batch.detach()
    if checks.agree(alone, in_batch, precision):
        return
    example = int((alone - in_batch).abs().nan_to_num(float("inf")).argmax())
    where = f" ({why})" if why else ""
    raise checks.InputError(
        f"the model or loss_fn combines examples: the loss of example {example} computed "
        f"alone (mode={mode!r}){fixed} is {float(alone[example]):.6g}, in the batch "
        f"{float(in_batch[example]):.6g}, so one example's loss depends on other examples' "
        f"inputs and has no gradient of its own{where}. Compute each example's loss from "
        f"that example alone (a statistic over the batch, as BatchNorm in training mode "
        f"takes, cannot be given per example)."
    )
