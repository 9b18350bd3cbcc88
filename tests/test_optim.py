"""The optimizers against a literal transcription of MATH.md, and as torch.optim citizens."""

import copy
import io

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from literal import feed, run
from zoo import CASES, CROSS_ENTROPY, mlp

import optim
import pergrad

KINDS = {"sgd": optim.SGD, "rmsprop": optim.RMSprop, "adam": optim.Adam}

OPTIONS = {
    "sgd": [
        {"lr": 0.05},
        {"lr": 0.05, "grad_horizon": 40},
        {"lr": 0.05, "grad_horizon": 7, "weight_decay": 0.1},
        {"lr": 0.05, "grad_horizon": 7, "batch_scaling": "gain", "gain_horizon": 30},
        {"lr": 0.05, "grad_horizon": 7, "batch_scaling": "sqrt"},
        {"lr": 0.05, "grad_horizon": 40, "bias_correction": "exponential"},
    ],
    "rmsprop": [
        {"lr": 0.01},
        {"lr": 0.01, "sq_horizon": 30, "eps": 1e-3},
        {"lr": 0.01, "sq_horizon": 30, "centered": True, "grad_horizon": 20},
        {"lr": 0.01, "sq_horizon": 50, "second_moment": "batch", "weight_decay": 0.01},
        {"lr": 0.001, "sq_horizon": 50, "power": 1.0, "eps": 0.1},
        {"lr": 0.01, "sq_horizon": 30, "centered": True, "batch_scaling": "gain"},
        {"lr": 0.01, "sq_horizon": 300, "batch_scaling": "gain", "gain_horizon": 20},
        {"lr": 0.01, "sq_horizon": 50, "second_moment": "batch", "batch_scaling": "sqrt"},
        {"lr": 0.01, "sq_horizon": 30, "power": 1.0, "eps": 0.1, "second_moment_batch": 4},
        {
            "lr": 0.01,
            "sq_horizon": 30,
            "centered": True,
            "grad_horizon": 20,
            "bias_correction": "exponential",
        },
    ],
    "adam": [
        {"lr": 0.01},
        {"lr": 0.01, "grad_horizon": 16, "sq_horizon": 100},
        {"lr": 0.01, "grad_horizon": 16, "sq_horizon": 100, "second_moment": "batch"},
        {"lr": 0.01, "grad_horizon": 5, "sq_horizon": 60, "weight_decay": 0.2, "eps": 1e-2},
        {"lr": 0.01, "grad_horizon": 16, "sq_horizon": 100, "batch_scaling": "gain"},
        {"lr": 0.01, "sq_horizon": 40, "second_moment": "batch", "batch_scaling": "gain"},
        {"lr": 0.01, "sq_horizon": 500, "batch_scaling": "gain", "gain_horizon": 12},
        {
            "lr": 0.01,
            "grad_horizon": 16,
            "sq_horizon": 100,
            "second_moment": "batch",
            "batch_scaling": "sqrt",
            "eps": 1e-3,
            "weight_decay": 0.1,
        },
        {"lr": 0.01, "sq_horizon": 100, "batch_scaling": "sqrt"},
        {"lr": 0.01, "grad_horizon": 16, "sq_horizon": 100, "second_moment_batch": 32},
        {"lr": 0.01, "sq_horizon": 50, "second_moment_batch": 3, "batch_scaling": "gain"},
        {"lr": 0.01, "sq_horizon": 50, "second_moment_batch": float("inf"), "eps": 1e-2},
        {"lr": 0.01, "grad_horizon": 16, "sq_horizon": 100, "bias_correction": "exponential"},
        {
            "lr": 0.01,
            "grad_horizon": 16,
            "sq_horizon": float("inf"),
            "second_moment": "batch",
            "batch_scaling": "sqrt",
            "bias_correction": "exponential",
        },
        {
            "lr": 0.01,
            "sq_horizon": 40,
            "batch_scaling": "gain",
            "gain_horizon": 12,
            "bias_correction": "exponential",
        },
    ],
}
CASES_ = [(kind, options) for kind, all_options in OPTIONS.items() for options in all_options]


