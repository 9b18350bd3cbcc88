"""Train one model at several batch sizes with the same per-example hyperparameters.

    python examples/batch_invariance.py                        # digits, B = 8, 32, 128, 512
    python examples/batch_invariance.py --quick                # B = 8, 32, 128, fewer examples
    python examples/batch_invariance.py --data text --quick    # a transformer on Python's sources
    python examples/batch_invariance.py --tune --quick         # each optimizer's lr, tuned per B

The tasks (data and model) are in ``tasks.py``; nothing is downloaded.

Every run sees the same number of examples, in the same order, from the same initial weights.
Optimizers compared (keys of summary.json):

- ``invariant``: ``optim.Adam(second_moment="example")``, per-example hyperparameters;
- ``invariant_gain``: the same with ``batch_scaling="gain"``: the step uses the gain ratio, the
  number of single-example steps the batch is worth, in place of ``B``;
- ``invariant_32``: ``optim.Adam(second_moment_batch=32)``: at every B, an unbiased estimate
  of the second moment Adam has at B = 32 (``|G|² + σ²/32``), built from per-example statistics;
- ``invariant_sqrt``: ``invariant`` with ``batch_scaling="sqrt"`` (``√B·lr``, ``ε/√B``), matched
  to ``invariant`` at B = 32: the square-root rule fed ``q``;
- ``standard``: ``optim.Adam(second_moment="batch")``: the same, fed ``ĝ²`` (linear lr scaling);
- ``standard_sqrt``: the same with ``batch_scaling="sqrt"``: Malladi et al.'s square-root rule in
  per-example units, matched to ``standard`` at B = 32;
- ``torch_sqrt``: ``torch.optim.Adam`` matched at B = 32, lr scaled by ``√(B/32)`` (common
  practice); with ``--tune`` also ``torch_linear``: the same, scaled by ``B/32``;
  ``torch_sde``: Malladi et al.'s square-root rule from B = 32, ``κ = B/32``: lr by ``√κ``,
  ``1 − β₁`` and ``1 − β₂`` by ``κ``, ``ε`` by ``1/√κ``; ``torch_halflife``: lr by ``√κ``,
  ``β₁`` and ``β₂`` raised to ``κ`` (their half-lives fixed in examples), ``ε`` as it is;
- ``sgd`` (with ``--sgd``): ``optim.SGD`` with momentum as a running average.

Writes to ``--out``: ``loss.png`` (train loss against examples seen, one panel per optimizer,
one line per batch size), ``noise.png`` (the critical batch size ``B_noise`` over training,
measured by ``pergrad.noise_scale`` in the invariant runs, the batch sizes marked) and
``summary.json`` (``{optimizer: {"runs": {B: {"train_loss", "test_loss", "test_acc",
"curve", "noise"}}, "spread"}}``: the final figures, the points of both plots, ``[examples
seen, train loss]`` and ``[examples seen, B_noise]``, and spread = max/min of the final train
loss across batch sizes).

``--tune`` instead runs every optimizer at every learning rate of ``--lr-grid`` (per example;
for ``torch_*`` and ``*_sqrt``, the per-example lr at B = 32, scaled by their rule) and batch size,
with ``--seeds`` runs per cell (3 by default, each with its own weights and order of
examples), and writes ``tune.json`` (``{optimizer: {"best": {B: {"lr", "loss", "loss_std"}},
"transfer": {B: ratio}, "transfer_std": {B: std}, "grid": {B: {lr: loss}}, "grid_std": {B:
{lr: std}}, "grid_seeds": {B: {lr: [loss per seed]}}}}``, loss = final held-out loss
averaged over seeds, std = its sample standard deviation, transfer = the loss at B of the
lr best at B = 32 over the best loss at B, taken per seed and averaged) and ``lr.png`` (loss
against lr, one line per batch size with a band of ± one standard deviation, one panel per
optimizer: for an invariant method the lines' minima line up).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import multiprocessing
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import torch
from cli import DefaultsWhereSet
from tasks import TASKS, Task
from torch import Tensor, nn

import optim
import pergrad

REFERENCE_BATCH = 32
"""The batch size at which ``torch_sqrt`` matches the per-example hyperparameters."""

TORCH = ("torch_sqrt", "torch_linear", "torch_sde", "torch_halflife")
OURS = (
    "invariant",
    "invariant_gain",
    "invariant_32",
    "invariant_sqrt",
    "standard",
    "standard_sqrt",
)
SQRT = {"invariant_sqrt": "example", "standard_sqrt": "batch"}
"""The square-root rule in ``optim``'s units, and the second moment each feeds."""
OPTIMIZERS = (*OURS, *TORCH, "sgd")
AT_REFERENCE = (*TORCH, *SQRT)
"""Optimizers whose lr is the per-example lr at B = 32, scaled by their rule."""
EPS = 1e-8
"""``torch.optim.Adam``'s ``ε`` at B = 32 (its default, and ``optim.Adam``'s)."""


