"""The gradient noise scale and the gain ratio: exact identities, unbiasedness against
per-example gradients drawn with a known mean and covariance, and the gain's limits."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from literal import feed

import optim
import pergrad

SETTINGS = settings(max_examples=20, deadline=None)


@SETTINGS
@given(
    batch=st.integers(2, 9),
    width=st.integers(1, 6),
    weighted=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_noise_and_signal_are_the_sample_variance_and_the_corrected_mean(
    batch, width, weighted, seed
):
    gen = torch.Generator().manual_seed(seed)
    per_example = torch.randn(batch, width, generator=gen, dtype=torch.float64) + 0.5
    weight = torch.rand(width, generator=gen, dtype=torch.float64) if weighted else None
    param = torch.nn.Parameter(torch.zeros(width, dtype=torch.float64))
    feed(param, per_example)
    found = pergrad.noise_scale([param], None if weight is None else [weight])
    w = torch.ones(width, dtype=torch.float64) if weight is None else weight
    noise = float((w * per_example.var(0, correction=1)).sum())
    signal = float((w * per_example.mean(0).square()).sum()) - noise / batch
    assert found.count == batch
    assert math.isclose(found.noise, noise, rel_tol=1e-9, abs_tol=1e-12)
    assert math.isclose(found.signal, signal, rel_tol=1e-9, abs_tol=1e-12)


@settings(max_examples=8, deadline=None)
@given(
    batch=st.integers(2, 8),
    mean_scale=st.floats(0.0, 2.0),
    spread=st.floats(0.1, 2.0),
    seed=st.integers(0, 2**16),
)
def test_the_estimates_are_unbiased_for_a_known_mean_and_covariance(
    batch, mean_scale, spread, seed
):
    gen = torch.Generator().manual_seed(seed)
    width, draws = 3, 2000
    mean = mean_scale * torch.randn(width, generator=gen, dtype=torch.float64)
    scale = spread * (0.5 + torch.rand(width, generator=gen, dtype=torch.float64))
    noise, signal = [], []
    param = torch.nn.Parameter(torch.zeros(width, dtype=torch.float64))
    for _ in range(draws):
        feed(param, mean + scale * torch.randn(batch, width, generator=gen, dtype=torch.float64))
        found = pergrad.noise_scale([param])
        noise.append(found.noise)
        signal.append(found.signal)
    for estimates, truth in (
        (noise, float(scale.square().sum())),
        (signal, float(mean.square().sum())),
    ):
        values = torch.tensor(estimates, dtype=torch.float64)
        standard_error = float(values.std()) / math.sqrt(draws)
        assert abs(float(values.mean()) - truth) < 5 * standard_error + 1e-12


KINDS = [optim.SGD, optim.RMSprop, optim.Adam]


@SETTINGS
@given(kind=st.sampled_from(KINDS), batch=st.integers(2, 64), seed=st.integers(0, 2**16))
def test_the_gain_is_the_batch_size_for_pure_noise(kind, batch, seed):
    """Per-example gradients in opposite pairs: their mean is exactly zero, all noise."""
    gen = torch.Generator().manual_seed(seed)
    param = torch.nn.Parameter(torch.zeros(4, dtype=torch.float64))
    opt = kind([param], lr=1e-3, batch_scaling="gain")
    for _ in range(3):
        half = torch.randn(batch // 2, 4, generator=gen, dtype=torch.float64)
        per_example = torch.cat([half, -half])  # an even number of examples, mean zero
        feed(param, per_example)
        opt.step()
        assert opt.gains[-1] == pytest.approx(len(per_example), rel=1e-12)


@SETTINGS
@given(kind=st.sampled_from(KINDS), batch=st.integers(1, 64), seed=st.integers(0, 2**16))
def test_the_gain_is_one_when_every_example_has_the_same_gradient(kind, batch, seed):
    gen = torch.Generator().manual_seed(seed)
    param = torch.nn.Parameter(torch.zeros(4, dtype=torch.float64))
    opt = kind([param], lr=1e-3, batch_scaling="gain")
    for _ in range(3):
        one = torch.randn(1, 4, generator=gen, dtype=torch.float64) + 1
        feed(param, one.expand(batch, 4))
        opt.step()
        assert opt.gains[-1] == pytest.approx(1.0, rel=1e-9)


@SETTINGS
@given(kind=st.sampled_from(KINDS), seed=st.integers(0, 2**16))
def test_with_one_example_per_step_the_gain_gives_the_plain_update(kind, seed):
    gen = torch.Generator().manual_seed(seed)
    start = torch.randn(4, dtype=torch.float64)
    params = [torch.nn.Parameter(start.clone()) for _ in range(2)]
    opts = [kind([params[0]], lr=1e-2), kind([params[1]], lr=1e-2, batch_scaling="gain")]
    for _ in range(6):
        per_example = torch.randn(1, 4, generator=gen, dtype=torch.float64)
        for param, opt in zip(params, opts):
            feed(param, per_example)
            opt.step()
    assert torch.equal(params[0], params[1])
    assert opts[1].gains == [1.0] * 6


def test_the_critical_batch_is_infinite_where_the_signal_estimate_is_not_positive():
    assert pergrad.NoiseScale(1.0, -1.0, 4).critical_batch == math.inf
    assert pergrad.NoiseScale(1.0, 0.0, 4).critical_batch == math.inf
    assert pergrad.NoiseScale(6.0, 2.0, 4).critical_batch == 3.0
