"""A hand-written Accelerate loop with per-example statistics: ``accelerator.prepare`` wraps
the model (in ``DistributedDataParallel`` under several processes), the optimizer and the
loader; pergrad sees through the wrapper and sums over its process group; ``accumulate``
steps the optimizer once every few micro-batches, whose statistics add up meanwhile.

    python examples/accelerate_loop.py
    accelerate launch --multi_gpu --num_processes 2 examples/accelerate_loop.py

At the end every rank checks that all ranks hold the same parameters; rank 0 prints it.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch
from accelerate import Accelerator
from tasks import VOCABULARY, text_task
from torch.utils.data import DataLoader
from transformers import GPT2Config, GPT2LMHeadModel

import optim
import pergrad


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--steps", type=int, default=50, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=8, help="examples per micro-batch")
    parser.add_argument("--accumulate", type=int, default=2, help="micro-batches per step")
    parser.add_argument("--lr", type=float, default=3e-5, help="per-example learning rate")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> bool:
    args = parse(argv)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.accumulate, cpu=not torch.cuda.is_available()
    )
    train, _ = text_task(seed=0, sequences=1000).train
    loader = DataLoader(train, batch_size=args.batch_size, shuffle=True)
    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=2, n_embd=64, n_head=4, n_positions=train.shape[1], vocab_size=len(VOCABULARY),
        bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    model = GPT2LMHeadModel(config)
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
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    same = bool((accelerator.gather(flat[None]) == flat).all())
    accelerator.print(f"identical parameters on all {accelerator.num_processes} ranks: {same}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return same


if __name__ == "__main__":
    raise SystemExit(0 if main() else 1)
