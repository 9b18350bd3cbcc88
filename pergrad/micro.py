"""Statistics from micro-batch gradients, for any model: plain autograd, no per-example work.

A batch of ``n = K·m`` examples runs as ``K`` micro-batches of ``m``; each gives its mean
gradient ``ĝ_k = (1/m) Σ_{b∈k} g_b``. Their mean is the batch's, and

    q̂ = mean_k ĝ_k² + (m − 1)·Var_k(ĝ_k)      (Var with K − 1 in the denominator)

estimates ``mean_b g_b²`` without bias when the examples are exchangeable (a batch drawn at
random, split at random): ``E ĝ_k² = μ² + σ²/m`` and ``E Var_k(ĝ_k) = σ²/m``, so
``E q̂ = μ² + σ²`` (docs/MATH.md, "Micro-batch statistics"). With ``m = 1`` it is
``mean_b g_b²`` exactly. Each micro-batch is a plain forward and backward pass, so a model
pergrad refuses per example (``BatchNorm`` in training mode, which normalizes over the
micro-batch as gradient accumulation does) works too; under data parallelism every rank's
micro-batches count, summed as ``PerExample``'s are (one all-reduce per dtype).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from pergrad import checks, distributed, stats, wrappers
from pergrad import inputs as batch
from pergrad.inputs import Inputs


class MicroBatches:
    """Leaves ``p.grad`` (the batch mean) and ``p.grad_stats`` (``n`` and an estimate of
    ``mean_b g_b²``) from micro-batches of ``size`` examples, as
    :meth:`pergrad.PerExample.backward` leaves them from per-example gradients; ``optim``'s
    optimizers take them unchanged.

    Args:
        model: any ``nn.Module`` (a ``DistributedDataParallel`` or ``torch.compile`` wrapper
            is taken off; its process group is used).
        loss_fn: ``loss_fn(output, target)`` returning one loss per example, shape ``(B,)``.
        size: ``m``, the examples per micro-batch; every batch must hold a multiple of it,
            and at least two micro-batches in all where ``m > 1``.
        process_group: sum over these data-parallel ranks (each rank's micro-batches
            count alike).

    Example:
        >>> micro = pergrad.MicroBatches(model, nn.CrossEntropyLoss(reduction="none"), size=4)
        >>> loss = micro.backward(x, y)   # p.grad, p.grad_stats as PerExample.backward leaves
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Tensor, Tensor], Tensor],
        *,
        size: int,
        process_group: object | None = None,
    ):
        checks.model_and_loss(model, loss_fn)
        checks.positive_int("size", size, "pass the examples per micro-batch, >= 1")
        if process_group is not None:
            distributed.check_initialized(process_group)
        unwrapped = wrappers.unwrap(model)
        self.model = model
        self.loss_fn = loss_fn
        self.size = size
        self.process_group = wrappers.check_group(process_group, unwrapped.process_group)
        self._module = unwrapped.module
        self._ranks_checked = False

    def backward(self, inputs: Inputs, target: Tensor) -> Tensor:
        """Accumulate the batch mean into ``p.grad`` and ``(n, q̂)`` into ``p.grad_stats``
        for every trainable parameter, and return the mean loss. Calling it again before the
        statistics are cleared accumulates, as :meth:`PerExample.backward` does.

        Raises:
            InputError: the batch is not a multiple of ``size``, or (``size > 1``) holds one
                micro-batch in all, which leaves the spread between them unknown.
            FloatingPointError: a statistic is NaN or infinite; nothing is accumulated.
        """
        grouped = self.process_group is not None
        params = checks.trainable(self._module)
        sums = distributed.gathered(
            lambda: self._micro_batches(inputs, target, params, allow_empty=grouped),
            self.process_group,
            self._ranks_checked,
            lambda: params,
        )
        self._ranks_checked = grouped
        self._estimate(sums)
        sums.check_finite()
        sums.merge_into()
        return sums.mean_loss

    def zero_grad(self) -> None:
        """Clear ``.grad`` and the statistics of every parameter of the model."""
        stats.zero_grad(self.model.parameters())

    def _micro_batches(self, inputs, target, params, allow_empty: bool) -> stats.Sums:
        """``Σ_b g_b`` (``m·Σ_k ĝ_k``) and, for now, ``Σ_k ĝ_k²`` per parameter, and the
        losses, over this rank's micro-batches."""
        inputs, total = checks.batch(inputs, target, allow_empty)
        if total % self.size:
            raise checks.InputError(
                f"a batch of {total} examples does not split into micro-batches of size="
                f"{self.size}: pass a batch whose size is a multiple of it"
            )
        sums = stats.Sums(params)
        names, tensors = list(params), list(params.values())
        for start in range(0, total, self.size):
            part = slice(start, start + self.size)
            with torch.enable_grad():
                output = batch.run(self._module, batch.rows(inputs, part))
                losses = checks.per_example_loss(self.loss_fn(output, target[part]), self.size)
                found = torch.autograd.grad(losses.mean(), tensors, allow_unused=True)
            means = [torch.zeros_like(p) if g is None else g for p, g in zip(tensors, found)]
            sums.add(
                {n: (g * self.size, g.square()) for n, g in zip(names, means)}, losses.detach()
            )
        return sums

    def _estimate(self, sums: stats.Sums) -> None:
        """Turn each ``Σ_k ĝ_k²`` into ``n·q̂``.

        Raises:
            InputError: one micro-batch in all, with ``size > 1``.
        """
        m, count = self.size, sums.count // self.size
        if m > 1 and count < 2:
            raise checks.InputError(
                f"the batch holds {sums.count} examples, one micro-batch of size={m}: the "
                f"spread between micro-batches needs two or more. Pass a larger batch or a "
                f"smaller size"
            )
        for name, squares in sums.sq.items():
            means = sums.grad[name] / sums.count  # mean_k ĝ_k
            estimate = squares / count
            if m > 1:  # + (m − 1)·Var_k(ĝ_k)
                spread = (squares - count * means.square()) / (count - 1)
                estimate = estimate + (m - 1) * spread
            sums.sq[name] = estimate.clamp_(min=0) * sums.count  # rounding may dip below
