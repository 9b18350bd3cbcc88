"""A GPT-2 trained by Hugging Face's ``Trainer`` with per-example statistics: pergrad's
``PerExampleTrainer`` and ``optim.Adam``, gradient accumulation included. Characters of
Python's own standard-library sources are the tokens; the model is built from a config.

    python examples/hf_trainer.py
    torchrun --nproc_per_node=2 examples/hf_trainer.py     # 2 processes, gloo on CPU
    accelerate launch --multi_gpu --num_processes 2 examples/hf_trainer.py   # the same

Under several processes, ``Trainer`` wraps the model in ``DistributedDataParallel`` and
pergrad sums the statistics over its process group; at the end every rank checks that all
ranks hold the same parameters, and rank 0 prints the result.
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Sequence

import torch
import torch.distributed as dist
from tasks import VOCABULARY, text_task
from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments

import optim
import pergrad
from pergrad.integrations.transformers import PerExampleTrainer


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


def main(argv: Sequence[str] | None = None) -> None:
    args = parse(argv)
    train, _ = text_task(seed=0, sequences=1000).train
    dataset = [{"input_ids": row, "labels": row} for row in train]
    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=2, n_embd=64, n_head=4, n_positions=train.shape[1], vocab_size=len(VOCABULARY),
        bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    model = GPT2LMHeadModel(config)
    opt = optim.Adam(model.parameters(), lr=args.lr, grad_horizon=320, sq_horizon=32_000)
    with tempfile.TemporaryDirectory() as out:
        arguments = TrainingArguments(
            output_dir=out, per_device_train_batch_size=args.batch_size,
            gradient_accumulation_steps=args.accumulate, max_steps=args.steps,
            logging_steps=max(1, args.steps // 5), save_strategy="no", report_to=[],
            use_cpu=not torch.cuda.is_available(), disable_tqdm=True,
        )  # fmt: skip
        trainer = PerExampleTrainer(
            model=model, args=arguments, train_dataset=dataset,
            per_example_loss=pergrad.losses.causal_lm, optimizers=(opt, None),
        )  # fmt: skip
        trainer.train()
    if dist.is_initialized():
        flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, flat)
        same = all(torch.equal(gathered[0], other) for other in gathered)
        if dist.get_rank() == 0:
            print(f"identical parameters on all {dist.get_world_size()} ranks: {same}")
        dist.barrier()  # no rank tears its connections down while another still uses them
        dist.destroy_process_group()
        if not same:
            raise SystemExit(1)


if __name__ == "__main__":
    main()
