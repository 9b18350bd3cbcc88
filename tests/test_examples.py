"""The examples' quick paths, on tiny settings: files appear, the JSON has its documented shape,
and the invariant optimizer's curves lie closer together than the standard one's."""

import json
import sys
from pathlib import Path

import pytest
import torch

import pergrad

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

import adaptive_batch  # noqa: E402
import batch_invariance  # noqa: E402
import paired  # noqa: E402
import tasks  # noqa: E402
import wrap_your_model  # noqa: E402

CURVES = {"invariant", "invariant_gain", "invariant_32", "standard", "torch_sqrt", "torch_sde"}


@pytest.mark.parametrize(
    "data, batch_sizes, examples, optimizers",
    [
        ("digits", ["4", "32"], "1500", {*CURVES, "sgd"}),
        ("text", ["8", "128"], "2048", CURVES),
    ],
)
def test_batch_invariance_writes_table_png_and_json(
    data, batch_sizes, examples, optimizers, tmp_path, capsys
):
    argv = ["--data", data, "--quick", "--batch-sizes", *batch_sizes, "--examples", examples]
    argv += ["--points", "5", "--no-progress", "--out", str(tmp_path)]
    summary = batch_invariance.main(argv + (["--sgd"] if "sgd" in optimizers else []))
    assert (tmp_path / "loss.png").stat().st_size > 10_000
    assert (tmp_path / "noise.png").stat().st_size > 10_000
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    assert set(summary) == optimizers
    for entry in summary.values():
        assert set(entry) == {"runs", "spread"}
        assert set(entry["runs"]) == set(batch_sizes)
        for run in entry["runs"].values():
            assert set(run) == {"train_loss", "test_loss", "test_acc", "curve", "noise"}
            assert run["curve"][-1] == [int(examples), run["train_loss"]]
            assert 0 <= run["test_acc"] <= 1 and run["train_loss"] > 0 and run["test_loss"] > 0
        losses = [run["train_loss"] for run in entry["runs"].values()]
        assert entry["spread"] == pytest.approx(max(losses) / min(losses))
    assert summary["invariant"]["spread"] < summary["standard"]["spread"]
    printed = capsys.readouterr().out
    assert "invariant" in printed and "spread" in printed and "loss.png" in printed


def test_tune_writes_the_best_lr_the_transfer_and_the_lr_plot(tmp_path, capsys):
    argv = ["--tune", "--quick", "--batch-sizes", "8", "32", "--examples", "600", "--seeds", "1"]
    argv += ["--lr-grid", "3e-4", "3e-3", "--points", "3", "--no-progress", "--out", str(tmp_path)]
    summary = batch_invariance.main(argv)
    assert json.loads((tmp_path / "tune.json").read_text()) == summary
    assert (tmp_path / "lr.png").stat().st_size > 10_000
    assert set(summary) == {*batch_invariance.OURS, *batch_invariance.TORCH}
    for entry in summary.values():
        assert set(entry["best"]) == set(entry["transfer"]) == set(entry["grid"]) == {"8", "32"}
        for b, best in entry["best"].items():
            assert best["lr"] in (3e-4, 3e-3)
            assert best["loss"] == min(v for v in entry["grid"][b].values() if v is not None)
            assert entry["transfer"][b] >= 1
        assert entry["transfer"]["32"] == 1  # the reference transfers to itself
        assert entry["transfer_std"] == {"8": 0.0, "32": 0.0}  # one seed
    assert "transfer" in capsys.readouterr().out