SIZES = (4, 4, 1, 7, 16, 3, 32, 5, 2, 64, 9)


def _sizes(options: dict, sizes=SIZES) -> tuple[int, ...]:
    """``sizes``, with 2 for 1 where ``second_moment_batch`` needs two examples a step."""
    return tuple(max(b, 2) for b in sizes) if "second_moment_batch" in options else sizes


def _stream(seed: int, sizes=SIZES) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    mean = torch.randn(5, generator=gen, dtype=torch.float64)
    return [mean + torch.randn(b, 5, generator=gen, dtype=torch.float64) for b in sizes]


@pytest.mark.parametrize(("kind", "options"), CASES_, ids=[f"{k}-{o}" for k, o in CASES_])
def test_optimizer_follows_math_md_over_a_stream_of_varying_batch_sizes(kind, options):
    stream = _stream(0, _sizes(options))
    phi = torch.randn(5, dtype=torch.float64)
    param = torch.nn.Parameter(phi.clone())
    opt = KINDS[kind]([param], **options)
    for per_example in stream:
        feed(param, per_example)
        opt.step()
    torch.testing.assert_close(
        param.detach(), run(kind, phi, stream, **options), rtol=1e-10, atol=1e-12
    )


@pytest.mark.parametrize("kind", ["rmsprop", "adam"])
def test_in_sgd_units_is_lr_eps_times_eta0(kind):
    stream, phi = _stream(1), torch.randn(5, dtype=torch.float64)
    param = torch.nn.Parameter(phi.clone())
    opt = KINDS[kind].in_sgd_units([param], 0.05, eps=0.3)
    assert opt.defaults["lr"] == pytest.approx(0.015)
    for per_example in stream:
        feed(param, per_example)
        opt.step()
    expected = run(kind, phi, stream, lr=0.015, eps=0.3)
    torch.testing.assert_close(param.detach(), expected, rtol=1e-10, atol=1e-12)


def test_parameter_groups_keep_their_own_hyperparameters():
    a, b = (
        torch.nn.Parameter(torch.zeros(5, dtype=torch.float64)),
        torch.nn.Parameter(torch.zeros(5, dtype=torch.float64)),
    )
    opt = optim.Adam([{"params": [a]}, {"params": [b], "lr": 0.1, "sq_horizon": 8}], lr=0.01)
    stream = _stream(2)
    for per_example in stream:
        feed(a, per_example)
        feed(b, per_example)
        opt.step()
    zero = torch.zeros(5, dtype=torch.float64)
    torch.testing.assert_close(a.detach(), run("adam", zero, stream, lr=0.01))
    torch.testing.assert_close(b.detach(), run("adam", zero, stream, lr=0.1, sq_horizon=8))


def test_schedulers_act_on_lr():
    param = torch.nn.Parameter(torch.zeros(5, dtype=torch.float64))
    opt = optim.SGD([param], lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    stream = _stream(3, sizes=(4, 4, 4))
    expected = torch.zeros(5, dtype=torch.float64)
    for step, per_example in enumerate(stream):
        feed(param, per_example)
        opt.step()
        scheduler.step()
        expected = expected - 0.1 * 0.5**step * per_example.sum(0)
    torch.testing.assert_close(param.detach(), expected)


@pytest.mark.parametrize(("kind", "options"), CASES_, ids=[f"{k}-{o}" for k, o in CASES_])
def test_state_dict_round_trip_continues_bit_for_bit(kind, options):
    stream = _stream(4, _sizes(options))
    first = torch.nn.Parameter(torch.randn(5, dtype=torch.float64))
    second = torch.nn.Parameter(first.detach().clone())
    opt = KINDS[kind]([first], **options)
    for per_example in stream[:5]:
        feed(first, per_example)
        opt.step()
    second.data.copy_(first.detach())
    resumed = KINDS[kind]([second], lr=123.0)  # hyperparameters come from the state dict
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer))
    for per_example in stream[5:]:
        for param, optimizer in ((first, opt), (second, resumed)):
            feed(param, per_example)
            optimizer.step()
        assert torch.equal(first, second)


