"""RMSprop and Adam with per-example second moments: ``s`` averages ``mean_b g_b²``."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

import pergrad
from optim import functional as F
from optim.base import PerExampleOptimizer


class _Adaptive(PerExampleOptimizer):
    """``Φ ← Φ − B·lr·m / (s^power + ε)``, the update RMSprop and Adam share (MATH.md)."""

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("centered", False)
            group.setdefault("power", 0.5)

    def _init_state(self, p: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        state["seen"] = 0  # n: examples seen, this step included
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)  # m
        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)  # s
        if group["centered"]:
            state["grad_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)  # a

    def _update(
        self, p: Tensor, stats: pergrad.GradStats, state: dict[str, Any], group: dict[str, Any]
    ) -> None:
        second = stats.sq_mean if group["second_moment"] == "example" else p.grad.square()
        F.adaptive(
            p,
            p.grad,
            second,
            state["exp_avg"],
            state["exp_avg_sq"],
            state.get("grad_avg"),
            lr=group["lr"],
            batch_size=stats.count,
            grad_weight=F.average_weight(stats.count, state["seen"], group["grad_horizon"]),
            sq_weight=F.average_weight(stats.count, state["seen"], group["sq_horizon"]),
            eps=group["eps"],
            power=group["power"],
            weight_decay=group["weight_decay"],
        )

    @classmethod
    def in_sgd_units(cls, params, sgd_lr: float, *, eps: float, **options: Any):
        """The slides' parameterization: ``lr = ε·η₀`` with ``η₀`` in SGD units, so that::

            Φ ← Φ − B·η₀ · m / (1 + √s/ε)

        moves like SGD with ``η₀`` where ``√s ≪ ε`` and like Adam where ``√s ≫ ε``: ``η₀``
        carries over from SGD and ``ε`` becomes a tunable threshold in gradient units.
        """
        return cls(params, lr=eps * sgd_lr, eps=eps, **options)


class RMSprop(_Adaptive):
    """Batch-size-invariant RMSProp (MATH.md)::

        m ← (1 − w_g)·m + w_g·ĝ                     (m = ĝ with grad_horizon = 1)
        s ← (1 − w_s)·s + w_s·q,   q = mean_b g_b²  (second_moment="example")
        Φ ← Φ − B·lr·m / (√s + ε)

    with ``w = min(1, B / min(n, N⁰))``. ``second_moment="batch"`` feeds ``ĝ²`` instead
    (standard RMSProp, which is not batch-size invariant), everything else equal.

    Args:
        params: parameters or parameter groups.
        lr: ``η₀``, per example; a step moves by ``B·lr·…``.
        sq_horizon: ``N_s⁰``, the examples the second-moment average spans.
        eps: ``ε``, added to ``√s``.
        grad_horizon: ``N_g⁰``, the examples the momentum average spans (1: no momentum).
        centered: use ``s − a²``, ``a`` the running average of ``ĝ`` with weight ``w_s``.
        second_moment: ``"example"`` (invariant) or ``"batch"`` (standard).
        weight_decay: ``λ``, decoupled, per example: ``Φ −= B·lr·λ·Φ`` first.
        power: the denominator is ``s^power + ε``; ``½`` is RMSProp, ``1`` the dimensionally
            consistent choice the slides discuss. A research knob.

    Example:
        >>> opt = optim.RMSprop(model.parameters(), lr=1e-4, sq_horizon=1000)
        >>> opt.zero_grad(); engine.backward(x, y); opt.step()
    """

    def __init__(
        self,
        params,
        lr: float,
        *,
        sq_horizon: float = 1000,
        eps: float = 1e-8,
        grad_horizon: float = 1,
        centered: bool = False,
        second_moment: str = "example",
        weight_decay: float = 0.0,
        power: float = 0.5,
    ):
        defaults = {
            "lr": lr,
            "sq_horizon": sq_horizon,
            "eps": eps,
            "grad_horizon": grad_horizon,
            "centered": centered,
            "second_moment": second_moment,
            "weight_decay": weight_decay,
            "power": power,
        }
        super().__init__(params, defaults)


class Adam(_Adaptive):
    """Batch-size-invariant Adam (MATH.md)::

        m ← (1 − w_g)·m + w_g·ĝ
        s ← (1 − w_s)·s + w_s·q,   q = mean_b g_b²  (second_moment="example")
        Φ ← Φ − B·lr·m / (√s + ε)

    with ``w = min(1, B / min(n, N⁰))``, which is also the bias correction: the averages are
    exact means of everything seen until ``n`` reaches the horizon. ``second_moment="batch"``
    feeds ``ĝ²`` (standard Adam with linear learning-rate scaling), everything else equal.
    The defaults are ``torch.optim.Adam``'s ``betas=(0.9, 0.999)`` at ``B = 32``.

    Args:
        params: parameters or parameter groups.
        lr: ``η₀``, per example; a step moves by ``B·lr·…``. See :meth:`in_sgd_units` for the
            slides' form with ``η₀`` in SGD units.
        grad_horizon: ``N_g⁰``, the examples the first-moment average spans.
        sq_horizon: ``N_s⁰``, the examples the second-moment average spans.
        eps: ``ε``, added to ``√s``.
        second_moment: ``"example"`` (invariant) or ``"batch"`` (standard).
        weight_decay: ``λ``, decoupled as in AdamW, per example: ``Φ −= B·lr·λ·Φ`` first.

    Example:
        >>> opt = optim.Adam(model.parameters(), lr=3e-5)
        >>> opt.zero_grad(); engine.backward(x, y); opt.step()

    References:
        Kingma and Ba 2015, "Adam"; Loshchilov and Hutter 2019, "Decoupled Weight Decay".
    """

    def __init__(
        self,
        params,
        lr: float,
        *,
        grad_horizon: float = 320,
        sq_horizon: float = 32_000,
        eps: float = 1e-8,
        second_moment: str = "example",
        weight_decay: float = 0.0,
    ):
        defaults = {
            "lr": lr,
            "grad_horizon": grad_horizon,
            "sq_horizon": sq_horizon,
            "eps": eps,
            "second_moment": second_moment,
            "weight_decay": weight_decay,
            "centered": False,
            "power": 0.5,
        }
        super().__init__(params, defaults)
