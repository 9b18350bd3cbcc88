"""Micro-batch statistics: the mean of the micro-batch means, and the estimate
``mean_k ĝ_k² + (m − 1)·Var_k(ĝ_k)`` of ``mean_b g_b²`` — exact at ``m = 1``, unbiased for
exchangeable examples, and defined for models pergrad refuses per example."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_distributed import _group_of_one
from torch import nn
from zoo import CASES, CROSS_ENTROPY, reference_grads

import optim
import pergrad


def test_one_example_per_micro_batch_gives_the_per_example_statistics():
    model, inputs, target = CASES["mlp"].build(6)
    reference = reference_grads(model, CROSS_ENTROPY, inputs, target)
    pergrad.MicroBatches(model, CROSS_ENTROPY, size=1).backward(inputs, target)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, reference[name].mean(0), msg=name)
        torch.testing.assert_close(p.grad_stats.sq_mean, reference[name].square().mean(0))
        assert p.grad_stats.count == 6


def _mean_loss(output, target):
    return output.squeeze(1)  # ℓ_b = w·x_b: g_b = x_b


@settings(max_examples=3, deadline=None, database=None)
@given(size=st.integers(2, 4), count=st.integers(2, 4), seed=st.integers(0, 2**16))
def test_the_estimate_is_unbiased_for_gradients_of_known_mean_and_covariance(size, count, seed):
    """``g_b = x_b ~ N(μ, LLᵀ)``: over 2,000 batches the estimate's mean is ``μ² + diag(LLᵀ)``
    within 5 standard errors."""
    generator = torch.Generator().manual_seed(seed)
    mean = torch.randn(3, generator=generator, dtype=torch.float64)
    factor = torch.randn(3, 3, generator=generator, dtype=torch.float64)
    model = nn.Linear(3, 1, bias=False).double()
    micro = pergrad.MicroBatches(model, _mean_loss, size=size)
    draws = []
    for _ in range(2000):
        x = mean + torch.randn(size * count, 3, generator=generator, dtype=torch.float64) @ factor.T
        micro.backward(x, torch.zeros(len(x), dtype=torch.float64))
        draws.append(model.weight.grad_stats.sq_mean[0].clone())
        micro.zero_grad()
    draws = torch.stack(draws)
    truth = mean.square() + (factor @ factor.T).diagonal()
    error = (draws.mean(0) - truth).abs()
    assert bool((error <= 5 * draws.std(0) / len(draws) ** 0.5).all()), (error, truth)


def _batchnorm_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3)).double()


def test_batchnorm_in_training_mode_gets_statistics_from_its_micro_batches():
    """Per example pergrad refuses it; in micro-batches of 4 each normalizes over its own, and
    the statistics are those of the micro-batch means, written out here."""
    model = _batchnorm_net()
    x, y = torch.randn(12, 4, dtype=torch.float64), torch.randint(0, 3, (12,))
    means = []
    for k in range(3):
        model.zero_grad()
        CROSS_ENTROPY(model(x[4 * k : 4 * k + 4]), y[4 * k : 4 * k + 4]).mean().backward()
        means.append({n: p.grad.clone() for n, p in model.named_parameters()})
    model.zero_grad(set_to_none=True)
    pergrad.MicroBatches(model, CROSS_ENTROPY, size=4).backward(x, y)
    for name, p in model.named_parameters():
        g = torch.stack([m[name] for m in means])
        expected = g.square().mean(0) + 3 * g.var(0)
        torch.testing.assert_close(p.grad, g.mean(0), msg=name)
        torch.testing.assert_close(p.grad_stats.sq_mean, expected.clamp(min=0), msg=name)


def test_two_calls_accumulate_like_one_and_optim_takes_the_statistics():
    model = _batchnorm_net()
    x, y = torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 3, (16,))
    micro = pergrad.MicroBatches(model, CROSS_ENTROPY, size=2)
    micro.backward(x[:8], y[:8])
    micro.backward(x[8:], y[8:])
    assert model[0].weight.grad_stats.count == 16
    before = model[0].weight.detach().clone()
    optim.Adam(model.parameters(), lr=1e-2).step()
    assert not torch.equal(before, model[0].weight)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda m, x, y: m.backward(x[:7], y[:7]), pergrad.InputError, "multiple of it"),
        (lambda m, x, y: m.backward(x[:4], y[:4]), pergrad.InputError, "two or more"),
        (
            lambda m, x, y: pergrad.MicroBatches(m.model, CROSS_ENTROPY, size=0),
            ValueError,
            "Invalid size",
        ),
    ],
    ids=["not a multiple", "one micro-batch", "size 0"],
)
def test_bad_input_is_refused_and_changes_nothing(call, error, match):
    model = _batchnorm_net()
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
    micro = pergrad.MicroBatches(model, CROSS_ENTROPY, size=4)
    micro.backward(x, y)
    before = {
        n: (p.grad.clone(), p.grad_stats.sq_mean.clone()) for n, p in model.named_parameters()
    }
    with pytest.raises(error, match=match):
        call(micro, x, y)
    for name, p in model.named_parameters():
        assert torch.equal(p.grad, before[name][0]) and torch.equal(
            p.grad_stats.sq_mean, before[name][1]
        )


def test_a_process_group_sums_every_ranks_micro_batches():
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
    alone = _batchnorm_net()
    pergrad.MicroBatches(alone, CROSS_ENTROPY, size=2).backward(x, y)
    model = _batchnorm_net()
    with _group_of_one() as group:
        pergrad.MicroBatches(model, CROSS_ENTROPY, size=2, process_group=group).backward(x, y)
    for (name, p), q in zip(model.named_parameters(), alone.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
        torch.testing.assert_close(p.grad_stats.sq_mean, q.grad_stats.sq_mean, msg=name)