@pytest.mark.parametrize(("kind", "options"), CASES_, ids=[f"{k}-{o}" for k, o in CASES_])
def test_a_run_with_a_scheduler_resumes_bit_for_bit(kind, options):
    """A checkpoint of an optimizer and its scheduler, as trainers write them (groups carry
    the scheduler's initial_lr and keys torch adds), loads and continues the same run."""
    stream = _stream(4, _sizes(options))

    def build(param):
        opt = KINDS[kind]([param], **options)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.9**step)

    first = torch.nn.Parameter(torch.randn(5, dtype=torch.float64))
    second = torch.nn.Parameter(first.detach().clone())
    opt, scheduler = build(first)
    for per_example in stream[:5]:
        feed(first, per_example)
        opt.step()
        scheduler.step()
    saved = copy.deepcopy({"optimizer": opt.state_dict(), "scheduler": scheduler.state_dict()})
    saved["optimizer"]["param_groups"][0]["differentiable"] = False  # what trainers may add
    second.data.copy_(first.detach())
    resumed, resumed_scheduler = build(second)
    resumed.load_state_dict(saved["optimizer"])
    resumed_scheduler.load_state_dict(saved["scheduler"])
    assert resumed.param_groups[0]["initial_lr"] == options["lr"]
    assert resumed.gains == opt.gains
    for per_example in stream[5:]:
        runs = ((first, opt, scheduler), (second, resumed, resumed_scheduler))
        for param, optimizer, sched in runs:
            feed(param, per_example)
            optimizer.step()
            sched.step()
        assert torch.equal(first, second)
    assert resumed.gains == opt.gains


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_a_float32_run_with_gain_scaling_resumes_bit_for_bit(kind):
    """The gain's smoothed estimates are float64 whatever the parameters' dtype, also after a
    load (torch casts every state tensor to its parameter's dtype)."""
    stream = [g.float() for g in _stream(4)]
    first = torch.nn.Parameter(torch.randn(5))
    second = torch.nn.Parameter(first.detach().clone())
    opt = KINDS[kind]([first], lr=0.01, batch_scaling="gain", gain_horizon=20)
    for per_example in stream[:4]:
        feed(first, per_example)
        opt.step()
    saved = copy.deepcopy(opt.state_dict())
    second.data.copy_(first.detach())
    resumed = KINDS[kind]([second], lr=0.01)
    resumed.load_state_dict(saved)
    assert resumed.state[second]["noise"].dtype == torch.float64
    for per_example in stream[4:]:
        for param, optimizer in ((first, opt), (second, resumed)):
            feed(param, per_example)
            optimizer.step()
        assert torch.equal(first, second)
    assert resumed.gains[-len(stream[4:]) :] == opt.gains[-len(stream[4:]) :]


def test_zero_grad_clears_grad_and_statistics():
    model, inputs, target = CASES["mlp"].build(4)
    opt = optim.Adam(model.parameters(), lr=1e-3)
    pergrad.PerExample(model, CROSS_ENTROPY).backward(inputs, target)
    opt.zero_grad()
    assert all(p.grad is None and pergrad.grad_stats(p) is None for p in model.parameters())


def test_parameters_without_grad_are_skipped():
    a = torch.nn.Parameter(torch.ones(3))
    b = torch.nn.Parameter(torch.ones(3))
    feed(a, torch.ones(2, 3))
    optim.Adam([a, b], lr=0.1).step()
    assert torch.equal(b.detach(), torch.ones(3)) and not torch.equal(a.detach(), torch.ones(3))


