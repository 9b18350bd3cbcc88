"""What data-parallel training checks on ``torch.distributed``: that it is initialized, and
that every rank starts from the same parameters; and the sum of every rank's statistics
(:meth:`pergrad.stats.Sums.all_reduce`), where any rank's error reaches them all."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor

from pergrad.checks import InputError
from pergrad.stats import Sums


def check_initialized(group: object) -> None:
    """Raise unless ``torch.distributed`` is initialized, so that ``group`` can be used.

    Raises:
        RuntimeError: naming the way to initialize it.
        TypeError: ``group`` is not a process group.
    """
    if dist.is_available() and dist.is_initialized() and not isinstance(group, dist.ProcessGroup):
        raise TypeError(
            f"process_group must be a torch.distributed ProcessGroup (dist.group.WORLD, or one "
            f"from dist.new_group), got {type(group).__name__}"
        )
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            f"process_group={group!r} was given, but torch.distributed is not initialized. "
            f"Call torch.distributed.init_process_group(backend='gloo' or 'nccl') first "
            f"(launching with torchrun sets up its environment), or leave process_group=None "
            f"to train in one process."
        )


def check_same_parameters(params: dict[str, Tensor], group: object) -> None:
    """Compare a checksum of every parameter across ranks, in one all-reduce.

    Raises:
        RuntimeError: on every rank, naming the parameters that differ between ranks.
    """
    device = next(iter(params.values())).device
    sums = torch.stack(
        [
            torch.stack([p.detach().sum(), p.detach().square().sum()]).double()
            for p in params.values()
        ]
    ).to(device)
    extremes = torch.cat([sums, -sums])  # max of both: the largest and the smallest value
    dist.all_reduce(extremes, op=dist.ReduceOp.MAX, group=group)
    largest, smallest = extremes.chunk(2)
    differ = [name for name, hi, lo in zip(params, largest, -smallest) if not torch.equal(hi, lo)]
    if differ:
        raise RuntimeError(
            f"parameter(s) {', '.join(differ)} differ between ranks at the first step, so the "
            f"ranks would train apart. Start every rank from the same weights: seed them alike "
            f"before building the model, or broadcast from rank 0 "
            f"(for p in model.parameters(): torch.distributed.broadcast(p.data, src=0))."
        )


def gathered(
    compute: Callable[[], Sums],
    group: object | None,
    checked: bool,
    params: Callable[[], dict],
    dtypes: dict | None = None,
) -> Sums:
    """``compute()``, this rank's sums; with a process ``group``, summed over it by
    :func:`reduce` (in ``dtypes``, by parameter name, where given), every rank taking part
    even where its own ``compute`` raised (so that none waits for it; then every rank
    raises). ``params()`` gives the parameters where ``compute`` raised."""
    if group is None:
        return compute()
    sums, failure = None, None
    try:
        sums = compute()
    except Exception as error:
        failure = error
    found = sums.params if sums is not None else params()
    return reduce(sums, failure, found, group, checked, dtypes)


def reduce(
    sums: Sums | None,
    failure: Exception | None,
    params: dict,
    group: object,
    checked: bool,
    dtypes: dict | None = None,
) -> Sums:
    """Sum ``sums`` over ``group`` (in ``dtypes``, see :meth:`Sums.all_reduce`), every rank
    taking part whether or not its own share raised (``failure``, with ``sums`` then
    ignored): then every rank raises, this one its own error. Unless ``checked``, the ranks'
    parameters are compared first.

    Raises:
        InputError: the batch is empty on every rank.
        RuntimeError: the ranks start from different parameters, or another rank raised.
    """
    if not checked:
        check_same_parameters(params, group)
    sums = sums if sums is not None and failure is None else Sums(params)
    failed = sums.all_reduce(group, failed=failure is not None, dtypes=dtypes)
    if failure is not None:
        raise failure
    if failed:
        raise RuntimeError(
            f"{failed} other rank(s) raised in this backward, so nothing was accumulated on "
            f"any rank; their error says why and what to do."
        )
    if sums.count == 0:
        raise InputError("the batch is empty on every rank: pass examples")
    return sums
