"""The data sets and models that ``batch_invariance.py`` trains; nothing is downloaded.

- ``digits``: scikit-learn's bundled 8×8 digits and a 64-128-10 MLP; one example is one image.
- ``digits_bn``: the same images and a small CNN with ``BatchNorm2d``, whose statistics come
  from micro-batches of 4 (``pergrad.MicroBatches``): per-example gradients of a network in
  training-mode BatchNorm are not defined.
- ``text``: Python's own standard-library sources, next-character prediction with a small
  causal transformer (``Embedding`` + ``TransformerEncoderLayer`` + ``Linear``); one example is
  one sequence, whose loss is the mean over its characters.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import pathlib
import string
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class Task:
    """A model to train and the data to train it on.

    ``loss_fn`` returns one loss per example. The train-loss curve averages over the first
    ``curve_examples`` training examples (all of them when ``None``); the training set is
    shuffled, so these are a fixed random sample. ``micro_batch``: train from micro-batches of
    this many examples (``pergrad.MicroBatches``) instead of per-example gradients.
    """

    make_model: Callable[[], nn.Module]
    train: tuple[Tensor, Tensor]
    test: tuple[Tensor, Tensor]
    loss_fn: Callable[[Tensor, Tensor], Tensor]
    curve_examples: int | None = None
    micro_batch: int | None = None


def digits_task(seed: int) -> Task:
    """scikit-learn's bundled 8×8 digits, standardized, 80/20 split; a 64-128-10 MLP."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        data.data, data.target, test_size=0.2, random_state=seed, stratify=data.target
    )
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    to_x = lambda a: torch.tensor((a - mean) / std, dtype=torch.float32)  # noqa: E731
    to_y = lambda a: torch.tensor(a, dtype=torch.long)  # noqa: E731
    return Task(
        make_model=lambda: nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 10)),
        train=(to_x(x_train), to_y(y_train)),
        test=(to_x(x_test), to_y(y_test)),
        loss_fn=nn.CrossEntropyLoss(reduction="none"),
    )


class DigitsCNN(nn.Module):
    """8×8 images → conv 3×3 (16) → BatchNorm → ReLU → conv 3×3 stride 2 (32) → BatchNorm →
    ReLU → linear (10)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
        )
        self.head = nn.Linear(32 * 4 * 4, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x.view(-1, 1, 8, 8)).flatten(1))


def digits_bn_task(seed: int) -> Task:
    """The digits of :func:`digits_task` and a :class:`DigitsCNN`, trained from micro-batches
    of 4 examples (BatchNorm normalizes over each)."""
    digits = digits_task(seed)
    return dataclasses.replace(digits, make_model=DigitsCNN, micro_batch=4)


SEQUENCE_LENGTH = 32
VOCABULARY = string.printable
"""100 characters; any other character is read as ``"?"``."""

SOURCES = (argparse, dataclasses, functools, pathlib, textwrap)
"""Standard-library modules whose source text is the corpus (about 240,000 characters)."""


class CharTransformer(nn.Module):
    """Characters → embeddings + learned position embeddings → one causal
    ``TransformerEncoderLayer`` → logits for the next character at every position."""

    def __init__(self, vocabulary: int, width: int = 64, heads: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocabulary, width)
        self.position = nn.Embedding(SEQUENCE_LENGTH, width)
        self.block = nn.TransformerEncoderLayer(
            width, heads, dim_feedforward=2 * width, dropout=0.0, batch_first=True
        )
        self.head = nn.Linear(width, vocabulary)

    def forward(self, chars: Tensor) -> Tensor:
        length = chars.shape[1]
        causal = nn.Transformer.generate_square_subsequent_mask(length, device=chars.device)
        # positions carry the batch dimension, so pergrad's per-layer rule covers them too
        positions = torch.arange(length, device=chars.device).expand_as(chars)
        hidden = self.embed(chars) + self.position(positions)
        return self.head(self.block(hidden, src_mask=causal, is_causal=True))


def sequence_loss(logits: Tensor, target: Tensor) -> Tensor:
    """Per-sequence loss: cross-entropy averaged over positions, ``(B, T, V), (B, T) -> (B,)``."""
    return F.cross_entropy(logits.transpose(1, 2), target, reduction="none").mean(1)


def text_task(seed: int, sequences: int = 4800, curve_examples: int = 512) -> Task:
    """Python's standard-library sources cut into ``sequences`` windows of 33 characters
    (input 32, target shifted by one), shuffled, 80/20 split; a ``CharTransformer``."""
    text = "".join(Path(module.__file__).read_text(encoding="utf-8") for module in SOURCES)
    length = SEQUENCE_LENGTH + 1
    if len(text) < sequences * length:
        raise ValueError(
            f"the sources hold {len(text):,} characters, fewer than {sequences} sequences "
            f"of {length}; ask for at most {len(text) // length} sequences"
        )
    index = {char: i for i, char in enumerate(VOCABULARY)}
    codes = torch.tensor([index.get(char, index["?"]) for char in text[: sequences * length]])
    windows = codes.view(sequences, length)
    windows = windows[torch.randperm(sequences, generator=torch.Generator().manual_seed(seed))]
    train, test = windows[: sequences * 4 // 5], windows[sequences * 4 // 5 :]
    return Task(
        make_model=lambda: CharTransformer(len(VOCABULARY)),
        train=(train[:, :-1], train[:, 1:]),
        test=(test[:, :-1], test[:, 1:]),
        loss_fn=sequence_loss,
        curve_examples=curve_examples,
    )


TASKS: dict[str, Callable[[int], Task]] = {
    "digits": digits_task,
    "digits_bn": digits_bn_task,
    "text": text_task,
}
