"""The benchmark script runs end to end on a tiny setting; timings are never asserted."""

import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import per_example_cost  # noqa: E402


def test_benchmark_writes_its_tables_and_the_plot(tmp_path, capsys):
    model, tiny = "MLP 64-256-256-10", per_example_cost.OVERHEAD
    argv = ["--models", tiny, model, "--batch-sizes", "8", "--repeats", "1"]
    argv += ["--optimizer-tensors", "4", "--out", str(tmp_path)]
    results = per_example_cost.main(argv)
    row = results[(model, 8)]
    for method in ("plain", "auto", "func", "hooks", "loop", "grads()", "opacus"):
        assert row[method]["seconds"] > 0, (method, row[method])
    assert 1 <= row["_machine"]["tries"] <= 1 + per_example_cost.RETRIES
    text = (tmp_path / "results.md").read_text()
    assert "Median time per step" in text and "Peak extra memory" in text
    assert text.count(f"| {model} | 8 |") == 2 and "| fails |" not in text
    assert f"Per-call overhead: time per step less plain backward's ({tiny}, B = 8)" in text
    assert "Optimizer step" in text and "| 4 |" in text
    assert (tmp_path / "results.png").stat().st_size > 10_000
    assert "results.md" in capsys.readouterr().out


@pytest.mark.skipif(
    not (Path(__file__).resolve().parent.parent / ".git").exists(), reason="needs the git history"
)
def test_against_commit_runs_both_versions_in_one_process(capsys):
    import against_commit

    found = against_commit.main(["--ref", "HEAD", "--steps", "3"])
    assert set(found) == {"plain", "ref", "this", "this / ref"}
    assert all(value > 0 for value in found.values())
    assert against_commit.RENAMED in sys.modules  # HEAD's code ran beside the working tree's
    assert "this / HEAD" in capsys.readouterr().out


def test_the_training_stack_benchmark_writes_its_tables(tmp_path):
    pytest.importorskip("transformers")
    import training_stack

    rows = training_stack.main(["--repeats", "1", "--out", str(tmp_path)])
    for name in training_stack.COMPILED:
        assert all(
            rows[name][method]["seconds"] > 0
            for method in ("plain compiled", "pergrad, compiled model")
        )
    assert rows["trainer"]["PerExampleTrainer.training_step"]["seconds"] > 0
    text = (tmp_path / "stack.md").read_text()
    assert "torch.compile" in text and "training_step / backward" in text and "fails" not in text


def test_the_module_db_count_runs_on_one_module():
    import module_db

    found = module_db.main(["--modules", "nn.PReLU"])
    assert found["samples"] == {"exact, per layer": 8} and not found["failures"]


def test_the_low_precision_check_runs_on_a_small_gpt2():
    import low_precision

    for row in low_precision.main(["--layers", "1", "--width", "64"]):
        assert row["negative sq_mean entries"] == 0
        assert row["largest (grad² - sq_mean) / grad²"] <= 1e-3
