"""The examples' quick paths, on tiny settings: files appear, the JSON has its documented shape,
and the invariant optimizer's curves lie closer together than the standard one's."""

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

import batch_invariance  # noqa: E402
import wrap_your_model  # noqa: E402


def test_batch_invariance_writes_table_png_and_json(tmp_path, capsys):
    summary = batch_invariance.main(
        [
            "--quick",
            "--batch-sizes",
            "4",
            "32",
            "--examples",
            "1500",
            "--points",
            "5",
            "--no-progress",
            "--sgd",
            "--out",
            str(tmp_path),
        ]
    )
    assert (tmp_path / "loss.png").stat().st_size > 10_000
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    assert set(summary) == {"invariant", "standard", "torch_sqrt", "sgd"}
    for entry in summary.values():
        assert set(entry) == {"runs", "spread"}
        assert set(entry["runs"]) == {"4", "32"}
        for run in entry["runs"].values():
            assert set(run) == {"train_loss", "test_acc"}
            assert 0 <= run["test_acc"] <= 1 and run["train_loss"] > 0
        losses = [run["train_loss"] for run in entry["runs"].values()]
        assert entry["spread"] == pytest.approx(max(losses) / min(losses))
    assert summary["invariant"]["spread"] < summary["standard"]["spread"]
    printed = capsys.readouterr().out
    assert "invariant" in printed and "spread" in printed and "loss.png" in printed


def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit):
        batch_invariance.parse(["--help"])
    text = capsys.readouterr().out
    for option in ("--batch-sizes", "--examples", "--lr", "--quick", "--out", "--sgd"):
        assert option in text


def test_wrap_your_model_resumes_the_same_curve(tmp_path):
    straight, resumed = wrap_your_model.main(
        ["--steps", "12", "--checkpoint", str(tmp_path / "checkpoint.pt")]
    )
    assert len(resumed) == 6
    assert resumed == straight  # bit for bit
    assert straight[-1] < straight[0]
