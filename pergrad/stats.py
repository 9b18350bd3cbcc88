"""Sufficient statistics of per-example gradients, kept beside ``p.grad`` on each parameter.

For the ``n`` examples seen since the statistics were last cleared, a trainable parameter
``p`` holds

- ``p.grad``: the mean gradient ``ĝ = (1/n) Σ_b g_b`` (what ``loss.mean().backward()`` gives);
- ``p.grad_stats``: a :class:`GradStats` with the count ``n`` and the mean of squares
  ``q = (1/n) Σ_b g_b²`` (element-wise).

Both are means over every example seen, so accumulating two halves of a batch gives the
statistics of the whole batch. :func:`zero_grad` (or an ``optim`` optimizer's ``zero_grad``)
clears both.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

from pergrad.checks import InputError, finite, is_positive_int, non_negative_number
from pergrad.reduce import Moments

ATTRIBUTE = "grad_stats"
"""The name of the attribute that holds a parameter's :class:`GradStats`."""


@dataclass
class GradStats:
    """Per-example statistics of one parameter's gradient; its mean is ``p.grad``.

    Attributes:
        count: ``n``, the number of examples seen.
        sq_mean: ``q = (1/n) Σ_b g_b²``, the mean of the squared per-example gradients.
    """

    count: int
    sq_mean: Tensor
    _grad: Tensor | None = field(default=None, repr=False, compare=False)
    _version: int = field(default=-1, repr=False, compare=False)

    def belongs_to(self, grad: Tensor | None) -> bool:
        """Whether ``grad`` is the ``.grad`` these statistics were formed with, unchanged since
        (always true for statistics built by hand)."""
        return self._grad is None or (grad is self._grad and grad._version == self._version)

    def _seal(self, grad: Tensor) -> None:
        """Remember ``grad`` as it is now, the ``.grad`` these statistics go with."""
        self._grad, self._version = grad, grad._version

    def variance(self, mean: Tensor) -> Tensor:
        """The per-example variance ``q − ĝ²`` (clamped at 0), given the mean ``ĝ = p.grad``."""
        return (self.sq_mean - mean.square()).clamp_(min=0)


def grad_stats(param: Tensor) -> GradStats | None:
    """The :class:`GradStats` that ``pergrad`` left on ``param``, or ``None``."""
    return getattr(param, ATTRIBUTE, None)


