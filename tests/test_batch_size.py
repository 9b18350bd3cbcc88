"""The adaptive batch size: the schedule follows the noise scale within its bounds, the
sampler serves every example once per epoch whatever the sizes, and both resume bit for bit."""

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from literal import feed
from torch import nn

import optim
import pergrad


def _schedule(**options) -> tuple[optim.BatchSizeSchedule, nn.Parameter]:
    param = nn.Parameter(torch.zeros(20, dtype=torch.float64))
    opt = optim.SGD([param], lr=0.0)  # metric 1; lr 0 keeps the gradients' law fixed
    bounds = {"min_size": 2, "max_size": 10**6, "max_growth": 1e9, "horizon": math.inf}
    return optim.BatchSizeSchedule(opt, **{**bounds, **options}), param


@given(
    noise_scale=st.floats(2.0, 60.0),
    batch=st.integers(8, 64),
    seed=st.integers(0, 2**16),
)
@settings(max_examples=12, deadline=None)
def test_the_schedule_follows_the_noise_scale_of_gradients_of_known_law(noise_scale, batch, seed):
    """Per-example gradients ``G + σ·z`` in 20 dimensions have ``B_noise = 20σ²/|G|²``; over
    a few hundred times that many examples the smoothed estimate finds it, and the proposal
    has grown to it."""
    gen = torch.Generator().manual_seed(seed)
    mean = torch.randn(20, generator=gen, dtype=torch.float64)
    mean = mean / mean.norm()  # |G|² = 1
    sigma = (noise_scale / 20) ** 0.5
    schedule, param = _schedule()
    for _ in range(math.ceil(300 * noise_scale / batch)):
        noise = torch.randn(batch, 20, generator=gen, dtype=torch.float64)
        feed(param, mean + sigma * noise)
        schedule.step()
    assert schedule.critical_batch == pytest.approx(noise_scale, rel=0.25)
    assert schedule.size >= math.floor(schedule.critical_batch)


@given(
    sizes=st.lists(st.integers(2, 40), min_size=1, max_size=30),
    bounds=st.tuples(st.integers(2, 16), st.integers(16, 300)),
    growth=st.floats(1.0, 4.0),
    powers=st.booleans(),
    seed=st.integers(0, 2**16),
)
@settings(max_examples=40, deadline=None)
def test_the_proposal_keeps_its_bounds(sizes, bounds, growth, powers, seed):
    """Whatever the statistics: within [min_size, max_size], never shrinking, at most
    max_growth times the last size, a power of two above min_size where asked."""
    low, high = bounds
    schedule, param = _schedule(
        min_size=low, max_size=high, max_growth=growth, powers_of_two=powers, horizon=50
    )
    gen = torch.Generator().manual_seed(seed)
    last = schedule.size
    assert last == low
    for batch in sizes:
        scale = torch.rand((), generator=gen).item() * 4
        feed(param, scale * torch.randn(batch, 20, generator=gen, dtype=torch.float64) + 0.3)
        size = schedule.step()
        assert low <= size <= high
        assert last <= size <= max(last, math.floor(last * growth))
        if powers and size > last:
            assert size & (size - 1) == 0
        last = size


class _Fixed:
    """Stands in for a schedule in the sampler: its size is set by the test."""

    def __init__(self, size: int):
        self.size, self.min_size = size, 1


@given(
    dataset=st.integers(1, 300),
    sizes=st.lists(st.integers(1, 70), min_size=1, max_size=50),
    epochs=st.integers(1, 3),
)
@settings(max_examples=40, deadline=None)
def test_the_sampler_serves_every_example_once_per_epoch_whatever_the_sizes(dataset, sizes, epochs):
    schedule = _Fixed(sizes[0])
    sampler = optim.AdaptiveBatchSampler.__new__(optim.AdaptiveBatchSampler)
    optim.AdaptiveBatchSampler.__init__(sampler, dataset, _schedule()[0], seed=3)
    sampler.schedule = schedule
    for epoch in range(epochs):
        served, k = [], 0
        for batch in sampler:
            assert len(batch) == min(schedule.size, dataset - len(served))
            served += batch
            k += 1
            schedule.size = sizes[k % len(sizes)]
        assert sorted(served) == list(range(dataset))
        assert sampler.epoch == epoch + 1


def test_ranks_get_disjoint_shares_of_the_same_batches():
    schedule, _ = _schedule(min_size=4)
    shares = [
        list(optim.AdaptiveBatchSampler(50, schedule, seed=1, rank=r, world_size=2))
        for r in range(2)
    ]
    whole = list(optim.AdaptiveBatchSampler(50, schedule, seed=1))
    assert [a + b for a, b in zip(*shares)] != whole  # interleaved, not halves
    assert [sorted(a + b) for a, b in zip(*shares)] == [sorted(b) for b in whole]


def _train(steps: int, state=None):
    """An MLP on random data with Adam, the schedule and the sampler; returns the states
    after ``steps`` steps (resuming from ``state`` if given), the sizes and the weights."""
    torch.manual_seed(0)
    x, y = torch.randn(200, 6, dtype=torch.float64), torch.randint(0, 3, (200,))
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    opt = optim.Adam(model.parameters(), lr=1e-2, grad_horizon=50, sq_horizon=500)
    schedule = optim.BatchSizeSchedule(opt, min_size=4, max_size=64, horizon=100)
    sampler = optim.AdaptiveBatchSampler(200, schedule, seed=5)
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        sampler.load_state_dict(state["sampler"])
    step = optim.TrainingStep(model, nn.CrossEntropyLoss(reduction="none"), opt)
    sizes, done = [], 0
    while done < steps:
        for index in sampler:
            step(x[index], y[index])
            sizes.append(schedule.step())
            done += 1
            if done == steps:
                break
    saved = {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "schedule": schedule.state_dict(),
        "sampler": sampler.state_dict(),
    }
    return copy.deepcopy(saved), sizes, [p.detach().clone() for p in model.parameters()]


def test_schedule_sampler_and_optimizer_resume_bit_for_bit():
    _, sizes, straight = _train(60)
    halfway, first, _ = _train(25)
    _, rest, resumed = _train(35, state=halfway)
    assert first + rest == sizes
    assert len(set(sizes)) > 1  # the size did change along the way
    for a, b in zip(straight, resumed):
        assert torch.equal(a, b)


def test_a_step_without_statistics_is_refused_and_changes_nothing():
    schedule, param = _schedule(min_size=4)
    feed(param, torch.randn(8, 20, dtype=torch.float64))
    schedule.step()
    before = schedule.state_dict()
    pergrad.zero_grad([param])
    with pytest.raises(pergrad.InputError, match="after optimizer.step\\(\\) and before zero_grad"):
        schedule.step()
    assert schedule.state_dict() == before


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"min_size": 0, "max_size": 8}, "Invalid min_size"),
        ({"min_size": 16, "max_size": 8}, "max_size >= min_size"),
        ({"min_size": 4, "max_size": 8, "max_growth": 0.5}, "max_growth"),
        ({"min_size": 4, "max_size": 8, "horizon": 0}, "horizon"),
    ],
)
def test_bad_bounds_are_refused_naming_the_argument(options, match):
    param = nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match=match):
        optim.BatchSizeSchedule(optim.SGD([param], lr=0.1), **options)


def test_the_schedule_needs_an_optim_optimizer():
    param = nn.Parameter(torch.zeros(3))
    with pytest.raises(TypeError, match="optim optimizer"):
        optim.BatchSizeSchedule(torch.optim.SGD([param], lr=0.1), min_size=2, max_size=8)
