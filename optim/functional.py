"""The update rules of MATH.md as plain functions, one per optimizer, on one tensor each.

Notation: ``B`` examples in this step (or, with ``batch_scaling="gain"``, the gain ratio in
its place where the step is scaled), ``n`` examples seen so far (this step included),
``ĝ = mean_b g_b`` (``p.grad``), ``q = mean_b g_b²`` (or ``ĝ²`` for the standard second
moment), per-example horizons ``N⁰`` counted in examples.
"""

from __future__ import annotations

from torch import Tensor


def average_weight(batch_size: int, seen: int, horizon: float) -> float:
    """``w = min(1, B / min(n, N⁰))``: the weight of this batch in a running average.

    While ``n < N⁰`` it is the exact mean of everything seen (no bias toward the zero start);
    after, a moving average over ``N⁰ / B`` steps; ``w = 1`` whenever ``B ≥ N⁰``.
    """
    return min(1.0, batch_size / min(seen, horizon))


def gain_ratio(batch_size: int, noise: float, signal: float) -> float:
    """``r = B(σ² + |G|²) / (σ² + B|G|²)``, the number of single-example steps a batch of ``B``
    is worth (McCandlish et al. 2018; AdaScale, Johnson et al. 2020): ``B`` for pure noise,
    1 for identical per-example gradients. Negative estimates count as 0; with neither, ``B``.
    """
    noise, signal = max(noise, 0.0), max(signal, 0.0)
    if noise + signal == 0:
        return float(batch_size)
    return batch_size * (noise + signal) / (noise + batch_size * signal)


def sgd(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    *,
    lr: float,
    examples: float,
    grad_weight: float,
    weight_decay: float,
) -> None:
    """SGD with momentum as a running average, in place, ``B`` = ``examples``::

        Φ ← Φ − B·lr·λ·Φ
        m ← (1 − w_g)·m + w_g·ĝ
        Φ ← Φ − B·lr·m

    With ``N_g⁰ = 1``, ``m = ĝ`` and this is vanilla SGD, ``Φ −= lr · Σ_b g_b``.
    """
    if weight_decay:
        param.mul_(1 - examples * lr * weight_decay)
    exp_avg.lerp_(grad, grad_weight)
    param.add_(exp_avg, alpha=-examples * lr)


def adaptive(
    param: Tensor,
    grad: Tensor,
    second: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    grad_avg: Tensor | None,
    *,
    lr: float,
    examples: float,
    grad_weight: float,
    sq_weight: float,
    eps: float,
    power: float,
    weight_decay: float,
) -> None:
    """RMSProp and Adam, in place, ``B`` = ``examples``::

        Φ ← Φ − B·lr·λ·Φ
        m ← (1 − w_g)·m + w_g·ĝ
        s ← (1 − w_s)·s + w_s·q                 (q = mean_b g_b², or ĝ² for the standard form)
        a ← (1 − w_s)·a + w_s·ĝ;  s' = s − a²   (centered only; else s' = s)
        Φ ← Φ − B·lr·m / (s'^power + ε)         (power = ½ is RMSProp and Adam)

    ``second`` is ``q``. ``grad_avg`` is ``a``, or ``None`` when not centered.
    """
    if weight_decay:
        param.mul_(1 - examples * lr * weight_decay)
    exp_avg.lerp_(grad, grad_weight)
    exp_avg_sq.lerp_(second, sq_weight)
    spread = exp_avg_sq
    if grad_avg is not None:
        grad_avg.lerp_(grad, sq_weight)
        spread = (exp_avg_sq - grad_avg.square()).clamp_(min=0)
    denominator = (spread.sqrt() if power == 0.5 else spread.pow(power)).add_(eps)
    param.addcdiv_(exp_avg, denominator, value=-examples * lr)
