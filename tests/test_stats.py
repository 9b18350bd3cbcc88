"""What ``backward`` leaves: the mean in ``p.grad``, ``(n, mean of squares)`` beside it."""

import warnings

import pytest
import torch
from literal import feed
from zoo import ALL_MODES, ATOL, CASES, CROSS_ENTROPY, RTOL, reference_grads

import optim
import pergrad


@pytest.mark.parametrize("mode", sorted(ALL_MODES))
@pytest.mark.parametrize("case", ["mlp", "cnn2d_groupnorm", "tied", "frozen"])
def test_backward_leaves_mean_and_mean_of_squares(case, mode):
    model, inputs, target = CASES[case].build(6)
    expected = reference_grads(model, CROSS_ENTROPY, inputs, target)
    engine = pergrad.PerExample(model, CROSS_ENTROPY, mode=mode, chunk_size=4)
    loss = engine.backward(inputs, target)
    torch.testing.assert_close(loss, CROSS_ENTROPY(model(*inputs), target).mean())
    assert loss.shape == () and not loss.requires_grad
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert p.grad is None and pergrad.grad_stats(p) is None
            continue
        stats = pergrad.grad_stats(p)
        assert stats.count == 6
        torch.testing.assert_close(p.grad, expected[name].mean(0), rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(
            stats.sq_mean, expected[name].square().mean(0), rtol=RTOL, atol=ATOL
        )


def test_mean_gradient_is_what_loss_mean_backward_gives():
    model, inputs, target = CASES["transformer"].build(5)
    CROSS_ENTROPY(model(*inputs), target).mean().backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    pergrad.zero_grad(model.parameters())
    pergrad.PerExample(model, CROSS_ENTROPY).backward(inputs, target)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, plain[n], rtol=RTOL, atol=ATOL)


def test_per_example_losses_are_offered():
    model, inputs, target = CASES["mlp"].build(5)
    engine = pergrad.PerExample(model, CROSS_ENTROPY, chunk_size=2)
    assert engine.last_losses is None
    engine.backward(inputs, target)
    torch.testing.assert_close(engine.last_losses, CROSS_ENTROPY(model(*inputs), target).detach())


def test_zero_grad_clears_mean_and_statistics():
    model, inputs, target = CASES["mlp"].build(5)
    engine = pergrad.PerExample(model, CROSS_ENTROPY)
    engine.backward(inputs, target)
    engine.zero_grad()
    assert all(p.grad is None and not hasattr(p, "grad_stats") for p in model.parameters())
    engine.backward(inputs, target)  # starts afresh, no complaint about a foreign .grad
    assert pergrad.grad_stats(next(model.parameters())).count == 5


def test_backward_works_under_no_grad():
    model, inputs, target = CASES["mlp"].build(3)
    with torch.no_grad():
        pergrad.PerExample(model, CROSS_ENTROPY).backward(inputs, target)
    assert all(p.grad is not None for p in model.parameters())


def test_variance_from_the_statistics():
    model, inputs, target = CASES["mlp"].build(7)
    expected = reference_grads(model, CROSS_ENTROPY, inputs, target)
    pergrad.PerExample(model, CROSS_ENTROPY).backward(inputs, target)
    for name, p in model.named_parameters():
        variance = pergrad.grad_stats(p).variance(p.grad)
        torch.testing.assert_close(
            variance, expected[name].var(0, unbiased=False), rtol=1e-5, atol=1e-12
        )


def test_clip_grad_norm_scales_the_mean_and_the_mean_of_squares_together():
    torch.manual_seed(0)
    per_example = [torch.randn(6, n, dtype=torch.float64) for n in (3, 2)]
    params = [
        torch.nn.Parameter(torch.zeros(g.shape[1:], dtype=torch.float64)) for g in per_example
    ]
    for p, g in zip(params, per_example):
        feed(p, g)
    total = torch.cat([g.mean(0) for g in per_example]).norm()
    assert pergrad.clip_grad_norm_(params, 0.5) == pytest.approx(float(total))
    factor = 0.5 / (float(total) + 1e-6)
    for p, g in zip(params, per_example):  # as if every per-example gradient were scaled
        torch.testing.assert_close(p.grad, (factor * g).mean(0))
        torch.testing.assert_close(p.grad_stats.sq_mean, (factor * g).square().mean(0))
    optim.Adam(params, lr=1e-3).step()  # still their own statistics: accepted


def test_clip_grad_norm_takes_one_tensor_as_torchs_does():
    param = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    feed(param, torch.full((4, 3), 2.0, dtype=torch.float64))
    assert pergrad.clip_grad_norm_(param, 1.0) == pytest.approx(12**0.5)
    assert float(param.grad.norm()) == pytest.approx(1.0, rel=1e-5)


CLIPPED = [(case, "auto") for case in CASES] + [("mlp", "func"), ("tied", "hooks"), ("mlp", "loop")]


@pytest.mark.parametrize(("case", "mode"), CLIPPED, ids=[f"{c}-{m}" for c, m in CLIPPED])
def test_max_example_norm_clips_each_example_before_the_statistics(case, mode):
    model, inputs, target = CASES[case].build(6)
    per_example = reference_grads(model, CROSS_ENTROPY, inputs, target)
    norms = torch.stack([g.flatten(1).square().sum(1) for g in per_example.values()]).sum(0).sqrt()
    limit = float(norms.median())  # about half the examples are clipped
    scale = (limit / norms).clamp(max=1)
    engine = pergrad.PerExample(
        model, CROSS_ENTROPY, mode=mode, max_example_norm=limit, chunk_size=4
    )
    with warnings.catch_warnings():  # a fallback for what the layers leave is exact too
        warnings.simplefilter("ignore", pergrad.FallbackWarning)
        engine.backward(inputs, target)
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        clipped = per_example[name] * scale.view(-1, *[1] * (per_example[name].dim() - 1))
        torch.testing.assert_close(p.grad, clipped.mean(0), rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(
            p.grad_stats.sq_mean, clipped.square().mean(0), rtol=RTOL, atol=ATOL
        )


def test_clipping_linear_layers_on_b_by_in_forms_no_per_example_gradient(monkeypatch):
    """``|g_b|² = |δ_b|²·|a_b|²`` and the moments of ``c_b·δ_b``: the ``Linear`` rule's
    per-example gradients (``B × out × in``) are never formed."""

    def refuse(*_):
        raise AssertionError("formed the per-example gradients of a Linear")

    model, inputs, target = CASES["mlp"].build(16)
    per_example = reference_grads(model, CROSS_ENTROPY, inputs, target)
    monkeypatch.setattr(pergrad.rules.linear, "weight_grads", refuse)
    # verification forms per-example gradients: it is what this test checks instead
    engine = pergrad.PerExample(model, CROSS_ENTROPY, max_example_norm=0.1, verify=False)
    engine.backward(inputs, target)
    assert set(engine.sources.values()) == {"Linear"}
    norms = torch.stack([g.flatten(1).square().sum(1) for g in per_example.values()]).sum(0).sqrt()
    scale = (0.1 / norms).clamp(max=1)
    for name, p in model.named_parameters():
        clipped = per_example[name] * scale.view(-1, *[1] * (per_example[name].dim() - 1))
        torch.testing.assert_close(p.grad_stats.sq_mean, clipped.square().mean(0))
