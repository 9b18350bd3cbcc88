"""pergrad over PyTorch's own module database: how many samples are exact on the per-layer
path, exact with a whole-model mode, refused, or wrong, counted as the test suite judges them
(``tests/torch_modules.py``), without verification, as users run pergrad.

    python benchmarks/module_db.py
    python benchmarks/module_db.py --modules nn.Linear nn.MultiheadAttention

The ``pergrad`` imported is the first on the path: put an older checkout first
(``PYTHONPATH=../old``) to count that version's verdicts. Prints one JSON object: the count
of samples and of runs (samples × batch sizes) per verdict, the seconds, and the first
wrong or crashed runs.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import torch_modules  # noqa: E402
from test_torch_modules import CONFIGS, cases  # noqa: E402


def tally(modules: list[str] | None = None) -> dict:
    started = time.perf_counter()
    samples, runs, failures = collections.Counter(), collections.Counter(), []
    for case in cases():
        if modules and case.name not in modules:
            continue
        summaries = set()
        for size, chunk_size in CONFIGS:
            verdict = torch_modules.judge(case, size, chunk_size, verify=False)
            summaries.add(verdict.summary)
            runs[verdict.summary] += 1
            if verdict.kind in ("wrong", "crashed"):
                failures.append(f"{case}, B = {size}, chunk_size = {chunk_size}: {verdict.kind}")
        wrong = summaries & {"wrong", "crashed"}
        samples["wrong or crashed" if wrong else torch_modules.sample_summary(summaries)] += 1
    seconds = round(time.perf_counter() - started)
    return {"samples": dict(samples), "runs": dict(runs), "seconds": seconds, "failures": failures}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modules", nargs="+", metavar="NAME", help="e.g. nn.Linear (all: omit)")
    found = tally(parser.parse_args(argv).modules)
    print(json.dumps({**found, "failures": found["failures"][:20]}, indent=1))
    return found


if __name__ == "__main__":
    main()
