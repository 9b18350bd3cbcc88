"""A hand-written Accelerate loop with per-example statistics: ``accelerator.prepare`` wraps
the model (in ``DistributedDataParallel`` under several processes), the optimizer and the
loader; pergrad sees through the wrapper and sums over its process group; ``accumulate``
steps the optimizer once every few micro-batches, whose statistics add up meanwhile.

    python examples/accelerate_loop.py
    accelerate launch --multi_gpu --num_processes 2 examples/accelerate_loop.py

At the end every rank checks that all ranks hold the same parameters; rank 0 prints it.
"""

from __future__ import annotations

from collections.abc import Sequence

import stack
import torch
import torch.distributed as dist
from accelerate import Accelerator
from torch.utils.data import DataLoader

import optim
import pergrad


def main(argv: Sequence[str] | None = None) -> bool:
    args = stack.parse(__doc__, argv, {"--accumulate": (2, "micro-batches per step")})
    accelerator = Accelerator(
        gradient_accumulation_steps=args.accumulate, cpu=not torch.cuda.is_available()
    )
    train = stack.sequences()
    loader = DataLoader(train, batch_size=args.batch_size, shuffle=True)
    model = stack.char_gpt2(train.shape[1])
    opt = optim.Adam(model.parameters(), lr=args.lr, grad_horizon=320, sq_horizon=32_000)
    model, opt, loader = accelerator.prepare(model, opt, loader)
    engine = pergrad.PerExample(model, pergrad.losses.causal_lm)  # DDP's group, if wrapped
    steps, micro_batches = 0, iter(loader)
    while steps < args.steps:
        ids = next(micro_batches)
        with accelerator.accumulate(model):
            loss = engine.backward({"input_ids": ids}, ids)  # adds to the statistics
            opt.step()  # only at the last micro-batch of each step
            opt.zero_grad()
        if accelerator.sync_gradients:
            steps += 1
            if steps % max(1, args.steps // 5) == 0:
                accelerator.print(f"step {steps:>4}: loss {loss.item():.4f}")
    same = stack.same_on_all_ranks(model.parameters())
    accelerator.wait_for_everyone()  # no rank tears its connections down while another uses them
    accelerator.end_training()
    if dist.is_initialized():
        dist.destroy_process_group()
    return same


if __name__ == "__main__":
    raise SystemExit(0 if main() else 1)
