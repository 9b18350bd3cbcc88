"""Compare two tuned optimizers seed by seed, from the ``tune.json`` of ``batch_invariance.py``.

    python examples/paired.py runs/batch_invariance/text/tune.json invariant_gain torch_sde
    python examples/paired.py A/tune.json invariant --against B/tune.json standard
    python examples/paired.py A/tune.json invariant_gain torch_sde --tuned-at 32

Seed ``k`` of a tune draws the same weights and order of examples for every optimizer (and in
every tune of the same task with the same ``--seed``), so the difference between two
optimizers' losses is taken per seed, each at its own best lr, and summarized over seeds: a
paired comparison, sharper than comparing two means whose spreads include the seeds' common
luck. Prints, per batch size, the relative difference ``(ours − theirs) / theirs`` as mean ±
sample standard deviation, and each seed's; with ``--tuned-at 32``, at the lr each seed found
best at B = 32, carried to every B.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections.abc import Sequence
from pathlib import Path


def paired(ours: dict, theirs: dict, reference: str | None = None) -> dict[str, list[float]]:
    """``{B: [(ours − theirs) / theirs per seed]}`` for two optimizers' entries of tune.json,
    over the batch sizes both have: each at its best lr at that B (best on average over the
    seeds), or, with ``reference``, at the lr each seed found best at that batch size (the
    lr tuned there and carried over)."""
    found = {}
    for batch in ours["best"]:
        if batch not in theirs["best"]:
            continue
        a, b = (_per_seed(entry, batch, reference) for entry in (ours, theirs))
        if len(a) != len(b):
            raise ValueError(f"B={batch}: {len(a)} seeds against {len(b)}; tune both alike")
        found[batch] = [(x - y) / y for x, y in zip(a, b)]
    return found


def _per_seed(entry: dict, batch: str, reference: str | None) -> list[float]:
    """Each seed's loss at ``batch``, at the lr best there on average, or at the lr that seed
    found best at ``reference``."""
    if "grid_seeds" not in entry:
        raise ValueError("this tune.json has no per-seed losses (grid_seeds): tune it again")
    grid = {lr: [_finite(x) for x in v] for lr, v in entry["grid_seeds"][batch].items()}
    if reference is None:
        return grid[f"{entry['best'][batch]['lr']:g}"]
    if reference not in entry["grid_seeds"]:
        raise ValueError(f"the tune has no B={reference}; it has {', '.join(entry['grid_seeds'])}")
    at_reference = entry["grid_seeds"][reference]
    seeds = range(len(next(iter(at_reference.values()))))
    tuned = [min(at_reference, key=lambda lr: _finite(at_reference[lr][k])) for k in seeds]
    return [grid[lr][k] for k, lr in zip(seeds, tuned)]


def _finite(loss: float | None) -> float:
    """A diverged run's loss (``null`` in tune.json) as infinity."""
    return math.inf if loss is None else loss


def summary_line(batch: str, differences: list[float]) -> str:
    """One batch size's differences: mean ± sample standard deviation (0 for one seed), and
    each seed's."""
    mean = statistics.fmean(differences)
    spread = statistics.stdev(differences) if len(differences) > 1 else 0.0
    seeds = ", ".join(f"{100 * d:+.1f}%" for d in differences)
    return f"B={batch:<5} {100 * mean:+6.1f}% ± {100 * spread:.1f}%   (seeds: {seeds})"


def main(argv: Sequence[str] | None = None) -> dict[str, list[float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("tune", type=Path, help="a tune.json of batch_invariance.py --tune")
    parser.add_argument("ours", help="the optimizer compared")
    parser.add_argument("theirs", help="the optimizer it is compared against")
    parser.add_argument(
        "--against", type=Path, help="the tune.json that holds THEIRS [default: TUNE]"
    )
    parser.add_argument(
        "--tuned-at",
        metavar="B",
        help="compare at the lr each seed found best at batch size B, carried to every B "
        "[default: each B's own best lr]",
    )
    args = parser.parse_args(argv)
    for path in (args.tune, args.against):
        if path is not None and not path.is_file():
            parser.error(f"no file {path}: pass the tune.json that --tune wrote")
    first = json.loads(args.tune.read_text())
    second = json.loads(args.against.read_text()) if args.against else first
    for name, tune, path in ((args.ours, first, args.tune), (args.theirs, second, args.against)):
        if name not in tune:
            parser.error(f"{path or args.tune} has no {name!r}; it has {', '.join(tune)}")
    found = paired(first[args.ours], second[args.theirs], args.tuned_at)
    where = f"lr tuned at B={args.tuned_at}" if args.tuned_at else "best lr per B"
    print(f"{args.ours} against {args.theirs}: (ours − theirs) / theirs, held-out loss, {where}")
    for batch, differences in found.items():
        print(summary_line(batch, differences))
    return found


if __name__ == "__main__":
    main()
