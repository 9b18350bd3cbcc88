"""Train one model at several batch sizes with the same per-example hyperparameters.

    python examples/batch_invariance.py                        # digits, B = 8, 32, 128, 512
    python examples/batch_invariance.py --quick                # under two minutes on 2 CPU cores
    python examples/batch_invariance.py --data text --quick    # a transformer on Python's sources

The tasks (data and model) are in ``tasks.py``; nothing is downloaded.

Every run sees the same number of examples, in the same order, from the same initial weights.
Optimizers compared (keys of summary.json):

- ``invariant``: ``optim.Adam(second_moment="example")``, per-example hyperparameters;
- ``standard``: ``optim.Adam(second_moment="batch")``: the same, fed ``ĝ²`` (linear lr scaling);
- ``torch_sqrt``: ``torch.optim.Adam`` tuned at B = 32, lr scaled by ``√(B/32)`` (common practice);
- ``sgd`` (with ``--sgd``): ``optim.SGD`` with momentum as a running average.

Writes ``loss.png`` (train loss against examples seen, one panel per optimizer, one line per
batch size) and ``summary.json`` (``{optimizer: {"runs": {B: {"train_loss", "test_acc"}},
"spread"}}``, spread = max/min of the final train loss across batch sizes) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from tasks import TASKS, Task
from torch import Tensor, nn

import optim
import pergrad

REFERENCE_BATCH = 32
"""The batch size at which ``torch_sqrt`` matches the per-example hyperparameters."""

OPTIMIZERS = ("invariant", "standard", "torch_sqrt", "sgd")


def example_order(size: int, total: int, seed: int) -> Tensor:
    """The indices of the first ``total`` examples seen: shuffled epochs, the same for every B."""
    gen = torch.Generator().manual_seed(seed)
    epochs = math.ceil(total / size)
    return torch.cat([torch.randperm(size, generator=gen) for _ in range(epochs)])[:total]


def make_optimizer(name: str, params, batch: int, args) -> torch.optim.Optimizer:
    """The optimizer ``name`` with the per-example hyperparameters in ``args``."""
    horizons = {"grad_horizon": args.grad_horizon, "sq_horizon": args.sq_horizon}
    if name == "invariant":
        return optim.Adam(params, lr=args.lr, second_moment="example", **horizons)
    if name == "standard":
        return optim.Adam(params, lr=args.lr, second_moment="batch", **horizons)
    if name == "torch_sqrt":
        tuned = optim.convert.to_torch_adam(args.lr, **horizons, batch_size=REFERENCE_BATCH)
        lr = tuned["lr"] * math.sqrt(batch / REFERENCE_BATCH)
        return torch.optim.Adam(params, lr=lr, betas=tuned["betas"])
    if name == "sgd":
        return optim.SGD(params, lr=args.sgd_lr, grad_horizon=args.grad_horizon)
    raise ValueError(f"unknown optimizer {name!r}; choose from {OPTIMIZERS}")


@torch.no_grad()
def train_loss(model: nn.Module, task: Task) -> float:
    """Mean loss over the training set (its first ``task.curve_examples`` examples)."""
    x, y = (part[: task.curve_examples] for part in task.train)
    return task.loss_fn(model(x), y).mean().item()


@torch.no_grad()
def test_accuracy(model: nn.Module, task: Task) -> float:
    """Fraction of the test set's labels (digits, or next characters) predicted correctly."""
    x, y = task.test
    return (model(x).argmax(-1) == y).float().mean().item()


