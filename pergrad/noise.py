"""The gradient noise scale, from the statistics ``backward`` leaves.

For ``n`` examples with per-example gradients ``g_b`` of mean ``G`` and covariance ``Σ``, in
a metric that weighs coordinate ``i`` by ``w_i`` (1 unless a diagonal preconditioner is
given), the two statistics pergrad keeps have the expectations

    E[Σ_i w_i q_i]  = |G|²_w + tr_w Σ          (q = mean_b g_b², the mean of squares)
    E[Σ_i w_i ĝ_i²] = |G|²_w + tr_w Σ / n      (ĝ = mean_b g_b, p.grad)

so, with ``S = Σ w q`` and ``M = Σ w ĝ²``, unbiased one-batch estimates are

    noise  = (S − M) · n / (n − 1)             of tr_w Σ
    signal = (n·M − S) / (n − 1)               of |G|²_w

and the critical batch size ``B_simple = noise / signal`` (McCandlish et al. 2018, "An
Empirical Model of Large-Batch Training"): batches much smaller than it are noise-dominated
(a batch of ``B`` is worth ``B`` single-example steps), much larger ones signal-dominated
(worth about one).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from pergrad.stats import grad_stats, parameters


@dataclass(frozen=True)
class NoiseScale:
    """One batch's estimates of the gradient noise and signal (see :mod:`pergrad.noise`).

    Attributes:
        noise: the unbiased estimate of ``tr Σ``, the per-example gradient variance.
        signal: the unbiased estimate of ``|G|²``, the squared norm of the mean gradient;
            it can come out negative when the noise dominates.
        count: ``n``, the examples the statistics cover.
    """

    noise: float
    signal: float
    count: int

    @property
    def critical_batch(self) -> float:
        """``B_simple = noise / signal``; infinite where the signal estimate is not positive."""
        return self.noise / self.signal if self.signal > 0 else float("inf")


def sums(grad: Tensor, sq_mean: Tensor, weight: Tensor | None = None) -> Tensor:
    """``[S, M] = [Σ w q, Σ w ĝ²]`` of one parameter (``w = 1`` where ``weight`` is None): a
    float64 tensor on its device, so that no value travels to the host per parameter."""
    squares = grad.square()
    if weight is not None:
        sq_mean, squares = weight * sq_mean, weight * squares
    total = torch.stack([sq_mean.sum(), squares.sum()]).double()
    if hasattr(total, "full_tensor"):  # a DTensor of partial sums (FSDP2): summed over ranks
        total = total.full_tensor()
    return total


def estimates(count: int, s: Tensor, m: Tensor) -> tuple[Tensor, Tensor]:
    """``(noise, signal)`` from ``S``, ``M`` and the example count ``n ≥ 2``."""
    return (s - m) * count / (count - 1), (count * m - s) / (count - 1)


def noise_scale(
    params: Iterable[Tensor], preconditioner: Sequence[Tensor] | None = None
) -> NoiseScale:
    """The gradient noise scale of the statistics that ``backward`` left on ``params``.

    Args:
        params: parameters with ``p.grad`` and ``p.grad_stats`` (others are skipped).
        preconditioner: optional, one tensor per parameter of ``params`` (in order, shaped
            like it): the weight of each coordinate, e.g. Adam's ``1 / (√s + ε)``, to measure
            the noise and signal in the metric the optimizer steps in.

    Raises:
        TypeError: ``params`` is a module or holds something other than tensors.
        ValueError: no parameter has statistics, they cover fewer than two examples or
            different counts, or ``preconditioner`` does not match ``params``.

    Example:
        >>> engine.backward(x, y)
        >>> pergrad.noise_scale(model.parameters()).critical_batch
    """
    params = parameters(params, "noise_scale")
    if isinstance(preconditioner, Tensor):
        raise ValueError(
            "preconditioner is one tensor: give a list of tensors, one per parameter, shaped "
            "like it (e.g. [1 / (s.sqrt() + eps) for s in second_moments])"
        )
    weights = [None] * len(params) if preconditioner is None else list(preconditioner)
    if len(weights) != len(params):
        raise ValueError(
            f"preconditioner has {len(weights)} tensors for {len(params)} parameters: give one "
            f"per parameter, in the same order"
        )
    totals: list[Tensor] = []
    counts = set()
    for p, weight in zip(params, weights):
        stats = grad_stats(p)
        if p.grad is None or stats is None:
            continue
        if weight is not None and (not isinstance(weight, Tensor) or weight.shape != p.shape):
            shape = getattr(weight, "shape", type(weight).__name__)
            raise ValueError(
                f"preconditioner entry of shape {shape} for a parameter of shape "
                f"{tuple(p.shape)}: each must be a tensor shaped like its parameter"
            )
        counts.add(stats.count)
        with torch.no_grad():
            here = sums(p.grad, stats.sq_mean, weight)
            totals.append(here.to(totals[0].device) if totals else here)
    if not counts:
        raise ValueError(
            "no parameter has per-example statistics: call PerExample.backward(inputs, target) "
            "first"
        )
    if len(counts) > 1:
        raise ValueError(f"the parameters' statistics cover different counts {sorted(counts)}")
    (count,) = counts
    if count < 2:
        raise ValueError("the noise scale needs statistics of at least two examples (B ≥ 2)")
    total_s, total_m = torch.stack(totals).sum(0).tolist()  # the one value sent to the host
    return NoiseScale(*estimates(count, total_s, total_m), count)
