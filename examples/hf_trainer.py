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

import tempfile
from collections.abc import Sequence

import stack
import torch
import torch.distributed as dist
from transformers import TrainingArguments

import optim
import pergrad
from pergrad.integrations.transformers import PerExampleTrainer


def main(argv: Sequence[str] | None = None) -> bool:
    args = stack.parse(__doc__, argv, {"--accumulate": (2, "micro-batches per step")})
    train = stack.sequences()
    model = stack.char_gpt2(train.shape[1])
    opt = optim.Adam(model.parameters(), lr=args.lr, grad_horizon=320, sq_horizon=32_000)
    dataset = [{"input_ids": row, "labels": row} for row in train]
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
    same = stack.same_on_all_ranks(model.parameters())
    if dist.is_initialized():
        dist.barrier()  # no rank tears its connections down while another still uses them
        dist.destroy_process_group()
    return same


if __name__ == "__main__":
    raise SystemExit(0 if main() else 1)
