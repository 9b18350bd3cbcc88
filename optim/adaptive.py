"""RMSprop and Adam with per-example second moments: ``s`` averages ``mean_b g_b²``."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import ParamsT

import pergrad
from optim import functional as F
from optim.base import AverageWeights, PerExampleOptimizer, refuse_torch_names


class _Adaptive(PerExampleOptimizer):
    """What RMSprop and Adam share: ``s``, the running average of ``q = mean_b g_b²`` (or of
    ``ĝ²``), and the metric ``1 / (s'^power + ε)`` their gain ratio is measured in."""

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("second_moment_batch", 1)

    def _power(self, group: dict[str, Any]) -> float:
        return 0.5

    def _init_state(self, p: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        state["seen"] = 0  # n: examples seen, this step included
        state["grad_mass"] = state["sq_mass"] = 0.0  # c: the averages' share of data
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)  # m
        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)  # s

    def _second(self, p: Tensor, stats: pergrad.GradStats, group: dict[str, Any]) -> Tensor:
        """``q = mean_b g_b²``, or ``ĝ²`` for the standard second moment, or, with
        ``second_moment_batch = N ≠ 1``, the unbiased estimate of ``E[ĝ²]`` at batch size
        ``N``: ``ĝ² + (B/N − 1)/(B − 1)·(q − ĝ²)``, for ``B < N`` at least ``q/N``
        (MATH.md)."""
        if group["second_moment"] == "batch":
            return p.grad.square()
        size = group["second_moment_batch"]
        if size == 1:
            return stats.sq_mean
        batch = stats.count
        mean_square = p.grad.square()
        weight = (batch / size - 1) / (batch - 1)
        estimate = mean_square.add_(stats.sq_mean - mean_square, alpha=weight)
        return estimate if batch >= size else torch.maximum(estimate, stats.sq_mean / size)

    def _metric(
        self, p: Tensor, stats: pergrad.GradStats, state: dict[str, Any], group: dict[str, Any]
    ) -> Tensor:
        """``1 / (s'^power + ε)`` with the averages as this step will leave them."""
        weight = self._weights(state, stats.count, group).sq
        spread = state["exp_avg_sq"].lerp(self._second(p, stats, group), weight)
        if self._centered(group):
            spread = (spread - state["grad_avg"].lerp(p.grad, weight).square()).clamp_(min=0)
        return 1 / spread.pow(self._power(group)).add_(group["eps"])

    def _centered(self, group: dict[str, Any]) -> bool:
        return False

    def metric_of(self, p: Tensor, group: dict[str, Any]) -> Tensor | None:
        state = self.state.get(p)
        if not state or not state.get("seen"):
            return None
        spread = state["exp_avg_sq"]
        if self._centered(group):
            spread = (spread - state["grad_avg"].square()).clamp(min=0)
        return 1 / spread.pow(self._power(group)).add_(group["eps"])

    def _state_keys(self) -> set[str]:
        return {"seen", "exp_avg", "exp_avg_sq"}

    def _buffers(self, params: list[Tensor], group: dict[str, Any]) -> dict[str, list[Tensor]]:
        """The lists the functional update takes, for parameters that share its scalars."""
        states = [self.state[p] for p in params]
        return {
            "params": params,
            "grads": [p.grad for p in params],
            "sq_inputs": [self._second(p, pergrad.grad_stats(p), group) for p in params],
            "exp_avgs": [state["exp_avg"] for state in states],
            "exp_avg_sqs": [state["exp_avg_sq"] for state in states],
        }

    @classmethod
    def in_sgd_units(cls, params: ParamsT, sgd_lr: float, *, eps: float, **options: Any):
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

    with ``w = min(1, B / min(n, N⁰))`` (or Adam's bias correction, ``bias_correction``).
    ``second_moment="batch"`` feeds ``ĝ²`` instead (standard RMSProp, which is not
    batch-size invariant), everything else equal.

    Args:
        params: parameters or parameter groups.
        lr: ``η₀``, per example; a step moves by ``B·lr·…``.
        sq_horizon: ``N_s⁰``, the examples the second-moment average spans.
        eps: ``ε``, added to ``√s``.
        grad_horizon: ``N_g⁰``, the examples the momentum average spans (1: no momentum).
        centered: use ``s − a²``, ``a`` the running average of ``ĝ`` with weight ``w_s``.
        second_moment: ``"example"`` (invariant) or ``"batch"`` (standard).
        second_moment_batch: ``N``, with ``second_moment="example"``: ``s`` averages
            ``E[ĝ²]`` at batch size ``N``, ``|G|² + σ²/N``, estimated without bias from each
            step's per-example statistics whatever its ``B`` (``B ≥ 2``). ``1`` is
            ``q = mean_b g_b²``; ``N = 32`` gives at every ``B`` the denominator Adam has at
            ``B = 32``, mean-dominated where the noise is large.
        weight_decay: ``λ``, decoupled, per example: ``Φ −= B·lr·λ·Φ`` first.
        power: the denominator is ``s^power + ε``; ``½`` is RMSProp, ``1`` the dimensionally
            consistent choice the slides discuss. A research knob.
        batch_scaling: ``"linear"``: a step moves by ``B·lr·…``; ``"gain"``: by ``r·lr·…``,
            ``r = B(σ² + |G|²)/(σ² + B|G|²)`` the gain ratio, estimated from the per-example
            statistics in this optimizer's metric ``1/(√s + ε)`` and averaged over
            ``gain_horizon`` examples: ``B`` while the gradient noise dominates, falling
            toward 1 past the critical batch size, so one ``lr`` survives large batches
            (MATH.md); ``"sqrt"``: by ``√B·lr·…`` with ``ε/√B`` in place of ``ε`` —
            with ``second_moment="batch"``, the square-root rule of Malladi et al. (2022) for
            Adam and RMSprop in per-example units (horizons in examples).
        gain_horizon: the examples the gain's noise and signal estimates span. Short enough
            to follow the noise scale as it grows during training: averaged over a long
            horizon, the large gradients of the first steps dominate and ``r`` lags far
            behind.
        bias_correction: how the averages start. ``"uniform"``: ``w = min(1, B/min(n, N⁰))``,
            the exact mean of everything seen until ``n`` reaches the horizon (the slides');
            ``"exponential"``: Adam's, ``w = a/c`` with ``a = min(1, B/N⁰)`` and
            ``c = (1 − a)·c₋ + a`` (``1 − β^t`` at a fixed ``B``, ``β = max(0, 1 − B/N⁰)``;
            ``torch.optim.RMSprop`` has no bias correction). The gain's averages keep the
            uniform rule (MATH.md).
        foreach: one multi-tensor kernel per operation for all parameters of a group
            (``torch._foreach_*``) instead of a loop over them, with the same numbers bit for
            bit; ``None`` (the default) uses it where every parameter is on CUDA, as
            ``torch.optim`` does.
        **unsupported: refused, with a ``TypeError`` that says what replaces
            ``torch.optim``'s ``betas``, ``momentum`` or ``alpha`` here.

    Example:
        >>> opt = optim.RMSprop(model.parameters(), lr=1e-4, sq_horizon=1000)
        >>> opt.zero_grad(); engine.backward(x, y); opt.step()
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float,
        *,
        sq_horizon: float = 1000,
        eps: float = 1e-8,
        grad_horizon: float = 1,
        centered: bool = False,
        second_moment: str = "example",
        second_moment_batch: float = 1,
        weight_decay: float = 0.0,
        power: float = 0.5,
        batch_scaling: str = "linear",
        gain_horizon: float = 1000,
        bias_correction: str = "uniform",
        foreach: bool | None = None,
        **unsupported: Any,
    ):
        refuse_torch_names("RMSprop", unsupported)
        defaults = {
            "lr": lr,
            "sq_horizon": sq_horizon,
            "eps": eps,
            "grad_horizon": grad_horizon,
            "centered": centered,
            "second_moment": second_moment,
            "second_moment_batch": second_moment_batch,
            "weight_decay": weight_decay,
            "power": power,
            "batch_scaling": batch_scaling,
            "gain_horizon": gain_horizon,
            "bias_correction": bias_correction,
            "foreach": foreach,
        }
        super().__init__(params, defaults)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("centered", False)
            group.setdefault("power", 0.5)

    def _power(self, group: dict[str, Any]) -> float:
        return group["power"]

    def _centered(self, group: dict[str, Any]) -> bool:
        return group["centered"]

    def _init_state(self, p: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        super()._init_state(p, state, group)
        if group["centered"]:
            state["grad_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)  # a

    def _update_group(
        self,
        params: list[Tensor],
        group: dict[str, Any],
        step_scale: float,
        weights: AverageWeights,
    ) -> None:
        grad_avgs = [self.state[p]["grad_avg"] for p in params] if group["centered"] else None
        F.rmsprop(
            **self._buffers(params, group),
            grad_avgs=grad_avgs,
            lr=group["lr"],
            step_scale=step_scale,
            grad_weight=weights.grad,
            sq_weight=weights.sq,
            eps=_eps(group, step_scale),
            power=group["power"],
            weight_decay=group["weight_decay"],
            foreach=self._foreach(params, group),
        )


class Adam(_Adaptive):
    """Batch-size-invariant Adam (MATH.md)::

        m ← (1 − w_g)·m + w_g·ĝ
        s ← (1 − w_s)·s + w_s·q,   q = mean_b g_b²  (second_moment="example")
        Φ ← Φ − B·lr·m / (√s + ε)

    with ``w = min(1, B / min(n, N⁰))``, which is also the bias correction: the averages are
    exact means of everything seen until ``n`` reaches the horizon (``bias_correction=
    "exponential"``: Adam's, with ``β = 1 − B/N⁰``). ``second_moment="batch"``
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
        second_moment_batch: ``N``, with ``second_moment="example"``: ``s`` averages
            ``E[ĝ²]`` at batch size ``N``, ``|G|² + σ²/N``, estimated without bias from each
            step's per-example statistics whatever its ``B`` (``B ≥ 2``). ``1`` is
            ``q = mean_b g_b²``; ``N = 32`` gives at every ``B`` the denominator Adam has at
            ``B = 32``, mean-dominated where the noise is large.
        weight_decay: ``λ``, decoupled as in AdamW, per example: ``Φ −= B·lr·λ·Φ`` first.
        batch_scaling: ``"linear"``: a step moves by ``B·lr·…``; ``"gain"``: by ``r·lr·…``,
            ``r = B(σ² + |G|²)/(σ² + B|G|²)`` the gain ratio, estimated from the per-example
            statistics in this optimizer's metric ``1/(√s + ε)`` and averaged over
            ``gain_horizon`` examples: ``B`` while the gradient noise dominates, falling
            toward 1 past the critical batch size, so one ``lr`` survives large batches
            (MATH.md); ``"sqrt"``: by ``√B·lr·…`` with ``ε/√B`` in place of ``ε`` —
            with ``second_moment="batch"``, the square-root rule of Malladi et al. (2022) for
            Adam and RMSprop in per-example units (horizons in examples).
        gain_horizon: the examples the gain's noise and signal estimates span. Short enough
            to follow the noise scale as it grows during training: averaged over a long
            horizon, the large gradients of the first steps dominate and ``r`` lags far
            behind.
        bias_correction: how the averages start. ``"uniform"``: ``w = min(1, B/min(n, N⁰))``,
            the exact mean of everything seen until ``n`` reaches the horizon (the slides');
            ``"exponential"``: Adam's, ``w = a/c`` with ``a = min(1, B/N⁰)`` and
            ``c = (1 − a)·c₋ + a`` (``1 − β^t`` at a fixed ``B``): at a fixed batch size,
            ``torch.optim.Adam``'s averages with ``β = max(0, 1 − B/N⁰)``. The gain's
            averages keep the uniform rule (MATH.md).
        foreach: one multi-tensor kernel per operation for all parameters of a group
            (``torch._foreach_*``) instead of a loop over them, with the same numbers bit for
            bit; ``None`` (the default) uses it where every parameter is on CUDA, as
            ``torch.optim`` does.
        **unsupported: refused, with a ``TypeError`` that says what replaces
            ``torch.optim``'s ``betas``, ``momentum`` or ``alpha`` here.

    Example:
        >>> opt = optim.Adam(model.parameters(), lr=3e-5)
        >>> opt.zero_grad(); engine.backward(x, y); opt.step()

    References:
        Kingma and Ba 2015, "Adam"; Loshchilov and Hutter 2019, "Decoupled Weight Decay".
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float,
        *,
        grad_horizon: float = 320,
        sq_horizon: float = 32_000,
        eps: float = 1e-8,
        second_moment: str = "example",
        second_moment_batch: float = 1,
        weight_decay: float = 0.0,
        batch_scaling: str = "linear",
        gain_horizon: float = 1000,
        bias_correction: str = "uniform",
        foreach: bool | None = None,
        **unsupported: Any,
    ):
        refuse_torch_names("Adam", unsupported)
        defaults = {
            "lr": lr,
            "grad_horizon": grad_horizon,
            "sq_horizon": sq_horizon,
            "eps": eps,
            "second_moment": second_moment,
            "second_moment_batch": second_moment_batch,
            "weight_decay": weight_decay,
            "batch_scaling": batch_scaling,
            "gain_horizon": gain_horizon,
            "bias_correction": bias_correction,
            "foreach": foreach,
        }
        super().__init__(params, defaults)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:  # what Adam kept before it had a functional of its own
            group.pop("centered", None)
            group.pop("power", None)

    def _legacy_keys(self) -> set[str]:
        return {"centered", "power"}

    def _update_group(
        self,
        params: list[Tensor],
        group: dict[str, Any],
        step_scale: float,
        weights: AverageWeights,
    ) -> None:
        F.adam(
            **self._buffers(params, group),
            lr=group["lr"],
            step_scale=step_scale,
            grad_weight=weights.grad,
            sq_weight=weights.sq,
            eps=_eps(group, step_scale),
            weight_decay=group["weight_decay"],
            foreach=self._foreach(params, group),
        )


def _eps(group: dict[str, Any], step_scale: float) -> float:
    """``ε``, or, with ``batch_scaling="sqrt"`` (``step_scale = √B``), ``ε/√B``."""
    return group["eps"] / step_scale if group["batch_scaling"] == "sqrt" else group["eps"]