def test_training_step_is_zero_grad_backward_step():
    model, inputs, target = CASES["mlp"].build(6)
    twin, _, _ = CASES["mlp"].build(6)
    step = optim.TrainingStep(model, CROSS_ENTROPY, optim.Adam(model.parameters(), lr=1e-2))
    engine, opt = pergrad.PerExample(twin, CROSS_ENTROPY), optim.Adam(twin.parameters(), lr=1e-2)
    for _ in range(3):
        loss = step(inputs, target)
        opt.zero_grad()
        expected = engine.backward(inputs, target)
        opt.step()
        torch.testing.assert_close(loss, expected)
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q)


@pytest.mark.parametrize("batch", [1, 8, 32])
def test_momentum_sgd_converts_to_torch_sgd_past_the_warm_up(batch):
    grad_horizon, lr = 256, 0.01
    warm_up = grad_horizon // batch + 1  # after it, w_g = B / N_g⁰ at every step
    stream = _stream(5, sizes=(batch,) * (warm_up + 30))
    ours = torch.nn.Parameter(torch.randn(5, dtype=torch.float64))
    opt = optim.SGD([ours], lr=lr, grad_horizon=grad_horizon)
    for per_example in stream[:warm_up]:
        feed(ours, per_example)
        opt.step()
    torch_args = optim.convert.to_torch_sgd(lr, grad_horizon, batch)
    theirs = torch.nn.Parameter(ours.detach().clone())
    reference = torch.optim.SGD([theirs], **torch_args)
    n_g = max(1, grad_horizon / batch)
    reference.state[theirs]["momentum_buffer"] = n_g * opt.state[ours]["exp_avg"].clone()
    for per_example in stream[warm_up:]:
        feed(ours, per_example)
        opt.step()
        theirs.grad = per_example.mean(0)
        reference.step()
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("batch", [1, 16, 100])
def test_conversions_round_trip(batch):
    convert = optim.convert
    sgd = convert.from_torch_sgd(**convert.to_torch_sgd(0.01, 640, batch), batch_size=batch)
    assert sgd == pytest.approx({"lr": 0.01, "grad_horizon": max(640, batch)})
    adam = convert.from_torch_adam(
        **convert.to_torch_adam(1e-4, 320, 32_000, batch), batch_size=batch
    )
    assert adam == pytest.approx(
        {"lr": 1e-4, "grad_horizon": max(320, batch), "sq_horizon": 32_000}
    )
    rms = convert.from_torch_rmsprop(
        **convert.to_torch_rmsprop(1e-4, 1000, batch), batch_size=batch
    )
    assert rms == pytest.approx({"lr": 1e-4, "sq_horizon": 1000})
    assert convert.to_torch_adam(1e-4, 320, 32_000, 32)["betas"] == pytest.approx((0.9, 0.999))


@pytest.mark.parametrize("kind", ["sgd", "rmsprop", "adam"])
def test_a_state_saved_by_an_earlier_version_loads_with_the_new_defaults(kind):
    stream = _stream(5)
    first = torch.nn.Parameter(torch.randn(5, dtype=torch.float64))
    second = torch.nn.Parameter(first.detach().clone())
    opt = KINDS[kind]([first], lr=0.01, batch_scaling="gain")
    for per_example in stream[:4]:
        feed(first, per_example)
        opt.step()
    state = copy.deepcopy(opt.state_dict())  # not sharing the buffers opt keeps stepping
    for group in state["param_groups"]:  # what an optimizer saved before these options held
        del group["gain_horizon"], group["foreach"], group["bias_correction"]
        group.pop("second_moment_batch", None)
        if kind == "adam":
            group.update(centered=False, power=0.5)  # Adam's hidden keys of then
    for saved in state["state"].values():
        saved.pop("grad_mass"), saved.pop("sq_mass", None)
    second.data.copy_(first.detach())
    resumed = KINDS[kind]([second], lr=0.01, gain_horizon=7)
    resumed.load_state_dict(state)
    assert resumed.param_groups[0]["gain_horizon"] == 1000
    assert resumed.param_groups[0]["foreach"] is None
    assert resumed.param_groups[0]["bias_correction"] == "uniform"
    assert resumed.state[second]["grad_mass"] == 1.0  # a uniform average holds data alone
    assert kind == "sgd" or resumed.param_groups[0]["second_moment_batch"] == 1
    assert kind != "adam" or "centered" not in resumed.param_groups[0]
    for per_example in stream[4:]:
        for param, optimizer in ((first, opt), (second, resumed)):
            feed(param, per_example)
            optimizer.step()
        assert torch.equal(first, second)


