"""Statistics across data-parallel workers, on ``torch.distributed``.

The statistics of a batch are sums, ``(n, Σ_b g_b, Σ_b g_b²)``, so summing each worker's
over the process group gives exactly those of the global batch, whatever share of it each
worker held (none included). All of them travel in one flattened all-reduce per dtype.
"""

from __future__ import annotations

from collections import defaultdict

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


def all_reduce_sums(
    group: object,
    count: int,
    loss_sum: Tensor,
    grad_sums: dict[str, Tensor],
    sq_sums: dict[str, Tensor],
) -> tuple[int, Tensor]:
    """Sum ``count``, ``loss_sum`` and every entry of ``grad_sums`` and ``sq_sums`` (in place)
    over ``group``; return the global count and loss sum. The count and the loss travel in
    float64, exact for any count below 2⁵³ whatever the gradients' dtype."""
    tally = torch.tensor([count, float(loss_sum)], dtype=torch.float64)
    buckets: dict[tuple, list[tuple[dict, str]]] = defaultdict(list)
    for sums in (grad_sums, sq_sums):
        for name, tensor in sums.items():
            buckets[(tensor.dtype, tensor.device)].append((sums, name))
    device = next(iter(buckets))[1] if buckets else loss_sum.device
    carrier = (torch.float64, device)  # the count and the loss ride in float64
    buckets.setdefault(carrier, [])
    for key, entries in buckets.items():
        parts = [sums[name].reshape(-1) for sums, name in entries]
        if key == carrier:
            parts.append(tally.to(device))
        flat = torch.cat(parts)
        dist.all_reduce(flat, group=group)
        offset = 0
        for sums, name in entries:  # back into their own tensors: no two share storage
            size = sums[name].numel()
            sums[name].copy_(flat[offset : offset + size].view_as(sums[name]))
            offset += size
        if key == carrier:
            tally = flat[offset:]
    return int(tally[0].round().item()), tally[1].to(loss_sum.dtype)