@dataclass
class Sums:
    """The sufficient statistics of a set of examples, as sums: the count ``n``, the
    per-example losses, and per parameter ``Σ_b g_b`` and ``Σ_b g_b²``.

    Sums of two sets of examples add (:meth:`add`, a chunk at a time); summed over
    data-parallel workers they are the global batch's (:meth:`all_reduce`); merged into the
    parameters they become the means ``p.grad`` and ``p.grad_stats`` (:meth:`merge_into`).
    """

    params: dict[str, Tensor]
    count: int = 0
    loss_sum: Tensor | None = None
    grad: dict[str, Tensor] = field(default_factory=dict)
    sq: dict[str, Tensor] = field(default_factory=dict)
    losses: list[Tensor] = field(default_factory=list)

    def add(self, moments: dict[str, Moments], losses: Tensor) -> None:
        """Add a chunk of examples: its moments (tensors nothing else holds, which the first
        chunk's become and later chunks add into) and its per-example losses."""
        for name, (grad_sum, sq_sum) in moments.items():
            if name in self.grad:
                self.grad[name] += grad_sum
                self.sq[name] += sq_sum
            else:
                self.grad[name], self.sq[name] = grad_sum, sq_sum
        self.losses.append(losses)
        self.count += len(losses)

    @property
    def last_losses(self) -> Tensor:
        """The per-example losses added here (on this worker), in order."""
        if not self.losses:
            first = next(iter(self.params.values()))
            return torch.zeros(0, dtype=first.dtype, device=first.device)
        return self.losses[0] if len(self.losses) == 1 else torch.cat(self.losses)

    @property
    def mean_loss(self) -> Tensor:
        """``(1/n) Σ_b ℓ_b``: over every worker's examples once :meth:`all_reduce` has run."""
        losses = self.last_losses
        if self.loss_sum is None:
            return torch.mean(losses)
        return (self.loss_sum / self.count).to(losses.dtype)

    def all_reduce(self, group: object, failed: bool = False, dtypes: dict | None = None) -> int:
        """Sum over the ``torch.distributed`` group, in place, so that every worker holds the
        global batch's sums, whatever its share of it (none included): one flattened
        all-reduce per dtype, each parameter's sums in ``dtypes[name]`` where given (FSDP2's
        ``reduce_dtype``), else in its own dtype. The count and the loss travel in float64,
        exact for any count below 2⁵³ whatever the gradients' dtype, and with them whether
        this worker ``failed``.

        Returns:
            How many other workers failed.
        """
        for name, p in self.params.items():  # an empty share: zeros
            if name not in self.grad:
                self.grad[name], self.sq[name] = torch.zeros_like(p), torch.zeros_like(p)
        losses = self.last_losses
        tally = torch.tensor(
            [self.count, float(losses.double().sum()), float(failed)], dtype=torch.float64
        )
        buckets: dict[tuple, list[tuple[dict, str]]] = defaultdict(list)
        for sums in (self.grad, self.sq):
            for name, p in self.params.items():  # one order and dtype on every worker
                dtype = (dtypes or {}).get(name, p.dtype)
                sums[name] = sums[name].to(dtype)  # formed in float32 where layers ran in half
                buckets[(dtype, p.device)].append((sums, name))
        carrier = (torch.float64, next(iter(buckets))[1])  # the count and the loss ride here
        buckets.setdefault(carrier, [])
        for key, entries in buckets.items():
            parts = [sums[name].reshape(-1) for sums, name in entries]
            if key == carrier:
                parts.append(tally.to(carrier[1]))
            flat = torch.cat(parts)
            dist.all_reduce(flat, group=group)
            offset = 0
            for sums, name in entries:  # back into their own tensors: no two share storage
                size = sums[name].numel()
                sums[name].copy_(flat[offset : offset + size].view_as(sums[name]))
                offset += size
            if key == carrier:
                tally = flat[offset:]
        count, self.loss_sum, failures = tally  # the loss float64 until divided (float16 overflows)
        self.count = int(count.round().item())
        return int(failures.round().item()) - failed

    def check_finite(self) -> None:
        """Raise ``FloatingPointError`` naming the parameters whose sum of squares is not
        finite (a NaN or an infinity in any ``g_b`` makes it so)."""
        finite(self.sq, "sum of squared per-example gradients")

    def merge_into(self) -> None:
        """Merge into each parameter's ``.grad`` and ``.grad_stats``:
        ``mean ← (n·mean + Σ) / (n + count)``; the sums are tensors nothing else holds,
        which it may take over. Nothing changes if any parameter is refused.

        Raises:
            InputError: a parameter has a ``.grad`` that ``pergrad`` did not compute, or that
                changed since it did.
        """
        check_unchanged(self.params)
        # no statistics yet, or statistics without a .grad (cleared)
        first_merge = {n for n, p in self.params.items() if p.grad is None or grad_stats(p) is None}
        if first_merge:  # the sums become the means, divided in place in one multi-tensor kernel
            torch._foreach_div_(
                [*(self.grad[n] for n in first_merge), *(self.sq[n] for n in first_merge)],
                self.count,
            )
        for name, p in self.params.items():
            if name in first_merge:
                grad, sq = self.grad[name], self.sq[name]
                if grad.dtype != p.dtype:  # summed in float32 where the layers ran in half
                    grad, sq = grad.to(p.dtype), sq.to(p.dtype)
                p.grad = grad
                stats = GradStats(self.count, sq)
                setattr(p, ATTRIBUTE, stats)
            else:
                stats = grad_stats(p)
                total = stats.count + self.count
                p.grad.mul_(stats.count / total).add_(self.grad[name], alpha=1 / total)
                stats.sq_mean.mul_(stats.count / total).add_(self.sq[name], alpha=1 / total)
                stats.count = total
            stats._seal(p.grad)


