"""The update rules of MATH.md as plain functions, one per optimizer, as ``torch.optim``
writes them: each takes lists of tensors that share the step's scalars and runs, for each
operation, a loop over the tensors or, with ``foreach=True``, one multi-tensor kernel
(``torch._foreach_*``), with the same arithmetic in the same order: bit for bit the same.

Notation: ``B`` examples in this step, ``S`` the factor the step is scaled by (``step_scale``:
``B``, or the gain ratio or ``√B`` in its place), ``n`` examples seen so far (this step
included), ``ĝ = mean_b g_b`` (``p.grad``), ``q = mean_b g_b²`` (or ``ĝ²`` for the standard
second moment), per-example horizons ``N⁰`` counted in examples.
"""

from __future__ import annotations

import torch
from torch import Tensor

Tensors = list[Tensor]


def average_weight(batch_size: int, seen: int, horizon: float) -> float:
    """``w = min(1, B / min(n, N⁰))``: the weight of this batch in a running average.

    While ``n < N⁰`` it is the exact mean of everything seen (no bias toward the zero start);
    after, a moving average over ``N⁰ / B`` steps; ``w = 1`` whenever ``B ≥ N⁰``.
    """
    return min(1.0, batch_size / min(seen, horizon))


def exponential_weight(batch_size: int, mass: float, seen: int, horizon: float) -> float:
    """``w = a / c``, ``c = (1 − a)·c₋ + a``, ``a = min(1, B / N⁰)``: the weight of this batch in
    a running average with Adam's bias correction, counted in examples. ``mass`` is ``c₋``, the
    share of the average's weight its data held before this batch (0 at the start).

    ``a`` is ``1 − β`` of this step; at a fixed ``B``, ``c = 1 − β^t`` and the average is
    ``torch.optim.Adam``'s bias-corrected one. With ``N⁰ = ∞`` (``β = 1``) it is the exact mean of
    everything seen, ``B / n``, the limit as ``N⁰ → ∞``.
    """
    share = min(1.0, batch_size / horizon)
    if share == 0:
        return batch_size / seen
    return share / data_mass(batch_size, mass, horizon)


def data_mass(batch_size: int, mass: float, horizon: float) -> float:
    """``c = (1 − a)·c₋ + a``, ``a = min(1, B / N⁰)``: the share of a running average's weight
    its data hold after this batch (``1 − β^t`` at a fixed ``B``; the rest would be the zero
    start's)."""
    share = min(1.0, batch_size / horizon)
    return (1 - share) * mass + share


def gain_ratio(batch_size: int, noise: Tensor, signal: Tensor) -> Tensor:
    """``r = B(σ² + |G|²) / (σ² + B|G|²)``, the number of single-example steps a batch of ``B``
    is worth (McCandlish et al. 2018; AdaScale, Johnson et al. 2020): ``B`` for pure noise,
    1 for identical per-example gradients. Negative estimates count as 0; with neither, ``B``.
    Formed on the estimates' device, with no value sent to the host.
    """
    noise, signal = noise.clamp(min=0), signal.clamp(min=0)
    total = noise + signal
    ratio = batch_size * total / (noise + batch_size * signal)
    return torch.where(total == 0, torch.full_like(ratio, batch_size), ratio)


def _decay(
    params: Tensors, *, lr: float, step_scale: float, weight_decay: float, foreach: bool
) -> None:
    """``Φ ← Φ − S·lr·λ·Φ``, decoupled weight decay, in place; nothing with ``λ = 0``."""
    if not weight_decay:
        return
    if foreach:
        torch._foreach_mul_(params, 1 - step_scale * lr * weight_decay)
        return
    for param in params:
        param.mul_(1 - step_scale * lr * weight_decay)


def _average(averages: Tensors, inputs: Tensors, weight: float, foreach: bool) -> None:
    """``x ← (1 − w)·x + w·y`` in place, for each running average ``x`` and its input ``y``."""
    if foreach:
        torch._foreach_lerp_(averages, inputs, weight)
        return
    for average, value in zip(averages, inputs):
        average.lerp_(value, weight)


