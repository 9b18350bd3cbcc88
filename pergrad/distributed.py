"""What data-parallel training checks on ``torch.distributed``: that it is initialized, and
that every rank starts from the same parameters. The statistics themselves are sums, which
:meth:`pergrad.stats.Sums.all_reduce` sums over the process group."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


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
