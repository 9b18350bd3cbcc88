"""SGD with momentum as a running average over ``grad_horizon`` examples."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import ParamsT

from optim import functional as F
from optim.base import AverageWeights, PerExampleOptimizer, refuse_torch_names


class SGD(PerExampleOptimizer):
    """Batch-size-invariant SGD (MATH.md)::

        m ← (1 − w_g)·m + w_g·ĝ,   w_g = min(1, B / min(n, N_g⁰))   (or Adam's warm-up)
        Φ ← Φ − B·lr·m

    Args:
        params: parameters or parameter groups, as for ``torch.optim.SGD``.
        lr: ``η₀``, the learning rate for one example; a step moves by ``B·lr·m``.
        grad_horizon: ``N_g⁰``, the examples the momentum average spans; ``1`` (the default)
            is vanilla SGD, ``Φ −= lr · Σ_b g_b``.
        weight_decay: ``λ``, decoupled and per example: ``Φ −= B·lr·λ·Φ`` before the update.
        batch_scaling: ``"linear"``: a step moves by ``B·lr·m``; ``"gain"``: by ``r·lr·m``,
            ``r = B(σ² + |G|²)/(σ² + B|G|²)`` the gain ratio estimated from the per-example
            statistics and averaged over ``gain_horizon`` examples (MATH.md); ``"sqrt"``: by
            ``√B·lr·m``.
        gain_horizon: the examples the gain's noise and signal estimates span.
        bias_correction: how the momentum average starts: ``"uniform"``, the exact mean of
            everything seen until ``n`` reaches ``grad_horizon``; ``"exponential"``, Adam's
            bias correction with ``β = 1 − B/N_g⁰`` (MATH.md).
        foreach: one multi-tensor kernel per operation for all parameters of a group
            (``torch._foreach_*``) instead of a loop over them, with the same numbers bit for
            bit; ``None`` (the default) uses it where every parameter is on CUDA, as
            ``torch.optim`` does.
        **unsupported: refused, with a ``TypeError`` that says what replaces
            ``torch.optim``'s ``betas``, ``momentum`` or ``alpha`` here.

    Example:
        >>> engine = pergrad.PerExample(model, nn.CrossEntropyLoss(reduction="none"))
        >>> opt = optim.SGD(model.parameters(), lr=0.01, grad_horizon=320)
        >>> opt.zero_grad(); engine.backward(x, y); opt.step()

    References:
        Goyal et al. 2017, "Accurate, Large Minibatch SGD"; Smith et al. 2018, "Don't Decay
        the Learning Rate, Increase the Batch Size".
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float,
        *,
        grad_horizon: float = 1,
        weight_decay: float = 0.0,
        batch_scaling: str = "linear",
        gain_horizon: float = 1000,
        bias_correction: str = "uniform",
        foreach: bool | None = None,
        **unsupported: Any,
    ):
        refuse_torch_names("SGD", unsupported)
        defaults = {
            "lr": lr,
            "grad_horizon": grad_horizon,
            "weight_decay": weight_decay,
            "batch_scaling": batch_scaling,
            "gain_horizon": gain_horizon,
            "bias_correction": bias_correction,
            "foreach": foreach,
        }
        super().__init__(params, defaults)

    def _init_state(self, p: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        state["seen"] = 0  # n: examples seen, this step included
        state["grad_mass"] = 0.0  # c: the average's share of data
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)  # m

    def _update_group(
        self,
        params: list[Tensor],
        group: dict[str, Any],
        step_scale: float,
        weights: AverageWeights,
    ) -> None:
        F.sgd(
            params,
            [p.grad for p in params],
            [self.state[p]["exp_avg"] for p in params],
            lr=group["lr"],
            step_scale=step_scale,
            grad_weight=weights.grad,
            weight_decay=group["weight_decay"],
            foreach=self._foreach(params, group),
        )