def sgd(
    params: Tensors,
    grads: Tensors,
    exp_avgs: Tensors,
    *,
    lr: float,
    step_scale: float,
    grad_weight: float,
    weight_decay: float,
    foreach: bool = False,
) -> None:
    """SGD with momentum as a running average, in place, ``S`` = ``step_scale``::

        Φ ← Φ − S·lr·λ·Φ
        m ← (1 − w_g)·m + w_g·ĝ
        Φ ← Φ − S·lr·m

    With ``N_g⁰ = 1`` and ``S = B``, ``m = ĝ`` and this is vanilla SGD, ``Φ −= lr · Σ_b g_b``.
    """
    _decay(params, lr=lr, step_scale=step_scale, weight_decay=weight_decay, foreach=foreach)
    _average(exp_avgs, grads, grad_weight, foreach)
    if foreach:
        torch._foreach_add_(params, exp_avgs, alpha=-step_scale * lr)
        return
    for param, exp_avg in zip(params, exp_avgs):
        param.add_(exp_avg, alpha=-step_scale * lr)


def adam(
    params: Tensors,
    grads: Tensors,
    sq_inputs: Tensors,
    exp_avgs: Tensors,
    exp_avg_sqs: Tensors,
    *,
    lr: float,
    step_scale: float,
    grad_weight: float,
    sq_weight: float,
    eps: float,
    weight_decay: float,
    foreach: bool = False,
) -> None:
    """Adam, in place, ``S`` = ``step_scale``; ``sq_inputs`` are ``q`` (or ``ĝ²``)::

        Φ ← Φ − S·lr·λ·Φ                       (decoupled, as AdamW)
        m ← (1 − w_g)·m + w_g·ĝ
        s ← (1 − w_s)·s + w_s·q
        Φ ← Φ − S·lr·m / (√s + ε)

    ``w = min(1, B / min(n, N⁰))`` is also the bias correction, or :func:`exponential_weight`,
    Adam's (Kingma and Ba 2015).
    """
    _decay(params, lr=lr, step_scale=step_scale, weight_decay=weight_decay, foreach=foreach)
    _average(exp_avgs, grads, grad_weight, foreach)
    _average(exp_avg_sqs, sq_inputs, sq_weight, foreach)
    if foreach:
        denominators = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_add_(denominators, eps)
        torch._foreach_addcdiv_(params, exp_avgs, denominators, value=-step_scale * lr)
        return
    for param, exp_avg, exp_avg_sq in zip(params, exp_avgs, exp_avg_sqs):
        param.addcdiv_(exp_avg, exp_avg_sq.sqrt().add_(eps), value=-step_scale * lr)


def rmsprop(
    params: Tensors,
    grads: Tensors,
    sq_inputs: Tensors,
    exp_avgs: Tensors,
    exp_avg_sqs: Tensors,
    grad_avgs: Tensors | None,
    *,
    lr: float,
    step_scale: float,
    grad_weight: float,
    sq_weight: float,
    eps: float,
    power: float,
    weight_decay: float,
    foreach: bool = False,
) -> None:
    """RMSProp, in place, ``S`` = ``step_scale``; ``sq_inputs`` are ``q`` (or ``ĝ²``)::

    Φ ← Φ − S·lr·λ·Φ
    m ← (1 − w_g)·m + w_g·ĝ                 (m = ĝ with grad_horizon = 1)
    s ← (1 − w_s)·s + w_s·q
    a ← (1 − w_s)·a + w_s·ĝ;  s' = s − a²   (centered: ``grad_avgs`` are a; else s' = s)
    Φ ← Φ − S·lr·m / (s'^power + ε)         (power = ½ is RMSProp)
    """
    _decay(params, lr=lr, step_scale=step_scale, weight_decay=weight_decay, foreach=foreach)
    _average(exp_avgs, grads, grad_weight, foreach)
    _average(exp_avg_sqs, sq_inputs, sq_weight, foreach)
    if grad_avgs is not None:
        _average(grad_avgs, grads, sq_weight, foreach)
    if foreach:
        spreads = exp_avg_sqs
        if grad_avgs is not None:
            spreads = torch._foreach_sub(exp_avg_sqs, torch._foreach_mul(grad_avgs, grad_avgs))
            torch._foreach_clamp_min_(spreads, 0)
        if power == 0.5:
            denominators = torch._foreach_sqrt(spreads)
        else:
            denominators = torch._foreach_pow(spreads, power)
        torch._foreach_add_(denominators, eps)
        torch._foreach_addcdiv_(params, exp_avgs, denominators, value=-step_scale * lr)
        return
    for i, (param, exp_avg, exp_avg_sq) in enumerate(zip(params, exp_avgs, exp_avg_sqs)):
        spread = exp_avg_sq
        if grad_avgs is not None:
            spread = (exp_avg_sq - grad_avgs[i].mul(grad_avgs[i])).clamp_min_(0)
        denominator = spread.sqrt() if power == 0.5 else spread.pow(power)
        param.addcdiv_(exp_avg, denominator.add_(eps), value=-step_scale * lr)
