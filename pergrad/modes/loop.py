"""Per-example gradients one example at a time: one forward and backward per example.

Slow, and right for every model that autograd can differentiate on a batch of one.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pergrad import checks
from pergrad import inputs as batch
from pergrad.modes.base import Mode, PerExampleResult


class LoopMode(Mode):
    """``g_b = ∇_Φ loss_fn(model(x_b), y_b)`` by ``torch.autograd.grad``, for ``b = 1 … B``."""

    name = "loop"
    runs_alone = True

    def __call__(
        self, params: dict[str, nn.Parameter], inputs: batch.Inputs, target: Tensor
    ) -> PerExampleResult:
        names, tensors = list(params), list(params.values())
        grads: dict[str, list[Tensor]] = {name: [] for name in names}
        losses = []
        for b in range(target.shape[0]):
            loss = self._loss(inputs, target, b)
            example = torch.autograd.grad(loss, tensors, allow_unused=True)
            for name, p, g in zip(names, tensors, example):
                grads[name].append(torch.zeros_like(p) if g is None else g)
            losses.append(loss.detach())
        return {name: torch.stack(gs) for name, gs in grads.items()}, torch.stack(losses)

    def losses(self, inputs: batch.Inputs, target: Tensor) -> Tensor:
        with torch.no_grad():
            return torch.stack([self._loss(inputs, target, b) for b in range(len(target))])

    def _loss(self, inputs: batch.Inputs, target: Tensor, b: int) -> Tensor:
        """The loss of example ``b``, run alone."""
        output = batch.run(self.model, batch.rows(inputs, slice(b, b + 1)))
        loss = self.loss_fn(output, target[b : b + 1])
        return checks.per_example_loss(loss, 1, len(target), graph=torch.is_grad_enabled())[0]
