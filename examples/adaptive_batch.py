"""Grow the batch with the critical batch size, with nothing retuned: fixed batch sizes against
an adaptive one, the same per-example hyperparameters for all.

    python examples/adaptive_batch.py --quick                 # digits, a few seconds a run
    python examples/adaptive_batch.py --data text --seeds 3

Every run sees the same examples in shuffled epochs (``optim.AdaptiveBatchSampler``) with
``optim.Adam(batch_scaling="gain")`` and the same ``lr`` and horizons; the adaptive run's
batch size follows ``optim.BatchSizeSchedule`` (from ``--min-size`` up to ``--max-size``,
toward the measured critical batch size ``B_noise``). The target is the held-out loss fixed
``B = 8`` reaches after ``--examples`` examples (each seed's own); every other run may see
``--longer`` times as many and ends at the first evaluation at or below the target (every
``--examples / --points`` examples).

Writes to ``--out``: ``adaptive.json`` — ``{"target_loss", "runs": {"fixed_8" | ... |
"adaptive": {"steps_to_target", "examples_to_target", "final_test_loss"}}}``, means over
seeds (``null`` where a seed never reaches the target; ``final_test_loss`` where the run
ended), each with its per-seed values, the
adaptive run also with ``"batch_sizes": [[examples seen, B], ...]`` (the first seed's) — and
``adaptive.png``: held-out loss against examples seen and against steps, one line per run, and
the adaptive batch size against examples seen beside the ``B_noise`` it measured.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from cli import DefaultsWhereSet
from tasks import TASKS, Task
from torch import nn

import optim
import pergrad

FIXED = (8, 32, 128, 512)


@torch.no_grad()
def held_out_loss(model: nn.Module, task: Task) -> float:
    """Mean loss over the test set, the model in eval mode."""
    model.eval()
    try:
        x, y = task.test
        return task.loss_fn(model(x), y).mean().item()
    finally:
        model.train()


def train(
    task: Task,
    sizes: tuple[int, int],
    seed: int,
    args,
    progress,
    budget: int,
    target: float | None = None,
) -> dict:
    """One run whose batch size the schedule proposes within ``sizes = (min, max)`` (fixed
    where they are equal), of at most ``budget`` examples, stopping at the first evaluation
    at or below ``target``; returns its held-out loss curve ``[(examples, steps, loss)]`` and
    its ``[(examples, B, B_noise)]``."""
    torch.manual_seed(seed)
    model = task.make_model()
    opt = optim.Adam(
        model.parameters(),
        lr=args.lr,
        grad_horizon=args.grad_horizon,
        sq_horizon=args.sq_horizon,
        batch_scaling="gain",
        gain_horizon=args.gain_horizon,
    )
    schedule = optim.BatchSizeSchedule(
        opt, min_size=sizes[0], max_size=sizes[1], horizon=args.noise_horizon
    )
    engine = pergrad.PerExample(model, task.loss_fn)
    sampler = optim.AdaptiveBatchSampler(len(task.train[1]), schedule, seed=seed)
    x, y = task.train
    every = max(1, args.examples // args.points)
    curve, batches = [(0, 0, held_out_loss(model, task))], []
    seen = steps = 0
    while seen < budget:
        for index in sampler:
            index = index[: budget - seen]
            opt.zero_grad()
            engine.backward(x[index], y[index])
            opt.step()
            batches.append((seen, len(index), schedule.critical_batch))
            schedule.step()
            seen, steps = seen + len(index), steps + 1
            if seen // every > (seen - len(index)) // every or seen == budget:
                curve.append((seen, steps, held_out_loss(model, task)))
                if target is not None and curve[-1][2] <= target:
                    budget = seen  # reached: the run ends here
            progress.update(len(index))
            if seen == budget:
                break
    return {"curve": curve, "batches": batches}


def to_target(curve: list[tuple[int, int, float]], target: float) -> tuple[int, int] | None:
    """``(examples, steps)`` at the first evaluation at or below ``target``."""
    for examples, steps, loss in curve:
        if loss <= target:
            return examples, steps
    return None


def summarize(runs: dict[str, list[dict]]) -> dict:
    """The shape of adaptive.json: the target (fixed B = 8's final loss, each seed's own) and,
    per run, the examples and steps to reach it and the final loss, means over seeds."""
    seeds = len(runs["fixed_8"])
    targets = [runs["fixed_8"][k]["curve"][-1][2] for k in range(seeds)]
    summary: dict = {"target_loss": _mean(targets), "runs": {}}
    for name, per_seed in runs.items():
        reached = [to_target(r["curve"], t) for r, t in zip(per_seed, targets)]
        entry = {
            "examples_to_target": _mean_or_none([r and r[0] for r in reached]),
            "steps_to_target": _mean_or_none([r and r[1] for r in reached]),
            "final_test_loss": _mean([r["curve"][-1][2] for r in per_seed]),
            "per_seed": {
                "examples_to_target": [r and r[0] for r in reached],
                "steps_to_target": [r and r[1] for r in reached],
                "final_test_loss": [r["curve"][-1][2] for r in per_seed],
            },
        }
        if name == "adaptive":
            entry["batch_sizes"] = [[seen, size] for seen, size, _ in per_seed[0]["batches"]]
        summary["runs"][name] = entry
    return summary


def _mean(values: list[float]) -> float:
    return math.fsum(values) / len(values)


def _mean_or_none(values: list[int | None]) -> float | None:
    return None if any(v is None for v in values) else _mean(values)


def table(summary: dict) -> str:
    """Examples and steps to the target, and the final held-out loss, per run."""
    lines = [
        f"target: held-out loss {summary['target_loss']:.4g} (fixed B=8 at the end)",
        f"{'run':<10}{'examples to target':>20}{'steps to target':>17}{'final loss':>12}",
    ]
    for name, entry in summary["runs"].items():
        examples, steps = entry["examples_to_target"], entry["steps_to_target"]
        lines.append(
            f"{name:<10}{'never' if examples is None else f'{examples:,.0f}':>20}"
            f"{'never' if steps is None else f'{steps:,.0f}':>17}"
            f"{entry['final_test_loss']:>12.4g}"
        )
    return "\n".join(lines)


def plot(runs: dict[str, list[dict]], summary: dict, path: Path, title: str) -> None:
    """Held-out loss against examples and against steps (the first seed), and the adaptive
    batch size against examples beside the ``B_noise`` it measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for i, (name, per_seed) in enumerate(runs.items()):
        examples, steps, loss = zip(*per_seed[0]["curve"])
        style = {"color": "black", "linewidth": 2.2} if name == "adaptive" else {"color": f"C{i}"}
        axes[0].plot(examples, loss, label=name, **style)
        axes[1].plot(steps[1:], loss[1:], label=name, **style)
    for ax in axes[:2]:
        ax.axhline(summary["target_loss"], color="grey", linestyle=":", linewidth=1)
        ax.set_yscale("log")
        ax.set_ylabel("held-out loss (cross-entropy, nats)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8, title="dotted: the target", title_fontsize=8)
    axes[0].set_xlabel("examples seen")
    axes[1].set_xlabel("steps (log scale)")
    axes[1].set_xscale("log")
    seen, size, critical = zip(*runs["adaptive"][0]["batches"])
    axes[2].step(seen, size, where="post", color="black", label="adaptive B")
    finite = [(s, c) for s, c in zip(seen, critical) if math.isfinite(c)]
    if finite:
        axes[2].plot(*zip(*finite), color="C3", alpha=0.7, label="B_noise (smoothed)")
    axes[2].set_yscale("log")
    axes[2].set_xlabel("examples seen")
    axes[2].set_ylabel("batch size (examples)")
    axes[2].grid(alpha=0.3, which="both")
    axes[2].legend(fontsize=8)
    axes[0].set_title("held-out loss against examples", fontsize=10)
    axes[1].set_title("held-out loss against steps", fontsize=10)
    axes[2].set_title("the adaptive batch size", fontsize=10)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=DefaultsWhereSet
    )
    parser.add_argument("--data", choices=["digits", "text"], default="digits")
    parser.add_argument(
        "--examples",
        type=int,
        help="examples fixed B=8 sees; its final held-out loss is the target [default: "
        "30000; with --quick: 12000]",
    )
    parser.add_argument(
        "--seeds", type=int, help="runs per setting, seeds 0, 1, ... [default: 3; --quick: 1]"
    )
    parser.add_argument("--lr", type=float, default=1e-3, help="per-example learning rate")
    parser.add_argument("--grad-horizon", type=float, default=1000, help="in examples")
    parser.add_argument("--sq-horizon", type=float, default=10_000, help="in examples")
    parser.add_argument("--gain-horizon", type=float, default=1000, help="in examples")
    parser.add_argument(
        "--noise-horizon", type=float, default=1000, help="the schedule's horizon, in examples"
    )
    parser.add_argument("--min-size", type=int, default=8, help="the adaptive run's first B")
    parser.add_argument("--max-size", type=int, default=512, help="the adaptive run's largest B")
    parser.add_argument(
        "--longer",
        type=int,
        default=4,
        help="the runs other than fixed B=8 may see this many times --examples, and stop at "
        "the target",
    )
    parser.add_argument(
        "--points", type=int, default=100, help="evaluations per --examples examples"
    )
    parser.add_argument(
        "--out", type=Path, help="folder for the JSON and the plot [default: runs/adaptive/DATA]"
    )
    parser.add_argument(
        "--quick", action="store_true", help="12,000 examples and one seed (for the tests)"
    )
    parser.add_argument(
        "--no-progress", dest="progress", action="store_false", help="hide the progress bar"
    )
    args = parser.parse_args(argv)
    if args.seeds is not None and args.seeds < 1:
        parser.error(f"--seeds takes a number >= 1, got {args.seeds}")
    args.seeds = args.seeds or (1 if args.quick else 3)
    args.examples = args.examples or (12_000 if args.quick else 30_000)
    if args.longer < 1:
        parser.error(f"--longer takes a number >= 1, got {args.longer}")
    args.out = args.out or Path("runs/adaptive") / args.data
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    """Train every run, print the table, write adaptive.json and adaptive.png."""
    from tqdm.auto import tqdm

    args = parse(argv)
    task = TASKS[args.data](0)
    settings = {f"fixed_{b}": (b, b) for b in FIXED} | {"adaptive": (args.min_size, args.max_size)}
    runs: dict[str, list[dict]] = {name: [] for name in settings}
    total = args.seeds * args.examples * (1 + (len(settings) - 1) * args.longer)
    with tqdm(total=total, unit="ex", disable=not args.progress, smoothing=0) as bar:
        for seed in range(args.seeds):
            target = None  # fixed B = 8 runs first and sets it
            for name, sizes in settings.items():
                bar.set_description(f"{name} seed {seed}")
                budget = args.examples if target is None else args.examples * args.longer
                run = train(task, sizes, seed, args, bar, budget, target)
                bar.update(budget - run["curve"][-1][0])  # a run that stopped early
                target = run["curve"][-1][2] if target is None else target
                runs[name].append(run)
    summary = summarize(runs)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "adaptive.json").write_text(json.dumps(summary, indent=2))
    title = (
        f"{args.data}: lr {args.lr:g} per example for every run; fixed B=8 sees "
        f"{args.examples:,} examples, the others stop at its final loss"
    )
    plot(runs, summary, args.out / "adaptive.png", title)
    print(table(summary))
    print(f"wrote {args.out / 'adaptive.json'} and {args.out / 'adaptive.png'}")
    return summary


if __name__ == "__main__":
    main()
