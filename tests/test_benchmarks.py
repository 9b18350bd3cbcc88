"""The benchmark script runs end to end on a tiny setting; timings are never asserted."""

import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import per_example_cost  # noqa: E402


def test_benchmark_writes_both_tables_and_the_plot(tmp_path, capsys):
    model = "MLP 64-256-256-10"
    argv = ["--models", model, "--batch-sizes", "8", "--repeats", "1", "--out", str(tmp_path)]
    results = per_example_cost.main(argv)
    row = results[(model, 8)]
    for method in ("plain", "auto", "func", "hooks", "loop", "grads()", "opacus"):
        assert row[method]["seconds"] > 0, (method, row[method])
    text = (tmp_path / "results.md").read_text()
    assert "Median time per step" in text and "Peak extra memory" in text
    assert text.count(f"| {model} | 8 |") == 2 and "| fails |" not in text
    assert (tmp_path / "results.png").stat().st_size > 10_000
    assert "results.md" in capsys.readouterr().out
