"""Whole-model per-example gradients with ``torch.func``: ``vmap(grad(loss of one example))``."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from pergrad import checks
from pergrad import inputs as batch
from pergrad.modes.base import Mode, ModeError, PerExampleResult


class FuncMode(Mode):
    """``g_b = ∇_Φ loss_fn(model(x_b), y_b)`` for every ``b`` at once, by ``vmap`` over examples.

    The model runs on one example at a time with a batch dimension of 1, so layers see the
    shapes they expect. Parameters are passed as detached views (never copied), buffers as
    they are. Random layers draw a separate sample for
    every example (``randomness="different"``).
    """

    name = "func"
    runs_alone = True

    def __call__(
        self, params: dict[str, nn.Parameter], inputs: batch.Inputs, target: Tensor
    ) -> PerExampleResult:
        # the other parameters detached too: a trainable one left attached (where the
        # per-layer path covers it) would give these gradients a graph through it
        fixed = {n: p.detach() for n, p in self.model.named_parameters() if n not in params}
        fixed.update(self.model.named_buffers())
        example_loss = self._example_loss(fixed, len(target))

        def loss_and_value(free: dict[str, Tensor], xs: batch.Inputs, y: Tensor):
            loss = example_loss(free, xs, y)
            return loss, loss.detach()

        per_example = vmap(
            grad(loss_and_value, has_aux=True), in_dims=(None, 0, 0), randomness="different"
        )
        free = {n: p.detach() for n, p in params.items()}
        return self._run(per_example, free, inputs, target)

    def losses(self, inputs: batch.Inputs, target: Tensor) -> Tensor:
        fixed = {n: p.detach() for n, p in self.model.named_parameters()}
        fixed.update(self.model.named_buffers())
        per_example = vmap(
            self._example_loss(fixed, len(target)), in_dims=(None, 0, 0), randomness="different"
        )
        with torch.no_grad():
            return self._run(per_example, {}, inputs, target)

    def _example_loss(self, fixed: dict[str, Tensor], size: int):
        """The loss of one example as a function of the free parameters (``fixed``: every
        other parameter and buffer), its inputs and its target, for ``vmap``."""

        def example_loss(free: dict[str, Tensor], xs: batch.Inputs, y: Tensor) -> Tensor:
            one = batch.map_tensors(lambda x: x.unsqueeze(0), xs)
            args, kwargs = ((), one) if isinstance(one, dict) else (one, None)
            output = functional_call(self.model, (free, fixed), args, kwargs)
            loss = self.loss_fn(output, y.unsqueeze(0))
            return checks.per_example_loss(loss, 1, size, graph=torch.is_grad_enabled())[0]

        return example_loss

    def _run(self, per_example, free, inputs, target):
        try:
            return per_example(free, inputs, target)
        except checks.InputError:
            raise
        except Exception as error:
            raise ModeError.wrap(self.name, self.model, error) from error