def check_unchanged(params: dict[str, Tensor]) -> None:
    """Raise unless every parameter's ``.grad`` is either absent or the one ``pergrad``
    computed, unchanged since, with well-formed statistics.

    Raises:
        InputError: naming the parameters whose ``.grad`` has no statistics or was changed, or
            whose statistics are not a count and a tensor shaped like the parameter.
    """
    foreign, changed, malformed = [], [], {}
    for n, p in params.items():
        if p.grad is None:
            continue
        stats = grad_stats(p)
        if stats is None:
            foreign.append(n)
        elif why := _malformed(p):
            malformed[n] = why
        elif not stats.belongs_to(p.grad):
            changed.append(n)
    if malformed:
        listed = "; ".join(f"{n}: {why}" for n, why in malformed.items())
        raise InputError(
            f"the per-example statistics of parameter(s) {listed}. Let PerExample.backward "
            f"compute them, or build GradStats(count, sq_mean) with an int count >= 1 and "
            f"sq_mean shaped like its parameter, in its dtype and on its device."
        )
    if foreign:
        raise InputError(
            f"parameter(s) {', '.join(foreign)} already have a .grad that pergrad did not "
            f"compute (from loss.backward() or zero_grad(set_to_none=False)), so their "
            f"per-example statistics are unknown. Clear them first: optimizer.zero_grad() or "
            f"pergrad.zero_grad(model.parameters())."
        )
    if changed:
        raise InputError(
            f"the .grad of parameter(s) {', '.join(changed)} changed after pergrad computed it "
            f"(a loss.backward() adds into it; torch.nn.utils.clip_grad_norm_ scales it), so "
            f"it no longer matches its per-example statistics. Clear it with "
            f"optimizer.zero_grad() or pergrad.zero_grad(model.parameters()) and recompute with "
            f"PerExample.backward; to clip, use pergrad.clip_grad_norm_, which scales the "
            f"statistics too."
        )


def _malformed(p: Tensor) -> str | None:
    """Why ``p.grad_stats`` cannot go with ``p``, or ``None``."""
    stats = grad_stats(p)
    if not isinstance(stats, GradStats):
        return f"grad_stats is a {type(stats).__name__}, not a GradStats"
    count, sq_mean = stats.count, stats.sq_mean
    if not is_positive_int(count):
        return f"count is {count!r}"
    if not isinstance(sq_mean, Tensor):
        return f"sq_mean is a {type(sq_mean).__name__}"
    for what in ("shape", "dtype", "device"):
        if getattr(sq_mean, what) != getattr(p, what):
            return f"sq_mean has {what} {getattr(sq_mean, what)}, the parameter {getattr(p, what)}"
    return None


def parameters(params: Tensor | Iterable[Tensor], where: str) -> list[Tensor]:
    """``params`` as a list of tensors (one tensor is a list of one, as in ``torch.nn.utils``).

    Raises:
        TypeError: ``params`` is a module, or holds something other than tensors.
    """
    if isinstance(params, Tensor):
        return [params]
    if isinstance(params, torch.nn.Module):
        raise TypeError(
            f"{where} takes parameters, not a {type(params).__name__}: pass model.parameters()"
        )
    found = list(params)
    for p in found:
        if not isinstance(p, Tensor):
            raise TypeError(
                f"{where} takes tensors, got a {type(p).__name__} among them: pass "
                f"model.parameters()"
            )
    return found


def zero_grad(params: Tensor | Iterable[Tensor]) -> None:
    """Clear ``p.grad`` and the per-example statistics of every parameter in ``params``.

    Raises:
        TypeError: ``params`` is a module or holds something other than tensors.
    """
    for p in parameters(params, "zero_grad"):
        p.grad = None
        if hasattr(p, ATTRIBUTE):
            delattr(p, ATTRIBUTE)


@torch.no_grad()
def clip_grad_norm_(params: Tensor | Iterable[Tensor], max_norm: float) -> Tensor:
    """Scale the mean gradients to a total 2-norm of at most ``max_norm``, and their statistics
    with them: as if every per-example gradient were scaled by the same factor ``c``,
    ``p.grad ← c·p.grad`` and ``sq_mean ← c²·sq_mean`` (``c = min(1, max_norm / ‖ĝ‖)``).

    ``torch.nn.utils.clip_grad_norm_`` scales ``p.grad`` alone, which pergrad then refuses:
    the statistics would no longer go with it.

    Returns:
        The total norm of the mean gradients before clipping.

    Raises:
        ValueError: ``max_norm`` is negative or not a number.
        TypeError: ``params`` is a module or holds something other than tensors.
        InputError: a ``.grad`` has no statistics or changed after pergrad computed it.
    """
    non_negative_number("max_norm", max_norm, "pass a number >= 0 (inf: no clipping)")
    params = parameters(params, "clip_grad_norm_")
    owned = {f"#{i} (shape {tuple(p.shape)})": p for i, p in enumerate(params)}
    owned = {name: p for name, p in owned.items() if p.grad is not None}
    check_unchanged(owned)
    if not owned:
        return torch.zeros(())
    norms = torch.stack([p.grad.detach().float().norm() for p in owned.values()])
    total = norms.norm()
    factor = float((max_norm / (total + 1e-6)).clamp(max=1.0))
    for p in owned.values():
        stats = grad_stats(p)
        p.grad.mul_(factor)
        stats.sq_mean.mul_(factor**2)
        stats._seal(p.grad)
    return total
