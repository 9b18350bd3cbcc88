"""What the optimizers share: validation, reading pergrad's statistics, and ``zero_grad``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

import pergrad

SECOND_MOMENTS = ("example", "batch")


class PerExampleOptimizer(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` whose hyperparameters are per example and whose every step
    reads its batch size, ``ĝ`` and ``q = mean_b g_b²`` from the statistics ``pergrad`` left.

    Subclasses implement :meth:`_update` for one parameter.
    """

    def __init__(self, params, defaults: dict[str, Any]):
        _validate(defaults)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        _validate(param_group)
        super().add_param_group(param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear ``p.grad`` and the per-example statistics of every parameter.

        Both are always removed (``set_to_none`` is accepted for compatibility): a zeroed
        ``.grad`` would carry no statistics for the next ``pergrad`` backward.
        """
        pergrad.zero_grad(p for group in self.param_groups for p in group["params"])

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """Take one step with the batch whose statistics ``pergrad`` accumulated.

        Parameters without ``.grad`` are skipped, as in PyTorch.

        Raises:
            RuntimeError: a parameter has a ``.grad`` but no per-example statistics.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        owned = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        missing = [p for p in owned if pergrad.grad_stats(p) is None]
        if missing:
            raise RuntimeError(
                f"a parameter of shape {tuple(missing[0].shape)} has a .grad but no per-example "
                f"statistics, so {type(self).__name__} cannot know the batch size or "
                f"mean_b g_b². Compute gradients with "
                f"pergrad.PerExample(model, loss_fn).backward(inputs, target) instead "
                f"of loss.backward(). No parameter was changed."
            )
        pergrad.stats.check_unchanged(
            {f"#{i} (shape {tuple(p.shape)})": p for i, p in enumerate(owned)}
        )
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                stats = pergrad.grad_stats(p)
                state = self.state[p]
                if not state:
                    self._init_state(p, state, group)
                state["seen"] += stats.count
                self._update(p, stats, state, group)
        return loss

    def _init_state(self, p: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        raise NotImplementedError

    def _update(
        self, p: Tensor, stats: pergrad.GradStats, state: dict[str, Any], group: dict[str, Any]
    ) -> None:
        raise NotImplementedError


_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "lr": (lambda v: v >= 0, "learning rate"),
    "grad_horizon": (lambda v: v >= 1, "grad_horizon (in examples, >= 1)"),
    "sq_horizon": (lambda v: v >= 1, "sq_horizon (in examples, >= 1)"),
    "eps": (lambda v: v > 0, "epsilon value (> 0)"),
    "weight_decay": (lambda v: v >= 0, "weight_decay value"),
    "power": (lambda v: v > 0, "power (> 0)"),
    "second_moment": (lambda v: v in SECOND_MOMENTS, f"second_moment (one of {SECOND_MOMENTS})"),
}


def _validate(options: dict[str, Any]) -> None:
    """Raise ``ValueError`` for a hyperparameter out of range, worded as ``torch.optim`` does."""
    for key, (ok, what) in _RULES.items():
        if key in options and not ok(options[key]):
            raise ValueError(f"Invalid {what}: {options[key]!r}")