def test_tune_averages_over_seeds_and_says_how_far_they_spread(tmp_path):
    """Each seed draws its own weights and order; a cell is their mean and sample standard
    deviation, and transfer is each seed's, averaged."""
    argv = ["--tune", "--quick", "--batch-sizes", "8", "32", "--examples", "300", "--seeds", "2"]
    argv += ["--lr-grid", "3e-4", "3e-3", "--points", "2", "--no-progress", "--out", str(tmp_path)]
    summary = batch_invariance.main(argv)
    runs = batch_invariance.run(batch_invariance._task("digits", 0), batch_invariance.parse(argv))
    for name, entry in summary.items():
        for b, cells in runs[name].items():
            for lr, per_seed in cells.items():
                losses = [r["test_loss"] for r in per_seed]
                assert len(losses) == 2 and losses[0] != losses[1]  # seeds differ
                assert entry["grid"][str(b)][f"{lr:g}"] == pytest.approx(sum(losses) / 2)
                spread = abs(losses[0] - losses[1]) / 2**0.5  # the sample std of two
                assert entry["grid_std"][str(b)][f"{lr:g}"] == pytest.approx(spread)
                assert entry["grid_seeds"][str(b)][f"{lr:g}"] == losses  # for paired tests
        assert entry["transfer_std"]["32"] == 0.0 and entry["transfer"]["32"] == 1
    assert (tmp_path / "lr.png").stat().st_size > 10_000
    found = paired.main([str(tmp_path / "tune.json"), "invariant", "torch_sde"])
    for b in ("8", "32"):
        ours, theirs = summary["invariant"], summary["torch_sde"]
        a = ours["grid_seeds"][b][f"{ours['best'][b]['lr']:g}"]
        t = theirs["grid_seeds"][b][f"{theirs['best'][b]['lr']:g}"]
        assert found[b] == pytest.approx([(x - y) / y for x, y in zip(a, t)])
    carried = paired.main(
        [str(tmp_path / "tune.json"), "invariant", "torch_sde", "--tuned-at", "32"]
    )
    for b in ("8", "32"):
        per_seed = []
        for k in range(2):
            losses = []
            for entry in (summary["invariant"], summary["torch_sde"]):
                at_32 = entry["grid_seeds"]["32"]
                lr = min(at_32, key=lambda lr: at_32[lr][k])
                losses.append(entry["grid_seeds"][b][lr][k])
            per_seed.append(losses[0] / losses[1] - 1)
        assert carried[b] == pytest.approx(per_seed)
    del summary["torch_sde"]["grid_seeds"]
    (tmp_path / "old.json").write_text(json.dumps(summary))
    with pytest.raises(ValueError, match="grid_seeds"):
        paired.main([str(tmp_path / "old.json"), "invariant", "torch_sde"])
    with pytest.raises(SystemExit):
        paired.main([str(tmp_path / "missing.json"), "invariant", "torch_sde"])


def test_optimizers_choose_what_runs(tmp_path):
    argv = ["--tune", "--batch-sizes", "8", "32", "--examples", "200", "--seeds", "1"]
    argv += ["--lr-grid", "1e-3", "--no-progress", "--out", str(tmp_path)]
    summary = batch_invariance.main([*argv, "--optimizers", "torch_sde", "sgd"])
    assert list(summary) == ["torch_sde", "sgd"]
    with pytest.raises(SystemExit):
        batch_invariance.parse(["--optimizers", "adamw"])
    with pytest.raises(SystemExit):
        batch_invariance.parse(["--optimizers", "invariant", "--sgd"])


def test_seeds_need_tune():
    with pytest.raises(SystemExit):
        batch_invariance.parse(["--seeds", "2"])


def test_the_torch_baselines_follow_their_published_rules():
    """From B = 32 to 128 (κ = 4): Malladi et al.'s rule scales lr by 2, 1 − β by 4 and ε by
    1/2; the half-life rule raises β to the 4th; every rule is torch_sqrt's at B = 32."""
    args = batch_invariance.parse(["--grad-horizon", "320", "--sq-horizon", "3200"])
    param = [torch.nn.Parameter(torch.zeros(1))]

    def made(name, batch):
        return batch_invariance.make_optimizer(name, param, batch, 1e-4, args).defaults

    at_32 = made("torch_sqrt", 32)
    assert at_32["betas"] == pytest.approx((0.9, 0.99)) and at_32["lr"] == pytest.approx(32e-4)
    for name in ("torch_sde", "torch_halflife"):
        assert made(name, 32)["betas"] == pytest.approx(at_32["betas"])
        assert made(name, 32)["eps"] == pytest.approx(at_32["eps"])
    sde, halflife = made("torch_sde", 128), made("torch_halflife", 128)
    assert sde["lr"] == pytest.approx(64e-4) == halflife["lr"]
    assert sde["betas"] == pytest.approx((0.6, 0.96)) and sde["eps"] == pytest.approx(0.5e-8)
    assert halflife["betas"] == pytest.approx((0.9**4, 0.99**4)) and halflife["eps"] == 1e-8


