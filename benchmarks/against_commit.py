"""``PerExample.backward`` of the working tree against the same code at a git commit, in one
process, taking turns step by step: a change of a few per cent shows, where two separate
runs on a shared machine differ by tens.

    python benchmarks/against_commit.py --ref HEAD~1
    python benchmarks/against_commit.py --ref main --model "MLP 64-256-256-10" --batch 256

The commit's ``pergrad`` is extracted with ``git archive`` into a temporary folder as a
package named ``pergrad_at_ref`` (its imports of itself renamed), so both versions run on the
same model, batch and weights, after a plain ``loss.mean().backward()``, in turn. Reports the
median time per step of each and the median of the per-step ratios ``this / ref`` (below 1:
the working tree is faster).
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
from io import BytesIO
from pathlib import Path
from unittest import mock

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from per_example_cost import MODELS, OVERHEAD, OVERHEAD_BATCH, take_turns  # noqa: E402

RENAMED = "pergrad_at_ref"


def extract(ref: str, folder: Path):
    """Import ``pergrad`` as it is at ``ref``, as the package :data:`RENAMED`."""
    archive = subprocess.run(
        ["git", "archive", ref, "pergrad"], cwd=ROOT, capture_output=True, check=True
    ).stdout
    safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}  # Python ≥ 3.11.4
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(folder, **safe)
    (folder / "pergrad").rename(folder / RENAMED)
    for path in (folder / RENAMED).rglob("*.py"):
        path.write_text(re.sub(r"\bpergrad\b", RENAMED, path.read_text()))
    sys.path.insert(0, str(folder))
    return importlib.import_module(RENAMED)


def compare(ref: str, model_name: str, batch: int, steps: int) -> dict[str, float]:
    """Median seconds per step of ``plain``, ``ref`` and ``this``, and the median per-step
    ratio of ``this`` to ``ref``."""
    import pergrad

    with tempfile.TemporaryDirectory() as folder:
        old = extract(ref, Path(folder))
        torch.manual_seed(0)
        model, x, y, loss_fn = MODELS[model_name](batch)
        inputs = x if isinstance(x, tuple) else (x,)
        with mock.patch.dict(os.environ):  # both timed as users run them: unverified
            os.environ.pop("PERGRAD_VERIFY", None)
            engines = {"ref": old.PerExample(model, loss_fn)}
        engines["this"] = pergrad.PerExample(model, loss_fn, verify=False)

        def plain():
            model.zero_grad(set_to_none=True)
            loss_fn(model(*inputs), y).mean().backward()

        def step(engine):
            return lambda: (engine.zero_grad(), engine.backward(inputs, y))

        runs = {"plain": plain, **{name: step(engine) for name, engine in engines.items()}}
        take_turns(runs, 2)  # warm-up: the probe, lazily loaded kernels
        times = take_turns(runs, steps)
    found = {name: statistics.median(t) for name, t in times.items()}
    found["this / ref"] = statistics.median(a / b for a, b in zip(times["this"], times["ref"]))
    return found


def parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ref", default="HEAD", help="the git commit to compare against")
    parser.add_argument("--model", choices=list(MODELS), default=OVERHEAD, metavar="MODEL")
    parser.add_argument("--batch", type=int, default=OVERHEAD_BATCH)
    parser.add_argument("--steps", type=int, default=2000, help="timed steps of each")
    return parser.parse_args(argv)


def main(argv=None) -> dict[str, float]:
    args = parse(argv)
    found = compare(args.ref, args.model, args.batch, args.steps)
    plain = found["plain"]
    print(
        f"{args.model}, B = {args.batch}, {args.steps} steps, {torch.get_num_threads()} "
        f"thread(s): plain {plain * 1e6:.0f} µs; {args.ref} {found['ref'] / plain:.2f}×, "
        f"this {found['this'] / plain:.2f}× plain; this / {args.ref} = "
        f"{found['this / ref']:.3f} (median of per-step ratios)"
    )
    return found


if __name__ == "__main__":
    main()
