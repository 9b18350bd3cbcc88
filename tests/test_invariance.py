"""MATH.md's invariances as hypothesis properties, end to end through pergrad."""

import copy

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from literal import feed
from torch import nn
from zoo import CROSS_ENTROPY

import optim
import pergrad

SETTINGS = settings(max_examples=15, deadline=None)


def _linear_loss(output, target):
    """Linear in the parameters: per-example gradients do not depend on them."""
    return (output * target).sum(-1)


@SETTINGS
@given(st.integers(1, 12), st.integers(1, 5), st.floats(1e-3, 1.0), st.integers(0, 2**16))
def test_vanilla_sgd_one_step_of_b_equals_b_steps_of_one(batch, width, lr, seed):
    torch.manual_seed(seed)
    model = nn.Linear(width, 2).double()
    x, y = torch.randn(batch, width).double(), torch.randn(batch, 2).double()
    twin = copy.deepcopy(model)
    optim.TrainingStep(model, _linear_loss, optim.SGD(model.parameters(), lr=lr))(x, y)
    step = optim.TrainingStep(twin, _linear_loss, optim.SGD(twin.parameters(), lr=lr))
    for b in range(batch):
        step(x[b : b + 1], y[b : b + 1])
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


def _mlp(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()


@SETTINGS
@given(
    st.sampled_from([optim.Adam, optim.RMSprop]),
    st.integers(1, 50),
    st.integers(1, 500),
    st.integers(0, 2**16),
)
def test_with_one_example_per_step_example_and_batch_moments_agree_exactly(
    kind, grad_horizon, sq_horizon, seed
):
    models = [_mlp(seed), _mlp(seed)]
    steps = [
        optim.TrainingStep(
            m,
            CROSS_ENTROPY,
            kind(
                m.parameters(),
                lr=1e-3,
                grad_horizon=grad_horizon,
                sq_horizon=sq_horizon,
                second_moment=moment,
            ),
            # squares of materialized gradients: with one example, q is ĝ² bit for bit
            # (per-layer rules compute (δ²)ᵀ(a²), equal to (δᵀa)² only up to rounding)
            mode="func",
        )
        for m, moment in zip(models, ["example", "batch"])
    ]
    x, y = torch.randn(10, 4).double(), torch.randint(0, 3, (10,))
    for b in range(10):
        for step in steps:
            step(x[b : b + 1], y[b : b + 1])
    for p, q in zip(*(m.parameters() for m in models)):
        assert torch.equal(p, q)


@SETTINGS
@given(st.integers(1, 64), st.integers(1, 400), st.floats(1e-3, 0.1), st.integers(0, 2**16))
def test_adam_with_large_eps_in_sgd_units_moves_like_momentum_sgd(
    batch, grad_horizon, sgd_lr, seed
):
    gen = torch.Generator().manual_seed(seed)
    stream = [torch.randn(batch, 6, generator=gen, dtype=torch.float64) for _ in range(8)]
    start = torch.randn(6, dtype=torch.float64)
    adam_param, sgd_param = nn.Parameter(start.clone()), nn.Parameter(start.clone())
    adam = optim.Adam.in_sgd_units([adam_param], sgd_lr, eps=1e12, grad_horizon=grad_horizon)
    sgd = optim.SGD([sgd_param], lr=sgd_lr, grad_horizon=grad_horizon)
    for per_example in stream:
        for param, opt in ((adam_param, adam), (sgd_param, sgd)):
            feed(param, per_example)
            opt.step()
    # the two differ by a factor 1 / (1 + √s/ε) on each step, √s/ε ~ 1e-12 here
    torch.testing.assert_close(adam_param, sgd_param, rtol=1e-6, atol=1e-9)


@settings(max_examples=8, deadline=None)
@given(st.sampled_from([1, 4, 16, 64]), st.integers(0, 2**16))
def test_second_moment_settles_at_mu2_plus_sigma2_only_with_per_example_squares(batch, seed):
    gen = torch.Generator().manual_seed(seed)
    mu, sigma, width = 0.5, 2.0, 4000
    params = {
        m: nn.Parameter(torch.zeros(width, dtype=torch.float64)) for m in ("example", "batch")
    }
    opts = {m: optim.Adam([p], lr=0.0, sq_horizon=256, second_moment=m) for m, p in params.items()}
    for _ in range(max(8, 2048 // batch)):
        per_example = mu + sigma * torch.randn(batch, width, generator=gen, dtype=torch.float64)
        for moment, param in params.items():
            feed(param, per_example)
            opts[moment].step()
    settled = {m: opts[m].state[p]["exp_avg_sq"].mean().item() for m, p in params.items()}
    assert abs(settled["example"] / (mu**2 + sigma**2) - 1) < 0.05
    assert abs(settled["batch"] / (mu**2 + sigma**2 / batch) - 1) < 0.05


@SETTINGS
@given(
    st.sampled_from([optim.SGD, optim.RMSprop, optim.Adam]),
    st.integers(2, 12),
    st.randoms(use_true_random=False),
)
def test_any_split_of_a_batch_gives_the_same_step(kind, batch, rng):
    seed = rng.randint(0, 2**16)
    whole, parts = _mlp(seed), _mlp(seed)
    x, y = torch.randn(batch, 4).double(), torch.randint(0, 3, (batch,))
    cuts = sorted(rng.sample(range(1, batch), rng.randint(1, batch - 1)))
    splits = {whole: [(0, batch)], parts: list(zip([0, *cuts], [*cuts, batch]))}
    for model, pieces in splits.items():
        engine, opt = pergrad.PerExample(model, CROSS_ENTROPY), kind(model.parameters(), lr=0.01)
        for _ in range(3):
            opt.zero_grad()
            for start, stop in pieces:
                engine.backward(x[start:stop], y[start:stop])
            opt.step()
    for p, q in zip(whole.parameters(), parts.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)