@pytest.mark.parametrize("linear", ["standard", "invariant"])
def test_our_square_root_rule_steps_as_the_linear_one_at_the_reference_batch_size(linear):
    """``standard_sqrt`` and ``invariant_sqrt`` are ``optim.Adam(batch_scaling="sqrt")`` with lr
    and ε converted so that at B = 32 they take ``standard``'s and ``invariant``'s step."""
    args = batch_invariance.parse([])
    per_example = torch.randn(32, 5, generator=torch.Generator().manual_seed(0))
    steps = {}
    for name in (linear, f"{linear}_sqrt"):
        param = torch.nn.Parameter(torch.zeros(5))
        opt = batch_invariance.make_optimizer(name, [param], 32, 1e-3, args)
        pergrad.zero_grad([param])
        param.grad = per_example.mean(0)
        param.grad_stats = pergrad.GradStats(32, per_example.square().mean(0))
        opt.step()
        steps[name] = param.detach()
    torch.testing.assert_close(steps[f"{linear}_sqrt"], steps[linear])
    assert not torch.equal(steps[linear], torch.zeros(5))


@pytest.mark.parametrize("batch", [8, 128])
def test_with_adams_bias_correction_our_square_root_rule_is_torch_sde(batch):
    """``--bias-correction exponential`` leaves ``standard_sqrt`` and ``torch_sde`` one
    optimizer (Malladi's rule) at every B, so a gap between them is the warm-up's."""
    argv = ["--examples", "1024", "--points", "4", "--no-progress"]
    args = batch_invariance.parse([*argv, "--bias-correction", "exponential"])
    task = batch_invariance._task("digits", 0)
    order = batch_invariance.example_order(len(task.train[1]), args.examples, 0)
    quiet = batch_invariance._NoProgress()
    runs = {
        name: batch_invariance.train(task, name, batch, order, args, quiet, lr=1e-3)
        for name in ("standard_sqrt", "torch_sde")
    }
    ours, theirs = ([loss for _, loss in runs[n]["curve"]] for n in runs)
    assert ours == pytest.approx(theirs, rel=1e-4)
    uniform = batch_invariance.parse(argv)
    warm_up = batch_invariance.train(task, "standard_sqrt", batch, order, uniform, quiet, 1e-3)
    assert [loss for _, loss in warm_up["curve"]] != pytest.approx(theirs, rel=1e-4)


def test_digits_bn_trains_a_batchnorm_network_from_micro_batches(tmp_path):
    """The BatchNorm CNN runs through pergrad.MicroBatches for every optimizer (per-example
    gradients of training-mode BatchNorm are not defined) and learns."""
    argv = ["--data", "digits_bn", "--batch-sizes", "8", "32", "--examples", "640"]
    argv += ["--points", "2", "--no-progress", "--out", str(tmp_path)]
    summary = batch_invariance.main(argv)
    assert set(summary) == CURVES
    for entry in summary.values():
        for run in entry["runs"].values():
            assert run["test_acc"] > 0.5  # ten classes: chance is 0.1
    model = tasks.digits_bn_task(0).make_model()
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())