def example_order(size: int, total: int, seed: int) -> Tensor:
    """The indices of the first ``total`` examples seen: shuffled epochs, the same for every B."""
    gen = torch.Generator().manual_seed(seed)
    epochs = math.ceil(total / size)
    return torch.cat([torch.randperm(size, generator=gen) for _ in range(epochs)])[:total]


def make_optimizer(name: str, params, batch: int, lr: float, args) -> torch.optim.Optimizer:
    """The optimizer ``name`` with per-example learning rate ``lr`` and the horizons in
    ``args``."""
    horizons = {"grad_horizon": args.grad_horizon, "sq_horizon": args.sq_horizon}
    if name not in TORCH:  # how optim's averages start; torch's are exponential
        horizons["bias_correction"] = args.bias_correction
    if name == "invariant":
        return optim.Adam(params, lr=lr, second_moment="example", **horizons)
    if name == "invariant_gain":
        gain = {"batch_scaling": "gain", "gain_horizon": args.gain_horizon}
        return optim.Adam(params, lr=lr, **gain, **horizons)
    if name == "invariant_32":
        return optim.Adam(params, lr=lr, second_moment_batch=REFERENCE_BATCH, **horizons)
    if name == "standard":
        return optim.Adam(params, lr=lr, second_moment="batch", **horizons)
    if name in SQRT:  # √B·lr·…, ε/√B: at B = 32, the linear rule's lr and ε
        root = math.sqrt(REFERENCE_BATCH)
        sqrt = {"batch_scaling": "sqrt", "eps": EPS * root}
        moment = SQRT[name]
        return optim.Adam(params, lr=lr * root, second_moment=moment, **sqrt, **horizons)
    if name in TORCH:
        matched = optim.convert.to_torch_adam(lr, **horizons, batch_size=REFERENCE_BATCH)
        kappa = batch / REFERENCE_BATCH
        betas, eps = matched["betas"], EPS
        if name == "torch_sde":
            betas = tuple(max(0.0, 1 - kappa * (1 - beta)) for beta in betas)
            eps = EPS / math.sqrt(kappa)
        elif name == "torch_halflife":
            betas = tuple(beta**kappa for beta in betas)
        scale = kappa if name == "torch_linear" else math.sqrt(kappa)
        return torch.optim.Adam(params, lr=matched["lr"] * scale, betas=betas, eps=eps)
    if name == "sgd":
        warm_up = {"bias_correction": args.bias_correction}
        return optim.SGD(params, lr=lr, grad_horizon=args.grad_horizon, **warm_up)
    raise ValueError(f"unknown optimizer {name!r}; choose from {OPTIMIZERS}")


@torch.no_grad()
def train_loss(model: nn.Module, task: Task) -> float:
    """Mean loss over the training set (its first ``task.curve_examples`` examples), the
    model in eval mode (BatchNorm: its running statistics)."""
    x, y = (part[: task.curve_examples] for part in task.train)
    with evaluating(model):
        return task.loss_fn(model(x), y).mean().item()


