"""One call for the common training step: clear, per-example backward, step."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

import pergrad
from pergrad.engine import Inputs, LossFn


class TrainingStep:
    """``loss = step(inputs, target)``: ``zero_grad``, ``engine.backward``, ``optimizer.step``.

    Args:
        model: the model to train.
        loss_fn: per-example loss, ``loss_fn(output, target) -> (B,)``.
        optimizer: an ``optim`` optimizer over the model's parameters.
        **engine_options: passed to :class:`pergrad.PerExample` (``mode``, ``chunk_size``).

    Example:
        >>> step = optim.TrainingStep(model, nn.CrossEntropyLoss(reduction="none"), opt)
        >>> for x, y in loader:
        ...     loss = step(x, y)
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        optimizer: torch.optim.Optimizer,
        **engine_options: Any,
    ):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer (optim.Adam(model.parameters(), "
                f"lr=...)), got {type(optimizer).__name__}"
            )
        self.engine = pergrad.PerExample(model, loss_fn, **engine_options)
        self.optimizer = optimizer

    def __call__(self, inputs: Inputs, target: Tensor) -> Tensor:
        """Train on one batch and return its mean loss (0-dim, detached)."""
        self.optimizer.zero_grad()
        loss = self.engine.backward(inputs, target)
        self.optimizer.step()
        return loss
