"""A Lightning ``LightningModule`` with per-example statistics: manual optimization, the
backward pass by pergrad, the step by ``optim.Adam``. Under a data-parallel strategy every
rank holds a share of each batch and pergrad sums the statistics over all ranks.

    python examples/lightning_module.py                  # one process
    python examples/lightning_module.py --devices 2      # two processes, DDP on CPU (gloo)

Lightning runs ``training_step`` through its own wrapper of the module, so the engine wraps
the language model inside it and takes the process group itself, once the strategy has set
it up (in ``setup``). At the end every rank checks that all ranks hold the same parameters.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import lightning as L
import torch
import torch.distributed as dist
from tasks import VOCABULARY, text_task
from torch.utils.data import DataLoader
from transformers import GPT2Config, GPT2LMHeadModel

import optim
import pergrad


class PerExampleLanguageModel(L.LightningModule):
    """GPT-2 from a config, trained on per-example statistics."""

    def __init__(self, length: int, lr: float):
        super().__init__()
        self.automatic_optimization = False  # pergrad's backward, optim's step
        config = GPT2Config(
            n_layer=2, n_embd=64, n_head=4, n_positions=length, vocab_size=len(VOCABULARY),
            bos_token_id=0, eos_token_id=0,
        )  # fmt: skip
        self.model = GPT2LMHeadModel(config)
        self.lr = lr
        self.engine: pergrad.PerExample | None = None

    def setup(self, stage: str) -> None:
        group = dist.group.WORLD if dist.is_available() and dist.is_initialized() else None
        self.engine = pergrad.PerExample(self.model, pergrad.losses.causal_lm, process_group=group)

    def configure_optimizers(self) -> optim.Adam:
        return optim.Adam(self.model.parameters(), lr=self.lr, grad_horizon=320, sq_horizon=32_000)

    def training_step(self, ids: torch.Tensor, batch_index: int) -> None:
        opt = self.optimizers()
        opt.zero_grad()
        loss = self.engine.backward({"input_ids": ids}, ids)  # the mean over all ranks
        opt.step()
        self.log("loss", loss, prog_bar=True)

    def on_train_end(self) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            return
        flat = torch.cat([p.detach().reshape(-1) for p in self.model.parameters()])
        gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, flat)
        same = all(torch.equal(gathered[0], other) for other in gathered)
        if self.global_rank == 0:
            print(f"identical parameters on all {dist.get_world_size()} ranks: {same}")


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--steps", type=int, default=50, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=8, help="examples per rank and step")
    parser.add_argument("--devices", type=int, default=1, help="processes (CPU)")
    parser.add_argument("--lr", type=float, default=3e-5, help="per-example learning rate")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse(argv)
    train, _ = text_task(seed=0, sequences=1000).train
    torch.manual_seed(0)
    module = PerExampleLanguageModel(train.shape[1], args.lr)
    trainer = L.Trainer(
        accelerator="cpu", devices=args.devices, max_steps=args.steps, logger=False,
        enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False,
        strategy="ddp_spawn" if args.devices > 1 else "auto",
    )  # fmt: skip
    trainer.fit(module, DataLoader(train, batch_size=args.batch_size, shuffle=True))


if __name__ == "__main__":
    main()