@torch.no_grad()
def test_figures(model: nn.Module, task: Task) -> tuple[float, float]:
    """Mean held-out loss, and the fraction of the test set's labels (digits, or next
    characters) predicted correctly, the model in eval mode."""
    x, y = task.test
    with evaluating(model):
        output = model(x)
    accuracy = (output.argmax(-1) == y).float().mean().item()
    loss = task.loss_fn(output, y).mean().item()
    return (loss if math.isfinite(loss) else math.inf), accuracy


@contextlib.contextmanager
def evaluating(model: nn.Module):
    """``model.eval()`` inside, ``model.train()`` after."""
    model.eval()
    try:
        yield
    finally:
        model.train()


def train(
    task: Task, name: str, batch: int, order: Tensor, args, progress, lr=None, seed=None
) -> dict:
    """One run, its weights drawn under ``seed`` (``--seed`` by default): returns the loss
    curve ``[(examples seen, train loss)]``, the critical batch size measured along the way
    ``[(examples seen, B_noise)]`` (pergrad's optimizers, B ≥ 2), and final figures."""
    torch.manual_seed(args.seed if seed is None else seed)
    model = task.make_model()
    if lr is None:
        lr = args.sgd_lr if name == "sgd" else args.lr
    opt = make_optimizer(name, model.parameters(), batch, lr, args)
    if task.micro_batch:  # every optimizer's gradients from micro-batches, as accumulation
        engine = pergrad.MicroBatches(model, task.loss_fn, size=task.micro_batch)
    else:
        engine = pergrad.PerExample(model, task.loss_fn)
    x, y = task.train
    curve, noise = [(0, train_loss(model, task))], []
    every = max(batch, len(order) // args.points)
    window = [0.0, 0.0]  # noise and signal summed since the last point
    for start in range(0, len(order), batch):
        index = order[start : start + batch]
        opt.zero_grad()
        if name in TORCH and not task.micro_batch:
            task.loss_fn(model(x[index]), y[index]).mean().backward()
        else:
            engine.backward(x[index], y[index])
            if name not in TORCH and len(index) > 1:
                scale = pergrad.noise_scale(model.parameters())
                window = [window[0] + scale.noise, window[1] + scale.signal]
        opt.step()
        seen = start + len(index)
        if seen // every > (seen - len(index)) // every or seen == len(order):
            curve.append((seen, train_loss(model, task)))
            if window[1] > 0:  # the ratio of averages: steadier than averaging ratios
                noise.append((seen, window[0] / window[1]))
            window = [0.0, 0.0]
        progress.update(len(index))
    test_loss, test_acc = test_figures(model, task)
    # the curve always ends at the last step, so its last point is the final train loss
    final = curve[-1][1] if math.isfinite(curve[-1][1]) else math.inf
    return {
        "train_loss": final,
        "test_loss": test_loss,
        "test_acc": test_acc,
        "curve": curve,
        "noise": noise,
    }


def run(task: Task, args) -> dict:
    """Every optimizer at every batch size (and, with ``--tune``, every lr of the grid);
    returns ``{optimizer: {B: run}}``, or ``{optimizer: {B: {lr: run}}}``. With ``--jobs N``
    the runs go to ``N`` processes, each with ``1/N`` of the threads."""
    from tqdm.auto import tqdm

    rates = args.lr_grid if args.tune else [None]
    seeds = _seeds(args)
    cells = [
        (n, b, lr, seed)
        for n in args.optimizers
        for b in args.batch_sizes
        for lr in rates
        for seed in seeds
    ]
    results: dict = {}
    total = len(cells) * args.examples
    bar = tqdm(total=total, unit="ex", disable=not args.progress, smoothing=0)
    with bar:
        if args.jobs == 1:
            for name, batch, lr, seed in cells:
                order = example_order(len(task.train[1]), args.examples, seed)
                bar.set_description(f"{name} B={batch}" + (f" lr={lr:g}" if lr else ""))
                done = train(task, name, batch, order, args, bar, lr, seed)
                _store(results, name, batch, lr, seed, done)
            return {name: _in_order(results[name], args) for name in args.optimizers}
        bar.set_description(f"{len(cells)} runs in {args.jobs} processes")
        threads = max(1, torch.get_num_threads() // args.jobs)
        context = multiprocessing.get_context("spawn")  # fork is unsafe once torch has threads
        with ProcessPoolExecutor(args.jobs, mp_context=context) as pool:
            futures = {pool.submit(_train_in_worker, args, threads, *cell): cell for cell in cells}
            for future in as_completed(futures):
                _store(results, *futures[future], future.result())
                bar.update(args.examples)
    return {name: _in_order(results[name], args) for name in args.optimizers}


def _train_in_worker(args, threads: int, name: str, batch: int, lr, seed: int) -> dict:
    """One run of :func:`run` in a process of its own, with ``threads`` threads."""
    torch.set_num_threads(threads)
    task = _task(args.data, args.seed)
    order = example_order(len(task.train[1]), args.examples, seed)
    return train(task, name, batch, order, args, _NoProgress(), lr, seed)


def _seeds(args) -> list[int]:
    """The seeds of a cell's runs: each draws its own weights and order of examples (the
    split stays ``--seed``'s)."""
    return [args.seed + k for k in range(args.seeds)]


@functools.cache
def _task(data: str, seed: int) -> Task:
    """The task of ``--data``, built once per process."""
    return TASKS[data](seed)


class _NoProgress:
    def update(self, n: int) -> None:
        pass


def _store(results: dict, name: str, batch: int, lr: float | None, seed: int, done) -> None:
    runs = results.setdefault(name, {})
    if lr is None:
        runs[batch] = done
    else:
        runs.setdefault(batch, {}).setdefault(lr, {})[seed] = done


def _in_order(runs: dict, args) -> dict:
    """Runs that finished in any order, keyed in the order of the command line (with
    ``--tune``, ``{B: {lr: [run per seed]}}``)."""
    ordered = {b: runs[b] for b in args.batch_sizes}
    if args.tune:
        seeds = _seeds(args)
        ordered = {
            b: {lr: [r[lr][seed] for seed in seeds] for lr in args.lr_grid}
            for b, r in ordered.items()
        }
    return ordered


def tune_summary(results: dict) -> dict:
    """The shape of tune.json: per optimizer and B, the lr best on average over the seeds, its
    mean held-out loss and the standard deviation over seeds; the transfer of the lr best at
    the reference batch size, taken per seed (its own best lr at the reference), averaged,
    with its standard deviation; and the whole grid of mean losses."""
    summary = {}
    for name, by_batch in results.items():
        losses = {
            b: {lr: [r["test_loss"] for r in runs] for lr, runs in grid.items()}
            for b, grid in by_batch.items()
        }
        mean = {b: {lr: _mean(v) for lr, v in g.items()} for b, g in losses.items()}
        best = {b: min(g.items(), key=lambda item: item[1])[0] for b, g in mean.items()}
        seeds = len(next(iter(losses[REFERENCE_BATCH].values())))
        transfers = {b: [] for b in losses}
        for k in range(seeds):
            at_reference = losses[REFERENCE_BATCH]
            reference_lr = min(at_reference, key=lambda lr: at_reference[lr][k])
            for b, g in losses.items():
                best_k = min(v[k] for v in g.values())
                transfers[b].append(g[reference_lr][k] / best_k)
        summary[name] = {
            "best": {
                str(b): {
                    "lr": lr,
                    "loss": _finite(mean[b][lr]),
                    "loss_std": _finite(_std(losses[b][lr])),
                }
                for b, lr in best.items()
            },
            "transfer": {str(b): _finite(_mean(t)) for b, t in transfers.items()},
            "transfer_std": {str(b): _finite(_std(t)) for b, t in transfers.items()},
            "grid": {
                str(b): {f"{lr:g}": _finite(v) for lr, v in g.items()} for b, g in mean.items()
            },
            "grid_std": {
                str(b): {f"{lr:g}": _finite(_std(v)) for lr, v in g.items()}
                for b, g in losses.items()
            },
            "grid_seeds": {
                str(b): {f"{lr:g}": [_finite(x) for x in v] for lr, v in g.items()}
                for b, g in losses.items()
            },
        }
    return summary


def _mean(values: list[float]) -> float:
    return math.fsum(values) / len(values)


def _std(values: list[float]) -> float:
    """The sample standard deviation (0 for one value; infinite where a run diverged)."""
    if len(values) < 2:
        return 0.0
    if not all(map(math.isfinite, values)):
        return math.inf
    mean = _mean(values)
    return math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (len(values) - 1))


def _finite(value: float) -> float | None:
    """JSON has no infinity: a diverged run's loss is written as null."""
    return value if math.isfinite(value) else None


def tune_table(summary: dict, batch_sizes: Sequence[int]) -> str:
    """Best held-out loss (its lr) per optimizer and B, and the transfer of the lr best at
    the reference batch size."""
    header = f"{'optimizer':<15}" + "".join(f"{'B=' + str(b):>29}" for b in batch_sizes)
    lines = [header, "-" * len(header)]
    for name, entry in summary.items():
        best = [entry["best"][str(b)] for b in batch_sizes]
        cells = "".join(
            f"{_cell(r['loss'])}±{_spread(r['loss_std'])} ({r['lr']:.0e}) / "
            f"{_ratio(entry['transfer'][str(b)])}"
            for r, b in zip(best, batch_sizes)
        )
        lines.append(f"{name:<15}{cells}")
    lines.append(
        f"cells: best held-out loss ± its standard deviation over seeds (its lr) / transfer: "
        f"loss at the lr best at B={REFERENCE_BATCH}, over the best loss at B (1 = the lr "
        f"carries over), each seed's, averaged"
    )
    return "\n".join(lines)


def _cell(loss: float | None) -> str:
    return f"{loss:>8.3g}" if loss is not None else f"{'diverged':>8}"


def _spread(std: float | None) -> str:
    return f"{std:<6.2g}" if std is not None else f"{'inf':<6}"


def _ratio(ratio: float | None) -> str:
    return f"{ratio:<5.3g}" if ratio is not None else f"{'inf':<5}"


def summarize(results: dict) -> dict:
    """The shape of summary.json: final figures per B, the curves behind the plots, and the
    spread across B."""
    summary = {}
    for name, runs in results.items():
        losses = [r["train_loss"] for r in runs.values()]
        summary[name] = {
            "runs": {
                str(b): {
                    **{key: r[key] for key in ("train_loss", "test_loss", "test_acc")},
                    "curve": [[seen, _finite(loss)] for seen, loss in r["curve"]],
                    "noise": [list(point) for point in r["noise"]],
                }
                for b, r in runs.items()
            },
            "spread": max(losses) / min(losses),
        }
    return summary


def table(summary: dict, batch_sizes: Sequence[int]) -> str:
    """A plain-text table: final train loss / test accuracy per optimizer and B, and spread."""
    header = f"{'optimizer':<15}" + "".join(f"{'B=' + str(b):>18}" for b in batch_sizes)
    lines = [header + f"{'spread':>10}", "-" * (len(header) + 10)]
    for name, entry in summary.items():
        runs = [entry["runs"][str(b)] for b in batch_sizes]
        cells = "".join(f"{r['train_loss']:>11.2e} / {r['test_acc']:.2f}" for r in runs)
        lines.append(f"{name:<15}{cells}{entry['spread']:>10.3g}")
    lines.append("cells: final train loss / test accuracy; spread: max/min train loss over B")
    return "\n".join(lines)


STYLES = [("-", "o"), ("--", "s"), ("-.", "^"), (":", "D"), ("-", "v"), ("--", "P")]
"""Line style and marker per batch size, so that lines lying on each other stay visible."""

LOSS_UNIT = "cross-entropy, nats"

OPTIMIZER_TITLES = {
    "invariant": "optim.Adam, q = mean g²",
    "invariant_gain": "optim.Adam, q, gain ratio",
    "invariant_32": "optim.Adam, E[ĝ²] at B=32",
    "standard": "optim.Adam, ĝ² (linear)",
    "invariant_sqrt": "optim.Adam, q, √ rule",
    "standard_sqrt": "optim.Adam, ĝ², √ rule",
    "torch_sqrt": "torch Adam, √B lr",
    "torch_linear": "torch Adam, B lr",
    "torch_sde": "torch Adam, Malladi's SDE rule",
    "torch_halflife": "torch Adam, √B lr, β^κ",
    "sgd": "optim.SGD, momentum",
}


def panel_title(name: str, lr: float | None = None) -> str:
    """``name``, what it is, and its lr (per example; torch's: per example at B = 32)."""
    title = f"{name}: {OPTIMIZER_TITLES.get(name, name)}"
    if lr is not None:
        where = f" at B={REFERENCE_BATCH}" if name in AT_REFERENCE else ""
        title += f"\nlr {lr:g} per example{where}"
    return title


def panels(plt, count: int, size: tuple[float, float]) -> tuple:
    """A figure of ``count`` panels, three to a row, sharing the y axis; the unused ones
    removed. Returns the figure and the panels in reading order."""
    columns = min(3, count)
    rows = math.ceil(count / columns)
    fig, grid = plt.subplots(
        rows, columns, figsize=(size[0] * columns, size[1] * rows), sharey=True, squeeze=False
    )
    axes = list(grid.flat)
    for ax in axes[count:]:
        ax.remove()
    return fig, axes[:count]


def plot(results: dict, path: Path, title: str, lrs: dict[str, float]) -> None:
    """One panel per optimizer (its lr in the title), one line per batch size, loss against
    examples seen; each batch size has its own dash and markers, and a panel whose final
    losses agree within 5% says that its lines coincide."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, axes = panels(plt, len(names), (4.4, 3.6))
    for ax, name in zip(axes, names):
        finals = []
        for i, (batch, r) in enumerate(results[name].items()):
            seen, loss = zip(*r["curve"])
            dash, marker = STYLES[i % len(STYLES)]
            every = (i * max(1, len(seen) // 24), max(1, len(seen) // 6))  # staggered
            ax.plot(
                seen, loss, dash, marker=marker, markevery=every, markersize=4,
                color=f"C{i}", linewidth=1.4, label=f"B={batch}",
            )  # fmt: skip
            finals.append(loss[-1])
        if finals and all(map(math.isfinite, finals)) and max(finals) <= 1.05 * min(finals):
            ax.text(
                0.97, 0.97, "lines coincide\n(final losses within 5%)", transform=ax.transAxes,
                ha="right", va="top", fontsize=8, bbox={"facecolor": "white", "alpha": 0.8},
            )  # fmt: skip
        ax.set_title(panel_title(name, lrs.get(name)), fontsize=9)
        ax.set_xlabel("examples seen")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(title="batch size", fontsize=8, title_fontsize=8, loc="lower left")
    for ax in axes[:: min(3, len(names))]:
        ax.set_ylabel(f"train loss ({LOSS_UNIT})")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_noise(results: dict, batch_sizes: Sequence[int], path: Path, title: str) -> None:
    """``B_noise`` over training in the invariant runs, one line per batch size, the batch
    sizes marked: where a batch size lies above the curve, invariance must break."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4))
    runs = results.get("invariant", {})
    for i, batch in enumerate(batch_sizes):
        points = runs.get(batch, {}).get("noise", [])
        if points:
            seen, scale = zip(*points)
            ax.plot(seen, scale, color=f"C{i}", label=f"measured at B={batch}")
        ax.axhline(batch, color=f"C{i}", linestyle=":", linewidth=1)
    ax.set_yscale("log")
    ax.set_xlabel("examples seen")
    ax.set_ylabel("critical batch size B_noise = tr Σ / |G|²")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, title="dotted: the batch sizes", title_fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_lr(summary: dict, path: Path, title: str) -> None:
    """Final held-out loss against lr, one line per batch size, one panel per optimizer. The
    y axis spans the losses that matter: a run worse than twice the worst of the best losses
    (diverged, or stuck) is drawn on the top edge as a cross."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary)
    best = [r["loss"] for e in summary.values() for r in e["best"].values() if r["loss"]]
    top = 2 * max(best, default=1.0)
    fig, axes = panels(plt, len(names), (4.0, 3.4))
    for ax, name in zip(axes, names):
        for i, (batch, losses) in enumerate(summary[name]["grid"].items()):
            points = sorted(
                (float(lr), top if v is None else min(v, top)) for lr, v in losses.items()
            )
            lrs, values = zip(*points)
            dash, marker = STYLES[i % len(STYLES)]
            ax.plot(
                lrs, values, dash, marker=marker, markersize=3, color=f"C{i}", label=f"B={batch}"
            )
            spread = summary[name].get("grid_std", {}).get(batch, {})
            band = sorted(
                (float(lr), losses[lr], spread[lr])
                for lr in losses
                if losses[lr] is not None and spread.get(lr) is not None
            )
            if band:  # ± one standard deviation over seeds
                x, mean, std = zip(*band)
                low = [max(m - d, 1e-12) for m, d in zip(mean, std)]
                high = [min(m + d, top) for m, d in zip(mean, std)]
                ax.fill_between(x, low, high, color=f"C{i}", alpha=0.15, linewidth=0)
            off = [(lr, v) for lr, v in points if v >= top]
            if off:
                ax.plot(*zip(*off), "x", color=f"C{i}", markersize=7)
        ax.set_title(panel_title(name), fontsize=9)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_ylim(0.95 * min(best, default=top / 4), top * 1.05)
        for axis in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
            axis(matplotlib.ticker.FormatStrFormatter("%g"))
        grid = sorted({float(lr) for losses in summary[name]["grid"].values() for lr in losses})
        ax.set_xticks(grid, [f"{lr:g}" for lr in grid], fontsize=7)
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel(f"lr per example{' at B=32' if name in AT_REFERENCE else ''}")
        ax.grid(alpha=0.3, which="both")
        ax.legend(title="batch size", fontsize=7, title_fontsize=7)
    for ax in axes[:: min(3, len(names))]:
        ax.set_ylabel(f"held-out loss ({LOSS_UNIT})\n×: off the top; bands: ±1 sd")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=DefaultsWhereSet,
    )
    parser.add_argument(
        "--data",
        choices=sorted(TASKS),
        default="digits",
        help="digits: an MLP on 8×8 digit images; digits_bn: a CNN with BatchNorm on them, its "
        "statistics from micro-batches of 4; text: a causal transformer on Python's own "
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
        "--sgd-lr",
        type=float,
        default=2e-3,
        help="SGD's per-example learning rate (not with --tune)",
    )
    parser.add_argument(
        "--grad-horizon", type=float, default=1000, help="first-moment horizon N_g⁰, in examples"
    )
    parser.add_argument(
        "--sq-horizon", type=float, default=10_000, help="second-moment horizon N_s⁰, in examples"
    )
    parser.add_argument("--sgd", action="store_true", help="also run optim.SGD with momentum")
    parser.add_argument(
        "--optimizers",
        nargs="+",
        choices=OPTIMIZERS,
        metavar="NAME",
        help="the optimizers to run, of: " + ", ".join(OPTIMIZERS) + " [default: "
        "invariant invariant_gain invariant_32 standard torch_sqrt torch_sde (and sgd with "
        "--sgd); with --tune: all but sgd]",
    )
    parser.add_argument(
        "--bias-correction",
        choices=("uniform", "exponential"),
        default="uniform",
        help="how optim's running averages start (optim.Adam's bias_correction): uniform, the "
        "exact mean until the horizon; exponential, Adam's (torch's optimizers always)",
    )
    parser.add_argument(
        "--tune",
        action="store_true",
        help="run every lr of --lr-grid: writes tune.json and lr.png instead of the curves",
    )
    parser.add_argument(
        "--lr-grid",
        type=float,
        nargs="+",
        help="per-example learning rates tried by --tune [default: 1e-4 3e-4 1e-3 3e-3 1e-2; "
        "with --quick: 3e-4 1e-3 3e-3]",
    )
    parser.add_argument(
        "--gain-horizon",
        type=float,
        default=1000,
        help="invariant_gain: the examples its noise and signal estimates span",
    )
    parser.add_argument("--points", type=int, default=60, help="points on each loss curve")
    parser.add_argument("--seed", type=int, default=0, help="seed of weights, split and order")
    parser.add_argument(
        "--seeds",
        type=int,
        help="--tune: runs per cell, each with its own weights and order of examples (seeds "
        "--seed, --seed + 1, ...); tables show mean ± standard deviation [default: 3]",
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="folder for the plots and the JSON [default: runs/batch_invariance/DATA]",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="B = 8, 32, 128 and 12,000 examples (digits: about 15 s with 2 threads on an idle "
        "2-core machine)",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="run the runs in this many processes, splitting the threads between them",
    )
    parser.add_argument(
        "--no-progress", dest="progress", action="store_false", help="hide the progress bars"
    )
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")
    if args.seeds is not None and (args.seeds < 1 or not args.tune):
        parser.error(f"--seeds takes a number >= 1, with --tune; got {args.seeds}")
    args.seeds = args.seeds or (3 if args.tune else 1)
    quick, full = ([8, 32, 128], 12_000), ([8, 32, 128, 512], 60_000)
    batch_sizes, examples = quick if args.quick else full
    args.out = args.out or Path("runs/batch_invariance") / args.data
    args.batch_sizes = args.batch_sizes or batch_sizes
    args.examples = args.examples or examples
    args.lr_grid = args.lr_grid or (
        [3e-4, 1e-3, 3e-3] if args.quick else [1e-4, 3e-4, 1e-3, 3e-3, 1e-2]
    )
    micro = 4 if args.data == "digits_bn" else 1
    for batch in args.batch_sizes:
        last = args.examples % batch or batch
        if last == 1 or last % micro or (micro > 1 and last < 2 * micro):
            parser.error(
                f"--examples {args.examples} leaves a last batch of {last} at B={batch}: it "
                f"needs two examples or more (two micro-batches of {micro} for digits_bn); "
                f"pick --examples so that it does"
            )
    if args.optimizers and args.sgd:
        parser.error("--sgd adds sgd to the default optimizers: name it in --optimizers instead")
    if args.tune:
        args.optimizers = args.optimizers or [*OURS, *TORCH]
        if REFERENCE_BATCH not in args.batch_sizes:
            parser.error(
                f"--tune measures transfer from B={REFERENCE_BATCH}: include it in --batch-sizes"
            )
    elif not args.optimizers:
        args.optimizers = ["invariant", "invariant_gain", "invariant_32", "standard"]
        args.optimizers += ["torch_sqrt", "torch_sde"]
        args.optimizers += ["sgd"] if args.sgd else []
    return args


def main(argv: Sequence[str] | None = None, task: Task | None = None) -> dict:
    """Run the comparison, print the table, write the PNG and JSON; return the summary."""
    args = parse(argv)
    if task is not None and args.jobs > 1:
        raise ValueError("--jobs builds the task in each process from --data: pass no task")
    task = task or TASKS[args.data](args.seed)
    results = run(task, args)
    args.out.mkdir(parents=True, exist_ok=True)
    title = f"{args.data}: {args.examples:,} examples at every batch size"
    if args.tune:
        summary = tune_summary(results)
        (args.out / "tune.json").write_text(json.dumps(summary, indent=2))
        plot_lr(summary, args.out / "lr.png", title)
        print(tune_table(summary, args.batch_sizes))
        print(f"wrote {args.out / 'lr.png'} and {args.out / 'tune.json'}")
        return summary
    summary = summarize(results)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    lrs = {name: args.sgd_lr if name == "sgd" else args.lr for name in results}
    plot(results, args.out / "loss.png", title, lrs)
    plot_noise(results, args.batch_sizes, args.out / "noise.png", title)
    print(table(summary, args.batch_sizes))
    print(
        f"wrote {args.out / 'loss.png'}, {args.out / 'noise.png'} and {args.out / 'summary.json'}"
    )
    return summary


if __name__ == "__main__":
    main()
