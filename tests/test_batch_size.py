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
    growth=st.floats(1.0, 3.0),
    powers=st.booleans(),
    seed=st.integers(0, 2**16),
)
@settings(max_examples=40, deadline=None)
def test_the_proposal_keeps_its_bounds(sizes, bounds, growth, powers, seed):
    """Whatever the statistics: within [min_size, max_size], never shrinking, at most
    max_growth times the last size (or one more), a power of two where asked."""
    low, high = bounds
    if powers:
        low, growth = 2 ** math.floor(math.log2(low)), growth + 1
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
        assert last <= size <= max(last + 1, math.floor(last * growth))
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


@pytest.mark.parametrize(("low", "growth"), [(1, 1.5), (4, 1.2), (8, 1.01)])
def test_a_small_growth_limit_still_grows(low, growth):
    """One example more is always allowed, so a size whose growth rounds to nothing moves."""
    schedule, param = _schedule(min_size=low, max_growth=growth)
    gen = torch.Generator().manual_seed(0)
    for _ in range(10):
        feed(param, 3 * torch.randn(16, 20, generator=gen, dtype=torch.float64) + 0.5)
        schedule.step()
    assert schedule.size > low


def test_non_finite_statistics_are_refused_and_change_nothing():
    schedule, param = _schedule(min_size=4)
    feed(param, torch.randn(8, 20, dtype=torch.float64))
    schedule.step()
    before = schedule.state_dict()
    bad = torch.randn(8, 20, dtype=torch.float64)
    bad[0, 0] = math.inf
    feed(param, bad)
    with pytest.raises(FloatingPointError, match="not finite"):
        schedule.step()
    assert schedule.state_dict() == before


def test_a_state_outside_the_bounds_or_not_finite_is_refused():
    schedule, _ = _schedule(min_size=4, max_size=64)
    with pytest.raises(ValueError, match="saved size"):
        schedule.load_state_dict({"size": 128, "seen": 0, "noise": 0.0, "signal": 0.0})
    with pytest.raises(ValueError, match="not a BatchSizeSchedule"):
        schedule.load_state_dict({"size": 8, "seen": 0, "noise": math.nan, "signal": 0.0})
    assert schedule.size == 4


def test_every_rank_has_a_share_of_every_batch_and_epochs_close():
    """An epoch's last examples, fewer than the ranks, join the batch before; a sampler left
    right after its last batch starts the next epoch."""
    schedule, _ = _schedule(min_size=4, max_size=4)
    shares = [list(optim.AdaptiveBatchSampler(9, schedule, rank=r, world_size=4)) for r in range(4)]
    assert all(len(batch) > 0 for share in shares for batch in share)
    assert sorted(i for share in shares for batch in share for i in batch) == list(range(9))
    sampler = optim.AdaptiveBatchSampler(8, schedule)
    first = []
    for batch in sampler:
        first.append(batch)
        if len(first) == 2:
            break  # left after the epoch's last batch, the generator not closed
    second = list(sampler)
    assert sampler.epoch == 2 and len(second) == 2 and second != first


def test_powers_of_two_need_a_power_of_two_start_and_room_to_double():
    with pytest.raises(ValueError, match="powers_of_two"):
        _schedule(min_size=24, powers_of_two=True)
    with pytest.raises(ValueError, match="powers_of_two"):
        _schedule(min_size=8, max_growth=1.5, powers_of_two=True)
