"""What ``backward`` leaves: the mean in ``p.grad``, ``(n, mean of squares)`` beside it."""

import pytest
import torch
from zoo import ALL_MODES, ATOL, CASES, CROSS_ENTROPY, RTOL, reference_grads

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