@pytest.mark.parametrize(("kind", "options"), CASES_, ids=[f"{k}-{o}" for k, o in CASES_])
def test_foreach_steps_bit_for_bit_as_the_loop(kind, options):
    """The multi-tensor path against the per-tensor loop, on several parameters of different
    shapes that take their steps together, over a stream of varying batch sizes."""
    gen = torch.Generator().manual_seed(7)
    shapes = [(5,), (3, 4), (2, 1, 3)]
    start = [torch.randn(shape, generator=gen, dtype=torch.float64) for shape in shapes]
    loop = [torch.nn.Parameter(t.clone()) for t in start]
    multi = [torch.nn.Parameter(t.clone()) for t in start]
    optimizers = [
        KINDS[kind](loop, **options, foreach=False),
        KINDS[kind](multi, **options, foreach=True),
    ]
    for b in _sizes(options, (4, 1, 7, 16, 3)):
        per_example = [
            torch.randn(b, *shape, generator=gen, dtype=torch.float64) for shape in shapes
        ]
        for params, optimizer in zip((loop, multi), optimizers):
            for p, g in zip(params, per_example):
                feed(p, g)
            optimizer.step()
        for a, b_ in zip(loop, multi):
            assert torch.equal(a, b_)


@pytest.mark.parametrize("kind", ["rmsprop", "adam"])
def test_second_moment_batch_at_the_step_batch_size_is_the_standard_second_moment(kind):
    """Where every step has ``B = N``, the estimate of ``E[ĝ²]`` at ``N`` is ``ĝ²`` itself."""
    stream = _stream(8, sizes=(16,) * 6)
    phi = torch.randn(5, dtype=torch.float64)
    estimated, standard = (torch.nn.Parameter(phi.clone()) for _ in range(2))
    optimizers = [
        KINDS[kind]([estimated], lr=0.01, sq_horizon=50, second_moment_batch=16),
        KINDS[kind]([standard], lr=0.01, sq_horizon=50, second_moment="batch"),
    ]
    for per_example in stream:
        for param, optimizer in zip((estimated, standard), optimizers):
            feed(param, per_example)
            optimizer.step()
    torch.testing.assert_close(estimated.detach(), standard.detach(), rtol=1e-12, atol=1e-14)


@given(
    size=st.sampled_from([1.0, 4.0, 32.0, float("inf")]),
    batch=st.integers(2, 40),
    seed=st.integers(0, 2**16),
)
@settings(max_examples=25, deadline=None)
def test_second_moment_batch_estimates_the_mean_square_at_that_batch_size(size, batch, seed):
    """Over many draws of ``B`` per-example gradients of known mean ``μ`` and variance ``σ²``,
    the one-step second moment averages to ``μ² + σ²/N`` (no clamp is active: ``N ≤ B`` or
    ``μ² ≫ σ²/B``)."""
    gen = torch.Generator().manual_seed(seed)
    mu, sigma = torch.tensor([3.0, -2.0], dtype=torch.float64), torch.tensor([0.5, 1.0])
    draws = 4000
    g = mu + sigma.double() * torch.randn(draws, batch, 2, generator=gen, dtype=torch.float64)
    param = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    opt = optim.Adam([param], lr=1.0, second_moment_batch=size)
    values = []
    for per_example in g:
        feed(param, per_example)
        values.append(opt._second(param, pergrad.grad_stats(param), opt.param_groups[0]))
    values = torch.stack(values)
    expected = mu.square() + sigma.double().square() / size
    error = values.std(0) / draws**0.5
    assert ((values.mean(0) - expected).abs() <= 5 * error).all()


