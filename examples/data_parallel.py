"""Data-parallel training on digits: every rank takes a share of each batch, and pergrad sums
the statistics over the process group, so every rank takes the same step.

    torchrun --nproc_per_node=2 examples/data_parallel.py

Uses ``gloo`` on CPU and ``nccl`` where every rank has a GPU. At the end, every rank checks
that all ranks hold the same parameters, and rank 0 prints the result.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import stack
import torch
import torch.distributed as dist
from batch_invariance import example_order
from tasks import digits_task

import optim
import pergrad


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--steps", type=int, default=200, help="training steps")
    parser.add_argument("--batch-size", type=int, default=64, help="global batch size B")
    parser.add_argument("--lr", type=float, default=3e-4, help="per-example learning rate")
    parser.add_argument("--seed", type=int, default=0, help="seed of weights, split and order")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse(argv)
    use_cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", rank % torch.cuda.device_count()) if use_cuda else None
    task = digits_task(args.seed)
    torch.manual_seed(args.seed)  # every rank builds the same initial weights
    model = task.make_model().to(device)
    engine = pergrad.PerExample(model, task.loss_fn, process_group=dist.group.WORLD)
    opt = optim.Adam(model.parameters(), lr=args.lr, grad_horizon=1000, sq_horizon=10_000)
    x, y = (t.to(device) for t in task.train)
    order = example_order(len(y), args.steps * args.batch_size, args.seed).to(x.device)
    for step in range(args.steps):
        batch = order[step * args.batch_size : (step + 1) * args.batch_size]
        share = batch[rank::world]  # this rank's examples of the global batch
        opt.zero_grad()
        loss = engine.backward(x[share], y[share])  # the global batch's mean loss
        opt.step()
        if rank == 0 and (step + 1) % max(1, args.steps // 5) == 0:
            print(f"step {step + 1:>4}: global batch loss {loss.item():.4f}")
    same = stack.same_on_all_ranks(model.parameters())
    dist.barrier()  # no rank tears its connections down while another still uses them
    dist.destroy_process_group()
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
