"""Compare two tuned optimizers seed by seed, from the ``tune.json`` of ``batch_invariance.py``.

    python examples/paired.py runs/batch_invariance/text/tune.json invariant_gain torch_sde
    python examples/paired.py A/tune.json invariant --against B/tune.json standard

Seed ``k`` of a tune draws the same weights and order of examples for every optimizer (and in
every tune of the same task with the same ``--seed``), so the difference between two
optimizers' losses is taken per seed, each at its own best lr, and summarized over seeds: a
paired comparison, sharper than comparing two means whose spreads include the seeds' common
luck. Prints, per batch size, the
relative difference ``(ours − theirs) / theirs`` as mean ± sample standard deviation, and each
seed's.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path


def paired(ours: dict, theirs: dict) -> dict[str, list[float]]:
    """``{B: [(ours − theirs) / theirs per seed]}`` for two optimizers' entries of tune.json,
    each at its best lr (best on average over the seeds), over the batch sizes both have."""
    found = {}
    for batch in ours["best"]:
        if batch not in theirs["best"]:
            continue
        a, b = (_per_seed(entry, batch) for entry in (ours, theirs))
        if len(a) != len(b):
            raise ValueError(f"B={batch}: {len(a)} seeds against {len(b)}; tune both alike")
        found[batch] = [(x - y) / y for x, y in zip(a, b)]
    return found


def _per_seed(entry: dict, batch: str) -> list[float]:
    if "grid_seeds" not in entry:
        raise ValueError("this tune.json has no per-seed losses (grid_seeds): tune it again")
    lr = entry["best"][batch]["lr"]
    return [math.inf if x is None else x for x in entry["grid_seeds"][batch][f"{lr:g}"]]


def summary_line(batch: str, differences: list[float]) -> str:
    mean = math.fsum(differences) / len(differences)
    spread = 0.0
    if len(differences) > 1:
        squares = math.fsum((d - mean) ** 2 for d in differences)
        spread = math.sqrt(squares / (len(differences) - 1))
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
    args = parser.parse_args(argv)
    for path in (args.tune, args.against):
        if path is not None and not path.is_file():
            parser.error(f"no file {path}: pass the tune.json that --tune wrote")
    first = json.loads(args.tune.read_text())
    second = json.loads(args.against.read_text()) if args.against else first
    for name, tune, path in ((args.ours, first, args.tune), (args.theirs, second, args.against)):
        if name not in tune:
            parser.error(f"{path or args.tune} has no {name!r}; it has {', '.join(tune)}")
    found = paired(first[args.ours], second[args.theirs])
    print(f"{args.ours} against {args.theirs}: (ours − theirs) / theirs, held-out loss")
    for batch, differences in found.items():
        print(summary_line(batch, differences))
    return found


if __name__ == "__main__":
    main()
