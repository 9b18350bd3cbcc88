"""Wrap your own model: pergrad + optim in a training loop, with checkpoint save and resume.

    python examples/wrap_your_model.py --steps 200

Trains an MLP on scikit-learn's digits, saves a checkpoint (model + optimizer) halfway,
finishes, then resumes from the checkpoint in fresh objects and shows that the resumed run
continues the same loss curve.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch
from sklearn.datasets import load_digits
from torch import nn

import optim


def build(seed: int) -> tuple[nn.Module, optim.TrainingStep]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 10))
    opt = optim.Adam(model.parameters(), lr=3e-4, grad_horizon=1000, sq_horizon=10_000)
    # The three lines: a per-example loss, the step, and the loop below.
    step = optim.TrainingStep(model, nn.CrossEntropyLoss(reduction="none"), opt)
    return model, step


def batches(steps: int, batch: int, seed: int):
    """The same batches every time: the ``i``-th batch depends only on ``i``."""
    digits = load_digits()
    x = torch.tensor(digits.data / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        index = torch.randint(0, len(y), (batch,), generator=gen)
        yield x[index], y[index]


def main(argv: Sequence[str] | None = None) -> tuple[list[float], list[float]]:
    """Returns the second half's losses, as trained straight through and as resumed."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200, help="training steps in all")
    parser.add_argument("--batch-size", type=int, default=32, help="examples per step")
    parser.add_argument("--seed", type=int, default=0, help="seed of weights and batches")
    parser.add_argument(
        "--checkpoint", type=Path, default=Path("runs/checkpoint.pt"), help="where to save"
    )
    args = parser.parse_args(argv)
    half = args.steps // 2
    data = list(batches(args.steps, args.batch_size, args.seed))

    model, step = build(args.seed)
    straight = []
    for i, (x, y) in enumerate(data):
        if i == half:
            args.checkpoint.parent.mkdir(parents=True, exist_ok=True)
            torch.save(
                {"model": model.state_dict(), "optimizer": step.optimizer.state_dict()},
                args.checkpoint,
            )
        straight.append(step(x, y).item())

    model, step = build(args.seed + 1)  # different weights: the checkpoint must restore them
    checkpoint = torch.load(args.checkpoint)
    model.load_state_dict(checkpoint["model"])
    step.optimizer.load_state_dict(checkpoint["optimizer"])
    resumed = [step(x, y).item() for x, y in data[half:]]

    print(f"loss at step {half} and at the end: {straight[half]:.4f} -> {straight[-1]:.4f}")
    same = straight[half:] == resumed
    print(f"resumed from {args.checkpoint}: {'the same' if same else 'a DIFFERENT'} curve")
    return straight[half:], resumed


if __name__ == "__main__":
    main()
