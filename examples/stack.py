"""What the training-stack examples share (``hf_trainer.py``, ``accelerate_loop.py``,
``lightning_module.py``, ``data_parallel.py``): their command line, a character-level GPT-2
on Python's own sources, and the check that every rank holds the same parameters."""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist
from cli import DefaultsWhereSet
from tasks import VOCABULARY, text_task
from torch import Tensor, nn


def parse(
    doc: str, argv: Sequence[str] | None, extra: dict[str, tuple[int, str]]
) -> argparse.Namespace:
    """``--steps``, ``--batch-size``, ``--lr`` and the ``extra`` integer options
    (``{"--name": (default, help)}``), described by the first paragraph of ``doc``."""
    parser = argparse.ArgumentParser(
        description=doc.split("\n\n")[0], formatter_class=DefaultsWhereSet
    )
    parser.add_argument("--steps", type=int, default=50, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=8, help="examples per micro-batch")
    parser.add_argument("--lr", type=float, default=3e-5, help="per-example learning rate")
    for name, (default, help_text) in extra.items():
        parser.add_argument(name, type=int, default=default, help=help_text)
    return parser.parse_args(argv)


def sequences() -> Tensor:
    """1,000 windows of 32 characters' codes of the standard library's sources, shuffled."""
    train, _ = text_task(seed=0, sequences=1000).train
    return train


def char_gpt2(length: int) -> nn.Module:
    """A 2-layer GPT-2 of width 64 over the characters, built from a config (seeded: every
    rank builds the same weights)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=2, n_embd=64, n_head=4, n_positions=length, vocab_size=len(VOCABULARY),
        bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    return GPT2LMHeadModel(config)


def same_on_all_ranks(params: Iterable[Tensor]) -> bool:
    """Whether every rank holds these parameters bit for bit (``True`` in one process); rank
    0 prints the answer."""
    if not (dist.is_available() and dist.is_initialized()):
        return True
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    same = all(torch.equal(gathered[0], other) for other in gathered)
    if dist.get_rank() == 0:
        print(f"identical parameters on all {dist.get_world_size()} ranks: {same}")
    return same
