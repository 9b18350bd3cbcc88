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

from collections.abc import Sequence

import lightning as L
import stack
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

import optim
import pergrad


class PerExampleLanguageModel(L.LightningModule):
    """GPT-2 from a config, trained on per-example statistics."""

    def __init__(self, length: int, lr: float):
        super().__init__()
        self.automatic_optimization = False  # pergrad's backward, optim's step
        self.model = stack.char_gpt2(length)
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
        stack.same_on_all_ranks(self.model.parameters())
        if dist.is_available() and dist.is_initialized():
            dist.barrier()  # no rank tears its connections down while another still uses them


def main(argv: Sequence[str] | None = None) -> None:
    args = stack.parse(__doc__, argv, {"--devices": (1, "processes (CPU)")})
    train = stack.sequences()
    module = PerExampleLanguageModel(train.shape[1], args.lr)
    trainer = L.Trainer(
        accelerator="cpu", devices=args.devices, max_steps=args.steps, logger=False,
        enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False,
        strategy="ddp_spawn" if args.devices > 1 else "auto",
    )  # fmt: skip
    trainer.fit(module, DataLoader(train, batch_size=args.batch_size, shuffle=True))


if __name__ == "__main__":
    main()
