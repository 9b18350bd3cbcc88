"""MATH.md's update rules transcribed literally, one scalar formula per line: the reference
the optimizers are tested against. Feeds per-example gradients ``G`` of shape ``(B, P)``."""

from __future__ import annotations

import torch
from torch import Tensor

import pergrad


def feed(param: Tensor, per_example: Tensor) -> None:
    """Leave on ``param`` what ``pergrad`` would for per-example gradients ``per_example``."""
    pergrad.zero_grad([param])
    param.grad = per_example.mean(0)
    param.grad_stats = pergrad.GradStats(len(per_example), per_example.square().mean(0))


def run(kind: str, phi: Tensor, stream: list[Tensor], **h) -> Tensor:
    """Φ after the steps of MATH.md on ``stream``, for ``kind`` in sgd / rmsprop / adam."""
    lr = h["lr"]
    n_g = h.get("grad_horizon", 1 if kind != "adam" else 320)
    n_s = h.get("sq_horizon", 1000 if kind == "rmsprop" else 32_000)
    eps, lam = h.get("eps", 1e-8), h.get("weight_decay", 0.0)
    power, centered = h.get("power", 0.5), h.get("centered", False)
    example = h.get("second_moment", "example") == "example"
    N = h.get("second_moment_batch", 1)  # s averages E[ĝ²] at batch size N
    gain = h.get("batch_scaling", "linear") == "gain"
    sqrt = h.get("batch_scaling", "linear") == "sqrt"  # √B·lr, ε/√B
    n_r = h.get("gain_horizon", 1000)
    exponential = h.get("bias_correction", "uniform") == "exponential"
    phi = phi.clone()
    m = s = a = torch.zeros_like(phi)
    n = k = 0
    c_g = c_s = 0.0  # exponential: the averages' share of weight held by data
    noise = signal = 0.0
    for G in stream:
        B = G.shape[0]
        n = n + B
        g_hat = G.sum(0) / B
        q_example = (G * G).sum(0) / B
        q = q_example if example else g_hat * g_hat
        if example and N != 1:
            variance = (q_example - g_hat * g_hat) * B / (B - 1)  # unbiased σ²
            q = g_hat * g_hat - variance / B + variance / N
            if B < N:
                q = torch.maximum(q, q_example / N)  # μ² + σ²/N ≥ (μ² + σ²)/N
        w_g = min(1, B / min(n, n_g))
        w_s = min(1, B / min(n, n_s))
        if exponential:  # Adam's bias correction, 1 − β = B/N⁰; N⁰ = ∞: the exact mean
            a_g, a_s = min(1, B / n_g), min(1, B / n_s)
            c_g = (1 - a_g) * c_g + a_g
            c_s = (1 - a_s) * c_s + a_s
            w_g = a_g / c_g if a_g > 0 else B / n
            w_s = a_s / c_s if a_s > 0 else B / n
        m = (1 - w_g) * m + w_g * g_hat
        if kind != "sgd":
            s = (1 - w_s) * s + w_s * q
            a = (1 - w_s) * a + w_s * g_hat
        spread = s - a * a if centered else s
        r = B
        if gain:
            if B > 1:
                k = k + B
                w_r = min(1, B / min(k, n_r))
                metric = 1 if kind == "sgd" else 1 / (spread.clamp(min=0) ** power + eps)
                noise_now = (metric * (q_example - g_hat * g_hat)).sum() * B / (B - 1)
                signal_now = (metric * (B * g_hat * g_hat - q_example)).sum() / (B - 1)
                noise = (1 - w_r) * noise + w_r * float(noise_now)
                signal = (1 - w_r) * signal + w_r * float(signal_now)
            sigma2, g2 = max(noise, 0.0), max(signal, 0.0)
            r = B if sigma2 + g2 == 0 else B * (sigma2 + g2) / (sigma2 + B * g2)
        e = eps
        if sqrt:
            r = B**0.5
            e = eps / B**0.5
        phi = phi - r * lr * lam * phi
        if kind == "sgd":
            phi = phi - r * lr * m
        else:
            phi = phi - r * lr * m / (spread**power + e)
    return phi
