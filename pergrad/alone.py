"""What a mode that runs each example alone (``func``, ``loop``) must agree with: the batch.

Such a mode is right by construction for a model whose loss of example ``b`` depends on
example ``b`` alone. For one that combines examples (a mean over the batch pergrad could not
follow), each example's loss computed alone differs from its loss in the batch, and the
gradients of the losses computed alone are not the gradients of the loss the model gives.
:func:`check` compares the two and refuses the second kind.

A model that draws random numbers (dropout) draws other numbers for the batch than for each
example alone, so there the comparison runs, both ways, with every random draw fixed
(:class:`pergrad.randomness.FixedRandom`): the batch and the examples alone then compute the
same function when the model does not combine examples.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pergrad import checks
from pergrad import inputs as batch
from pergrad.randomness import FixedRandom


def batch_losses(model, loss_fn, inputs: batch.Inputs, target: Tensor) -> Tensor:
    """The per-example losses of one plain forward pass of the whole batch, without
    gradients."""
    with torch.no_grad():
        losses = loss_fn(batch.run(model, inputs), target)
        return checks.per_example_loss(losses, len(target), graph=False)


def compare(mode, inputs, target: Tensor, alone: Tensor, in_batch: Tensor, random: bool, why: str):
    """Refuse per-example losses that ``mode`` computed one example at a time (``alone``)
    and that differ from the same losses in the batch (``in_batch``); where the model drew
    random numbers (``random``), both computed again under :class:`FixedRandom`.

    Raises:
        InputError: saying so, with ``why``: what pergrad knows of where examples combine.
    """
    if random:
        with FixedRandom():
            in_batch = batch_losses(mode.model, mode.loss_fn, inputs, target)
            alone = mode.losses(inputs, target)
    alone, in_batch = alone.detach().to(in_batch.dtype), in_batch.detach()
    if checks.agree(alone, in_batch):
        return
    example = int((alone - in_batch).abs().nan_to_num(float("inf")).argmax())
    where = f" ({why})" if why else ""
    fixed = " with every random draw fixed" if random else ""
    raise checks.InputError(
        f"the model or loss_fn combines examples: the loss of example {example} computed "
        f"alone (mode={mode.name!r}){fixed} is {float(alone[example]):.6g}, in the batch "
        f"{float(in_batch[example]):.6g}, so one example's loss depends on other examples' "
        f"inputs and has no gradient of its own{where}. Compute each example's loss from "
        f"that example alone (a statistic over the batch, as BatchNorm in training mode "
        f"takes, cannot be given per example)."
    )