def train(task: Task, name: str, batch: int, order: Tensor, args, progress) -> dict:
    """One run: returns the loss curve ``[(examples seen, train loss)]`` and final figures."""
    torch.manual_seed(args.seed)
    model = task.make_model()
    opt = make_optimizer(name, model.parameters(), batch, args)
    engine = pergrad.PerExample(model, task.loss_fn)
    x, y = task.train
    curve = [(0, train_loss(model, task))]
    every = max(batch, len(order) // args.points)
    for start in range(0, len(order), batch):
        index = order[start : start + batch]
        opt.zero_grad()
        if name == "torch_sqrt":
            task.loss_fn(model(x[index]), y[index]).mean().backward()
        else:
            engine.backward(x[index], y[index])
        opt.step()
        seen = start + len(index)
        if seen // every > (seen - len(index)) // every or seen == len(order):
            curve.append((seen, train_loss(model, task)))
        progress.update(len(index))
    # the curve always ends at the last step, so its last point is the final train loss
    return {"train_loss": curve[-1][1], "test_acc": test_accuracy(model, task), "curve": curve}


def run(task: Task, args) -> dict:
    """Every optimizer at every batch size; returns ``{optimizer: {B: run}}``."""
    from tqdm.auto import tqdm

    order = example_order(len(task.train[1]), args.examples, args.seed)
    results: dict[str, dict[int, dict]] = {}
    for name in args.optimizers:
        results[name] = {}
        for batch in args.batch_sizes:
            with tqdm(
                total=len(order),
                desc=f"{name:>10} B={batch:<4}",
                unit="ex",
                disable=not args.progress,
                leave=False,
            ) as bar:
                results[name][batch] = train(task, name, batch, order, args, bar)
    return results


def summarize(results: dict) -> dict:
    """The shape of summary.json: final figures per B and the spread across B."""
    summary = {}
    for name, runs in results.items():
        losses = [r["train_loss"] for r in runs.values()]
        summary[name] = {
            "runs": {
                str(b): {"train_loss": r["train_loss"], "test_acc": r["test_acc"]}
                for b, r in runs.items()
            },
            "spread": max(losses) / min(losses),
        }
    return summary


def table(summary: dict, batch_sizes: Sequence[int]) -> str:
    """A plain-text table: final train loss / test accuracy per optimizer and B, and spread."""
    header = f"{'optimizer':<12}" + "".join(f"{'B=' + str(b):>18}" for b in batch_sizes)
    lines = [header + f"{'spread':>10}", "-" * (len(header) + 10)]
    for name, entry in summary.items():
        runs = [entry["runs"][str(b)] for b in batch_sizes]
        cells = "".join(f"{r['train_loss']:>11.2e} / {r['test_acc']:.2f}" for r in runs)
        lines.append(f"{name:<12}{cells}{entry['spread']:>10.3g}")
    lines.append("cells: final train loss / test accuracy; spread: max/min train loss over B")
    return "\n".join(lines)


def plot(results: dict, path: Path, title: str) -> None:
    """One panel per optimizer, one line per batch size, loss against examples seen."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, axes = plt.subplots(
        1, len(names), figsize=(4.2 * len(names), 3.6), sharey=True, squeeze=False
    )
    for ax, name in zip(axes[0], names):
        for batch, r in results[name].items():
            seen, loss = zip(*r["curve"])
            ax.plot(seen, loss, label=f"B={batch}")
        ax.set_title(name)
        ax.set_xlabel("examples seen")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("train loss")
    axes[0][-1].legend(title="batch size")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--data",
        choices=sorted(TASKS),
        default="digits",
        help="digits: an MLP on 8×8 digit images; text: a causal transformer on Python's own "
        "sources, one gradient per 32-character sequence",
    )
    parser.add_argument(
        "--batch-sizes",
        type=int,
        nargs="+",
        help="batch sizes to compare [default: 8 32 128 512; with --quick: 8 32 128]",
    )
    parser.add_argument(
        "--examples",
        type=int,
        help="examples seen by every run, the x axis [default: 60000; with --quick: 12000]",
    )
    parser.add_argument(
        "--lr",
        type=float,
        default=3e-4,
        help="Adam's per-example learning rate η₀ (a step moves by B·lr)",
    )
    parser.add_argument(
        "--sgd-lr", type=float, default=2e-3, help="SGD's per-example learning rate, with --sgd"
    )
    parser.add_argument(
        "--grad-horizon", type=float, default=1000, help="first-moment horizon N_g⁰, in examples"
    )
    parser.add_argument(
        "--sq-horizon", type=float, default=10_000, help="second-moment horizon N_s⁰, in examples"
    )
    parser.add_argument("--sgd", action="store_true", help="also run optim.SGD with momentum")
    parser.add_argument("--points", type=int, default=60, help="points on each loss curve")
    parser.add_argument("--seed", type=int, default=0, help="seed of weights, split and order")
    parser.add_argument(
        "--out",
        type=Path,
        help="folder for loss.png and summary.json [default: runs/batch_invariance/DATA]",
    )
    parser.add_argument(
        "--quick", action="store_true", help="smaller defaults that finish in under two minutes"
    )
    parser.add_argument(
        "--no-progress", dest="progress", action="store_false", help="hide the progress bars"
    )
    args = parser.parse_args(argv)
    quick, full = ([8, 32, 128], 12_000), ([8, 32, 128, 512], 60_000)
    batch_sizes, examples = quick if args.quick else full
    args.out = args.out or Path("runs/batch_invariance") / args.data
    args.batch_sizes = args.batch_sizes or batch_sizes
    args.examples = args.examples or examples
    args.optimizers = ["invariant", "standard", "torch_sqrt"] + (["sgd"] if args.sgd else [])
    return args


def main(argv: Sequence[str] | None = None, task: Task | None = None) -> dict:
    """Run the comparison, print the table, write the PNG and JSON; return the summary."""
    args = parse(argv)
    task = task or TASKS[args.data](args.seed)
    results = run(task, args)
    summary = summarize(results)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    plot(
        results,
        args.out / "loss.png",
        f"{args.data}: {args.examples:,} examples at every batch size",
    )
    print(table(summary, args.batch_sizes))
    print(f"wrote {args.out / 'loss.png'} and {args.out / 'summary.json'}")
    return summary


if __name__ == "__main__":
    main()
