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
    phi = phi.clone()
    m = s = a = torch.zeros_like(phi)
    n = 0
    for G in stream:
        B = G.shape[0]
        n = n + B
        g_hat = G.sum(0) / B
        q = (G * G).sum(0) / B if example else g_hat * g_hat
        w_g = min(1, B / min(n, n_g))
        w_s = min(1, B / min(n, n_s))
        phi = phi - B * lr * lam * phi
        m = (1 - w_g) * m + w_g * g_hat
        if kind == "sgd":
            phi = phi - B * lr * m
            continue
        s = (1 - w_s) * s + w_s * q
        a = (1 - w_s) * a + w_s * g_hat
        spread = s - a * a if centered else s
        phi = phi - B * lr * m / (spread**power + eps)
    return phi