def test_second_moment_batch_refuses_a_single_example_before_changing_anything():
    param = torch.nn.Parameter(torch.ones(5, dtype=torch.float64))
    opt = optim.Adam([param], lr=0.1, second_moment_batch=8)
    feed(param, torch.randn(1, 5, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="second_moment_batch=8.*at least 2 examples"):
        opt.step()
    assert torch.equal(param, torch.ones(5, dtype=torch.float64))
    assert opt.state[param]["seen"] == 0


def test_second_moment_batch_is_refused_with_centered_rmsprop():
    with pytest.raises(ValueError, match="centered=True"):
        optim.RMSprop(
            [torch.nn.Parameter(torch.ones(3))], lr=0.1, centered=True, second_moment_batch=4
        )


def test_second_moment_batch_needs_per_example_statistics():
    param = torch.nn.Parameter(torch.ones(5))
    with pytest.raises(ValueError, match="second_moment_batch.*second_moment='example'"):
        optim.Adam([param], lr=0.1, second_moment="batch", second_moment_batch=8)
    opt = optim.Adam([param], lr=0.1, second_moment_batch=8)
    with pytest.raises(ValueError, match="second_moment_batch"):
        opt.add_param_group(
            {"params": [torch.nn.Parameter(torch.ones(2))], "second_moment": "batch"}
        )


@pytest.mark.parametrize("error", [pergrad.InputError, RuntimeError])
def test_a_grad_without_statistics_is_the_fault_pergrad_raises_for_it(error):
    param = torch.nn.Parameter(torch.ones(3))
    opt = optim.SGD([param], lr=0.1)
    param.square().sum().backward()
    with pytest.raises(error, match="no per-example statistics"):
        opt.step()
    assert torch.equal(param, torch.ones(3))


@pytest.mark.parametrize("batch", [1, 8, 32, 200])
def test_exponential_bias_correction_at_a_fixed_batch_size_is_torch_adam(batch):
    """``bias_correction="exponential"`` with the standard second moment at a fixed ``B`` is
    ``torch.optim.Adam`` with ``lr·B``, ``β = 1 − B/N⁰`` (0 where ``B ≥ N⁰``)."""
    torch.manual_seed(0)
    ours = mlp().double()
    theirs = copy.deepcopy(ours)
    lr, grad_horizon, sq_horizon = 1e-3, 100, 1000
    opt = optim.Adam(
        ours.parameters(),
        lr=lr,
        grad_horizon=grad_horizon,
        sq_horizon=sq_horizon,
        second_moment="batch",
        bias_correction="exponential",
    )
    betas = tuple(max(0.0, 1 - batch / n) for n in (grad_horizon, sq_horizon))
    reference = torch.optim.Adam(theirs.parameters(), lr=lr * batch, betas=betas)
    engine = pergrad.PerExample(ours, CROSS_ENTROPY)
    gen = torch.Generator().manual_seed(batch)
    for _ in range(12):
        x = torch.randn(batch, 6, generator=gen, dtype=torch.float64)
        y = torch.randint(0, 3, (batch,), generator=gen)
        opt.zero_grad()
        engine.backward(x, y)
        opt.step()
        reference.zero_grad()
        CROSS_ENTROPY(theirs(x), y).mean().backward()
        reference.step()
    for a, b in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_bias_correction_choices_are_checked_also_in_a_loaded_state():
    param = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="bias_correction.*'uniform', 'exponential'"):
        optim.Adam([param], lr=1e-3, bias_correction="adam")
    state = optim.Adam([param], lr=1e-3).state_dict()
    state["param_groups"][0]["bias_correction"] = "Exponential"
    with pytest.raises(ValueError, match="bias_correction"):
        optim.Adam([param], lr=1e-3).load_state_dict(state)
