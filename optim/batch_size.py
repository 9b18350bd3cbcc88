"""Grow the batch with the critical batch size: a schedule that proposes each step's batch size
from the gradient noise scale, and a sampler that serves batches of the proposed size.

Training at ``B ≈ B_noise = tr Σ / |G|²`` costs about twice the fewest steps and twice the
fewest examples a fixed batch size could reach a loss with (McCandlish et al. 2018), and
``B_noise`` grows as the loss falls. With per-example hyperparameters nothing needs retuning
when ``B`` changes, and ``B_noise`` comes from one batch's per-example statistics.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch

import pergrad
import pergrad.noise
from optim import functional as F
from optim.base import PerExampleOptimizer, check_number
from pergrad.checks import positive_int


class BatchSizeSchedule:
    """Proposes the next batch size from the smoothed noise scale, measured in the
    optimizer's own metric; call :meth:`step` after each ``optimizer.step()``, as a learning
    rate scheduler, while the step's statistics are still on the parameters::

        noise  ← (1 − w)·noise  + w·(unbiased tr_w Σ of this batch)
        signal ← (1 − w)·signal + w·(unbiased |G|²_w of this batch)
        B_noise = noise / signal,    w = min(1, B / min(n, N))

    and the next size is ``B_noise`` clamped to ``[min_size, max_size]``, at most
    ``max_growth`` times the current size (or one example more), never below it
    (``B_noise`` grows as the loss falls; a dip in its estimate does not undo a step up),
    optionally rounded down to a power of two. While the signal estimate is not positive
    the size holds.

    Args:
        optimizer: an ``optim`` optimizer; its parameters' statistics are read, weighted by
            its metric (``1/(√s + ε)`` for Adam and RMSprop, 1 for SGD).
        min_size: the first batch size, and the smallest.
        max_size: the largest (what memory allows).
        max_growth: the largest factor from one step's size to the next, ``≥ 1`` (one example
            more is always allowed); with ``powers_of_two``, ``≥ 2``.
        horizon: ``N``, the examples the noise and signal estimates span.
        powers_of_two: round each proposal down to a power of two (``min_size`` must be one).
        process_group: under data parallelism, the group whose first rank's proposal every
            rank takes (one broadcast per step), so that no rank drifts.

    Example:
        >>> schedule = optim.BatchSizeSchedule(opt, min_size=8, max_size=512)
        >>> for x, y in loader:          # loader: a DataLoader with an AdaptiveBatchSampler
        ...     step(x, y)               # zero_grad, backward, opt.step()
        ...     schedule.step()          # schedule.size: the next batch's size
    """

    def __init__(
        self,
        optimizer: PerExampleOptimizer,
        *,
        min_size: int,
        max_size: int,
        max_growth: float = 2.0,
        horizon: float = 1000,
        powers_of_two: bool = False,
        process_group: object | None = None,
    ):
        if not isinstance(optimizer, PerExampleOptimizer):
            raise TypeError(
                f"optimizer must be an optim optimizer (optim.Adam, optim.SGD, ...), whose "
                f"steps leave pergrad's statistics to read; got {type(optimizer).__name__}"
            )
        for name, value in (("min_size", min_size), ("max_size", max_size)):
            positive_int(name, value, "pass an int >= 1 (examples)")
        if max_size < min_size:
            raise ValueError(
                f"Invalid max_size: {max_size!r} is below min_size={min_size!r}; pass "
                f"max_size >= min_size"
            )
        check_number("max_growth", max_growth, lambda v: 1 <= v < math.inf, "max_growth",
                     "a finite number >= 1")  # fmt: skip
        check_number("horizon", horizon, lambda v: v >= 1, "horizon",
                     ">= 1 (examples; inf: everything)")  # fmt: skip
        if not isinstance(powers_of_two, bool):
            raise TypeError(f"powers_of_two must be True or False, got {powers_of_two!r}")
        if powers_of_two and (max_growth < 2 or min_size & (min_size - 1)):
            raise ValueError(
                f"powers_of_two=True needs a power of two for min_size (got {min_size}) and "
                f"max_growth >= 2 (got {max_growth}), or the size could never grow"
            )
        self.optimizer = optimizer
        self.min_size, self.max_size = min_size, max_size
        self.max_growth, self.horizon = float(max_growth), float(horizon)
        self.powers_of_two = powers_of_two
        self.process_group = process_group
        self.size = min_size
        """The proposed size of the next batch."""
        self.seen = 0
        """Examples in the steps observed (batches of two or more)."""
        self.noise = 0.0
        """The smoothed estimate of ``tr_w Σ``."""
        self.signal = 0.0
        """The smoothed estimate of ``|G|²_w``."""

    @property
    def critical_batch(self) -> float:
        """``B_noise = noise / signal`` of the smoothed estimates; infinite while the signal
        estimate is not positive."""
        return self.noise / self.signal if self.signal > 0 else math.inf

    def step(self) -> int:
        """Read this step's statistics, update the estimates and return the next size (also
        :attr:`size`). A batch of one example has no spread: the estimates stay as they were.

        Raises:
            pergrad.InputError: no parameter of the optimizer has per-example statistics, or
                they cover different numbers of examples; nothing changes.
        """
        pairs = [
            (p, group)
            for group in self.optimizer.param_groups
            for p in group["params"]
            if p.grad is not None and pergrad.grad_stats(p) is not None
        ]
        counts = {pergrad.grad_stats(p).count for p, _ in pairs}
        if len(counts) != 1:
            what = "none has" if not counts else f"they cover {sorted(counts)} examples"
            raise pergrad.InputError(
                f"BatchSizeSchedule.step() reads the statistics of the step just taken, but "
                f"{what}: call it after optimizer.step() and before zero_grad(), once per "
                f"step"
            )
        (batch,) = counts
        seen, noise, signal = self.seen, self.noise, self.signal
        if batch > 1:
            total = torch.zeros(2, dtype=torch.float64, device=pairs[0][0].device)
            with torch.no_grad():
                for p, group in pairs:
                    metric = self.optimizer.metric_of(p, group)
                    here = pergrad.noise.sums(p.grad, pergrad.grad_stats(p).sq_mean, metric)
                    total = total + here.to(total.device)
            noise_now, signal_now = pergrad.noise.estimates(batch, *total.tolist())
            if not (math.isfinite(noise_now) and math.isfinite(signal_now)):
                raise FloatingPointError(
                    f"the noise scale of this step is not finite (noise {noise_now}, signal "
                    f"{signal_now}): a gradient or statistic holds NaN or inf. The schedule is "
                    f"unchanged"
                )
            seen += batch
            weight = F.average_weight(batch, seen, self.horizon)
            noise += weight * (noise_now - noise)
            signal += weight * (signal_now - signal)
        size = self._agreed(self._proposal(self.size, noise, signal))
        self.seen, self.noise, self.signal, self.size = seen, noise, signal, size
        return size

    def _proposal(self, size: int, noise: float, signal: float) -> int:
        """``B_noise = noise / signal`` within the bounds and the growth limit (at least one
        example more where ``B_noise`` asks for it), never below ``size``, optionally a power
        of two; ``size`` while the signal estimate is not positive (no evidence yet)."""
        if signal <= 0:
            return size
        cap = max(size + 1, math.floor(size * self.max_growth))
        proposal = max(size, min(math.floor(noise / signal), self.max_size, cap))
        if self.powers_of_two and proposal > size:
            proposal = max(size, 2 ** math.floor(math.log2(proposal)))
        return proposal

    def _agreed(self, size: int) -> int:
        """The first rank's ``size`` on every rank of :attr:`process_group`."""
        if self.process_group is None:
            return size
        import torch.distributed as dist

        value = torch.tensor([size], dtype=torch.int64)
        if dist.get_backend(self.process_group) == "nccl":  # on the parameters' GPU
            value = value.to(self.optimizer.param_groups[0]["params"][0].device)
        source = dist.get_global_rank(self.process_group, 0)
        dist.broadcast(value, src=source, group=self.process_group)
        return int(value.item())

    def state_dict(self) -> dict[str, Any]:
        """The proposal and the estimates: a run resumed from them continues bit for bit."""
        return {"size": self.size, "seen": self.seen, "noise": self.noise, "signal": self.signal}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s values.

        Raises:
            ValueError: ``state`` lacks a key, or its size lies outside the bounds.
        """
        missing = sorted({"size", "seen", "noise", "signal"} - set(state))
        if missing:
            raise ValueError(
                f"this state lacks {', '.join(missing)}: load one saved by "
                f"BatchSizeSchedule.state_dict()"
            )
        size, seen = state["size"], state["seen"]
        noise, signal = float(state["noise"]), float(state["signal"])
        if not (isinstance(size, int) and self.min_size <= size <= self.max_size):
            raise ValueError(
                f"the saved size {size!r} is not an int in [{self.min_size}, {self.max_size}]: "
                f"build the schedule with the bounds it was saved with"
            )
        if not (isinstance(seen, int) and seen >= 0 and math.isfinite(noise + signal)):
            raise ValueError(f"this state is not a BatchSizeSchedule's: {state!r}")
        self.size, self.seen, self.noise, self.signal = size, seen, noise, signal


class AdaptiveBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Batches of the size a :class:`BatchSizeSchedule` proposes, from a dataset in shuffled
    epochs: iterating gives one epoch, every example once, each batch as large as
    ``schedule.size`` when it is drawn (the epoch's last may be smaller, or larger by fewer
    examples than there are ranks). Pass it to
    ``DataLoader(dataset, batch_sampler=...)`` with ``num_workers=0``: workers draw batches
    ahead, before the schedule has seen the steps between.

    Under data parallelism every rank builds it with the same ``seed`` and its ``rank`` of
    ``world_size``, and gets its share of each global batch (``batch[rank::world_size]``).

    Args:
        size: the number of examples in the dataset.
        schedule: the schedule whose ``size`` each batch takes.
        seed: the shuffle of epoch ``e`` is drawn from ``seed + e``.
        rank: this process's rank among ``world_size``.
        world_size: the data-parallel ranks that share each batch.
    """

    def __init__(
        self,
        size: int,
        schedule: BatchSizeSchedule,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        positive_int("size", size, "pass the dataset's length, an int >= 1")
        if not isinstance(schedule, BatchSizeSchedule):
            raise TypeError(f"schedule must be a BatchSizeSchedule, got {type(schedule).__name__}")
        if not (isinstance(world_size, int) and world_size >= 1 and 0 <= rank < world_size):
            raise ValueError(
                f"Invalid rank {rank!r} of world_size {world_size!r}: pass 0 <= rank < world_size"
            )
        if schedule.min_size < world_size:
            raise ValueError(
                f"schedule.min_size={schedule.min_size} is below world_size={world_size}: "
                f"every rank needs an example of every batch; raise min_size"
            )
        self.size, self.schedule, self.seed = size, schedule, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        """The epoch being served."""
        self.position = 0
        """Examples of this epoch already served."""

    def __iter__(self) -> Iterator[list[int]]:
        """The rest of the current epoch; the next iteration starts the next epoch. An
        epoch's last examples, fewer than the ranks, join the batch before them, so that
        every rank has a share of every batch."""
        if self.position >= self.size:  # the last batch was served, the epoch not closed
            self.epoch, self.position = self.epoch + 1, 0
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.size, generator=generator)
        while self.position < self.size:
            end = self.position + self.schedule.size
            if self.size - end < self.world_size:
                end = self.size
            batch = order[self.position : end].tolist()
            self.position = end
            yield batch[self.rank :: self.world_size]
        self.epoch, self.position = self.epoch + 1, 0

    def state_dict(self) -> dict[str, int]:
        """Where the sampler stands: a run resumed from it serves the same batches."""
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from :meth:`state_dict`'s epoch and position."""
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