def test_jobs_run_the_same_runs_in_several_processes(tmp_path):
    argv = ["--tune", "--quick", "--batch-sizes", "8", "32", "--examples", "200", "--no-progress"]
    argv += ["--lr-grid", "3e-4", "3e-3", "--points", "2", "--seeds", "1"]
    alone = batch_invariance.main([*argv, "--out", str(tmp_path / "1")])
    shared = batch_invariance.main([*argv, "--out", str(tmp_path / "2"), "--jobs", "2"])
    assert list(shared) == list(alone)
    for name, entry in alone.items():
        for b, grid in entry["grid"].items():
            assert list(shared[name]["grid"][b]) == list(grid)  # the command line's order
            assert shared[name]["grid"][b] == pytest.approx(grid, rel=1e-4)  # threads differ


def test_jobs_need_the_task_of_data():
    task = tasks.text_task(seed=0, sequences=100, curve_examples=8)
    with pytest.raises(ValueError, match="--jobs"):
        batch_invariance.main(["--jobs", "2", "--no-progress"], task=task)


def test_tune_needs_the_reference_batch_size():
    with pytest.raises(SystemExit):
        batch_invariance.parse(["--tune", "--batch-sizes", "8", "64"])


def test_text_task_is_next_character_prediction():
    task = tasks.text_task(seed=0, sequences=100, curve_examples=8)
    (x, y), (x_test, _) = task.train, task.test
    assert x.shape == y.shape == (80, tasks.SEQUENCE_LENGTH) and len(x_test) == 20
    assert torch.equal(x[:, 1:], y[:, :-1])  # the target is the input shifted by one
    model = task.make_model()
    logits = model(x[:3])
    assert logits.shape == (3, tasks.SEQUENCE_LENGTH, len(tasks.VOCABULARY))
    assert task.loss_fn(logits, y[:3]).shape == (3,)  # one loss per sequence
    changed = x[:1].clone()
    changed[0, -1] = (changed[0, -1] + 1) % len(tasks.VOCABULARY)
    assert torch.equal(model(changed)[0, :-1], logits[0, :-1])  # causal: no peeking ahead


def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit):
        batch_invariance.parse(["--help"])
    text = capsys.readouterr().out
    for option in (
        "--data",
        "--batch-sizes",
        "--examples",
        "--lr",
        "--quick",
        "--out",
        "--sgd",
        "--tune",
        "--lr-grid",
    ):
        assert option in text


def test_wrap_your_model_resumes_the_same_curve(tmp_path):
    straight, resumed = wrap_your_model.main(
        ["--steps", "12", "--checkpoint", str(tmp_path / "checkpoint.pt")]
    )
    assert len(resumed) == 6
    assert resumed == straight  # bit for bit
    assert straight[-1] < straight[0]


def test_the_adaptive_batch_showcase_writes_its_json_and_plot(tmp_path, capsys):
    argv = ["--quick", "--examples", "1200", "--points", "10", "--max-size", "64", "--longer", "2"]
    summary = adaptive_batch.main([*argv, "--no-progress", "--out", str(tmp_path)])
    assert json.loads((tmp_path / "adaptive.json").read_text()) == summary
    assert (tmp_path / "adaptive.png").stat().st_size > 10_000
    runs = summary["runs"]
    assert set(runs) == {"fixed_8", "fixed_32", "fixed_128", "fixed_512", "adaptive"}
    assert runs["fixed_8"]["final_test_loss"] == pytest.approx(summary["target_loss"])
    assert runs["fixed_8"]["examples_to_target"] <= 1200  # it reaches its own final loss
    for entry in runs.values():
        assert {"steps_to_target", "examples_to_target", "final_test_loss"} <= set(entry)
    sizes = [size for _, size in runs["adaptive"]["batch_sizes"]]
    seen = [examples for examples, _ in runs["adaptive"]["batch_sizes"]]
    assert sizes[0] == 8 and max(sizes) <= 64 and seen == sorted(seen)
    reached = runs["adaptive"]["examples_to_target"]
    assert sum(sizes) == (2400 if reached is None else reached)  # it ends at the target
    assert "examples to target" in capsys.readouterr().out
