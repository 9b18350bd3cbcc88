"""Every bad input, in one table: refused at the call that received it, with a message that
names what was wrong and the way out, and nothing changed by the call that raised —
parameters, ``.grad``, statistics and optimizer state alike. The next bad input is one row
of ``BAD``; failure injections (a loss or a model that raises half-way, a NaN in the second
chunk) are rows too."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from zoo import CROSS_ENTROPY, TwoInputs

import optim
import pergrad
from optim import convert

MODES = ("auto", "func", "hooks", "loop")


@dataclass
class World:
    """A model mid-training: an engine, an ``optim.Adam`` with state after one step, and the
    statistics of a second backward pass waiting for the next step."""

    model: nn.Module
    engine: pergrad.PerExample
    opt: optim.Adam
    x: Tensor
    y: Tensor

    @property
    def first(self) -> nn.Parameter:
        return self.model[0].weight


def world(mode: str = "auto", **engine_options) -> World:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x, y = torch.randn(8, 6, dtype=torch.float64), torch.randint(0, 3, (8,))
    engine = pergrad.PerExample(model, CROSS_ENTROPY, mode=mode, **engine_options)
    opt = optim.Adam(model.parameters(), lr=1e-2)
    engine.backward(x, y)
    opt.step()
    opt.zero_grad()
    engine.backward(x[:4], y[:4])
    return World(model, engine, opt, x, y)


@dataclass(frozen=True)
class Bad:
    """``call(world)`` must raise ``error`` matching ``match``, after ``prepare(world)``
    (what the user did before, itself allowed) and with ``world(**options)``."""

    call: Callable[[World], object]
    error: type[Exception]
    match: str
    prepare: Callable[[World], object] | None = None
    options: tuple = ()


def engine(w: World, loss_fn=CROSS_ENTROPY, mode="auto", **options) -> pergrad.PerExample:
    return pergrad.PerExample(w.model, loss_fn, mode=mode, **options)


def adam(**options) -> Callable[[World], object]:
    return lambda w: optim.Adam(w.model.parameters(), **{"lr": 1e-3, **options})


def no_grad_statistics(w: World) -> None:
    w.opt.zero_grad()
    CROSS_ENTROPY(w.model(w.x), w.y).mean().backward()


def over_the_batch(output: Tensor, target: Tensor) -> Tensor:
    """Cross-entropy summed per example and divided by the whole batch's size, as a loss
    normalised by the batch's token count is: not a loss of each example alone."""
    return CROSS_ENTROPY(output, target) * 4 / len(target)


def boom(*_):
    raise RuntimeError("boom")


class Flaky(nn.Module):
    """Raises on an example whose first feature is marked: in the second chunk, a model that
    fails half-way through a chunked backward."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        if bool((x[:, 0] > 1e3).any()):
            raise RuntimeError("boom")
        return self.model(x)


class FailsOnSecondChunk:
    """A loss that raises on its second call with gradients on: the second chunk of a
    chunked backward (the first chunk's check that the loss is per example runs without)."""

    def __init__(self):
        self.calls = 0

    def __call__(self, output: Tensor, target: Tensor) -> Tensor:
        self.calls += torch.is_grad_enabled()
        if self.calls == 2:
            raise RuntimeError("boom")
        return CROSS_ENTROPY(output, target)


class Reentrant(nn.Module):
    """The model's first layer, then the rest under reentrant activation checkpointing."""

    def __init__(self, model: nn.Sequential):
        super().__init__()
        self.model = model

    def forward(self, x):
        return checkpoint(self.model[1:], self.model[0](x), use_reentrant=True)


def second_chunk(w: World, value: float) -> Tensor:
    """The inputs with ``value`` in an example of the second chunk of 4."""
    x = w.x.clone()
    x[6, 0] = value
    return x


def set_stats(**fields) -> Callable[[World], None]:
    def prepare(w: World) -> None:
        stats = pergrad.grad_stats(w.first)
        stats.__dict__.update(fields)

    return prepare


def hand_made_statistics(p: nn.Parameter, count: int) -> None:
    pergrad.zero_grad([p])
    p.grad = torch.zeros_like(p)
    p.grad_stats = pergrad.GradStats(count, torch.zeros_like(p))


def torch_state(w: World) -> dict:
    other = torch.optim.Adam(w.model.parameters(), lr=1e-3)
    return other.state_dict()


def sgd_state(w: World) -> dict:
    return optim.SGD(w.model.parameters(), lr=1e-3).state_dict()


def other_shapes_state(w: World) -> dict:
    state = copy.deepcopy(w.opt.state_dict())
    state["state"][0]["exp_avg"] = torch.zeros(2, 2, dtype=torch.float64)
    return state


def register_linear_again(_):
    return pergrad.register_rule(nn.Linear)(lambda layer, call: {})


INVALID_LR = "lr must be a finite number >= 0"
BAD: dict[str, Bad] = {
    # PerExample(...)
    "model is a function": Bad(
        lambda w: pergrad.PerExample(lambda x: x, CROSS_ENTROPY), TypeError, "nn.Module"
    ),
    "loss_fn is a string": Bad(
        lambda w: pergrad.PerExample(w.model, "cross_entropy"), TypeError, "loss_fn must be"
    ),
    "mode unknown": Bad(lambda w: engine(w, mode="vmap"), ValueError, "Invalid mode: 'vmap'"),
    **{
        f"a loss normalised over the batch ({mode})": Bad(
            lambda w, m=mode: engine(w, over_the_batch, m).backward(w.x, w.y),
            pergrad.InputError,
            "depends on the other examples.*pergrad.losses.causal_lm",
        )
        for mode in ("auto", "hooks")
    },
    **{
        f"chunk_size={value!r}": Bad(
            lambda w, v=value: engine(w, chunk_size=v),
            ValueError,
            rf"Invalid chunk_size: {value!r}; use None or an int >= 1",
        )
        for value in (0, True, 2.5, "4")
    },
    **{
        f"max_example_norm={value!r}": Bad(
            lambda w, v=value: engine(w, max_example_norm=v),
            ValueError,
            "Invalid max_example_norm.*a number > 0",
        )
        for value in (0, -1.0, "1", True, float("nan"))
    },
    "process_group before init_process_group": Bad(
        lambda w: engine(w, process_group=object()), RuntimeError, "init_process_group"
    ),
    # the loss
    **{
        f"a loss reduced over the batch ({mode})": Bad(
            lambda w, m=mode: engine(w, nn.CrossEntropyLoss(), m).backward(w.x, w.y),
            ValueError,
            r"one loss per example.*reduction='none'",
        )
        for mode in MODES
    },
    **{
        f"a loss of shape (B, 1) ({mode})": Bad(
            lambda w, m=mode: engine(w, lambda o, t: CROSS_ENTROPY(o, t)[:, None], m).grads(
                w.x, w.y
            ),
            ValueError,
            r"(\(8,\)|batch of 8).*flatten\(1\)",
        )
        for mode in ("auto", "func", "loop")
    },
    **{
        f"a loss that does not depend on the parameters ({mode})": Bad(
            lambda w, m=mode: engine(w, lambda o, t: CROSS_ENTROPY(o, t).detach(), m).backward(
                w.x, w.y
            ),
            ValueError,
            "do not depend on any trainable parameter.*must not detach",
        )
        for mode in MODES
    },
    "a loss that is a float": Bad(
        lambda w: engine(w, lambda o, t: 1.0).backward(w.x, w.y), ValueError, "returned a float"
    ),
    "a loss of integers": Bad(
        lambda w: engine(w, lambda o, t: t).backward(w.x, w.y), ValueError, "floating point"
    ),
    # inputs and target
    "inputs and target disagree on B": Bad(
        lambda w: w.engine.backward(w.x, w.y[:3]),
        ValueError,
        r"disagree on the batch size.*inputs\[0\]: 8.*target: 3",
    ),
    "two inputs disagree on B": Bad(
        lambda w: pergrad.PerExample(TwoInputs().double(), CROSS_ENTROPY).grads(
            (w.x, torch.randn(2, 4, dtype=torch.float64)), w.y
        ),
        ValueError,
        r"inputs\[1\]: 2",
    ),
    "an empty batch": Bad(lambda w: w.engine.backward(w.x[:0], w.y[:0]), ValueError, "empty"),
    **{
        f"inputs given as a {kind}": Bad(
            lambda w, v=value: w.engine.backward(v, w.y), TypeError, "Tensor"
        )
        for kind, value in (
            ("list", [[1.0] * 6] * 8),
            ("float", 3.0),
            ("str", "x"),
            ("None", None),
            ("dict", {"x": 1}),
        )
    },
    "a list among the inputs": Bad(
        lambda w: w.engine.grads((w.x, [1, 2]), w.y), TypeError, r"inputs\[1\] is a list"
    ),
    "an empty tuple of inputs": Bad(
        lambda w: w.engine.backward((), w.y), ValueError, "inputs is an empty tuple"
    ),
    "a target given as a list": Bad(
        lambda w: w.engine.backward(w.x, [0] * 8), TypeError, "target is a list"
    ),
    "a 0-dimensional input": Bad(
        lambda w: w.engine.backward(torch.tensor(1.0), w.y), ValueError, "0-dimensional"
    ),
    # the model
    "BatchNorm in training mode": Bad(
        lambda w: pergrad.PerExample(
            nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.Linear(5, 3)).double(),
            CROSS_ENTROPY,
        ).backward(w.x, w.y),
        ValueError,
        r"layer '1' \(BatchNorm1d\).*model\[1\]\.eval\(\).*GroupNorm",
    ),
    "Embedding(scale_grad_by_freq=True)": Bad(
        lambda w: pergrad.PerExample(
            nn.Sequential(nn.Embedding(7, 3, scale_grad_by_freq=True), nn.Flatten()),
            lambda o, t: o.sum(1),
        ).backward(torch.tensor([[1, 1], [2, 3]]), torch.zeros(2)),
        ValueError,
        r"model\[0\]\.scale_grad_by_freq = False",
    ),
    "nothing to differentiate": Bad(
        lambda w: pergrad.PerExample(
            nn.Embedding(5, 3).requires_grad_(False), lambda o, t: o.sum(-1)
        ).backward(torch.tensor([1, 2]), torch.zeros(2)),
        ValueError,
        "no trainable floating-point parameter",
    ),
    "reentrant activation checkpointing": Bad(
        lambda w: pergrad.PerExample(Reentrant(w.model), CROSS_ENTROPY).backward(w.x, w.y),
        ValueError,
        "use_reentrant=False",
    ),
    # statistics that no longer go with their .grad
    "a .grad from loss.backward()": Bad(
        lambda w: w.engine.backward(w.x, w.y), ValueError, "did not compute", no_grad_statistics
    ),
    "a .grad changed after pergrad computed it, at backward": Bad(
        lambda w: w.engine.backward(w.x, w.y),
        ValueError,
        "changed after pergrad computed it",
        lambda w: w.first.grad.mul_(2),
    ),
    "a .grad changed after pergrad computed it, at step": Bad(
        lambda w: w.opt.step(),
        ValueError,
        "changed after pergrad computed it",
        lambda w: w.first.grad.mul_(2),
    ),
    "torch's clip_grad_norm_ before step": Bad(
        lambda w: w.opt.step(),
        ValueError,
        "use pergrad.clip_grad_norm_",
        lambda w: torch.nn.utils.clip_grad_norm_(w.model.parameters(), 1e-3),
    ),
    "statistics of the wrong shape": Bad(
        lambda w: w.opt.step(),
        ValueError,
        r"sq_mean has shape torch.Size\(\[2\]\).*GradStats\(count, sq_mean\)",
        set_stats(sq_mean=torch.zeros(2, dtype=torch.float64)),
    ),
    "statistics of the wrong dtype": Bad(
        lambda w: w.engine.backward(w.x, w.y),
        ValueError,
        "sq_mean has dtype torch.float32",
        set_stats(sq_mean=torch.zeros(5, 6)),
    ),
    "a count of 0": Bad(lambda w: w.opt.step(), ValueError, "count is 0", set_stats(count=0)),
    "a .grad without statistics, at step": Bad(
        lambda w: w.opt.step(),
        RuntimeError,
        r"no per-example statistics.*pergrad.PerExample",
        no_grad_statistics,
    ),
    # failures half-way
    **{
        f"a NaN ({mode})": Bad(
            lambda w, m=mode: engine(w, mode=m).backward(second_chunk(w, float("nan")), w.y),
            FloatingPointError,
            r"non-finite.*0\.weight.*Nothing was accumulated",
        )
        for mode in MODES
    },
    "a NaN in the second chunk only": Bad(
        lambda w: engine(w, chunk_size=4).backward(second_chunk(w, float("nan")), w.y),
        FloatingPointError,
        "Nothing was accumulated",
    ),
    "a loss that raises on the second chunk": Bad(
        lambda w: engine(w, FailsOnSecondChunk(), chunk_size=4).backward(w.x, w.y),
        RuntimeError,
        "boom",
    ),
    "a model that raises on the second chunk": Bad(
        lambda w: pergrad.PerExample(Flaky(w.model), CROSS_ENTROPY, chunk_size=4).backward(
            second_chunk(w, 1e4), w.y
        ),
        RuntimeError,
        "boom",
    ),
    "a closure that raises": Bad(lambda w: w.opt.step(boom), RuntimeError, "boom"),
    # optim.*(...)
    **{
        f"lr={value!r}": Bad(adam(lr=value), error, rf"Invalid learning rate: {value!r}.*{what}")
        for value, error, what in (
            (-1.0, ValueError, INVALID_LR),
            (float("inf"), ValueError, INVALID_LR),
            (float("nan"), ValueError, INVALID_LR),
            ("0.001", TypeError, "lr must be a number"),
            (True, TypeError, "lr must be a number"),
        )
    },
    "grad_horizon=0.5": Bad(adam(grad_horizon=0.5), ValueError, "grad_horizon.*>= 1"),
    "grad_horizon=None": Bad(adam(grad_horizon=None), TypeError, "grad_horizon must be a number"),
    "sq_horizon=0": Bad(adam(sq_horizon=0), ValueError, "Invalid sq_horizon"),
    "gain_horizon=0": Bad(adam(gain_horizon=0), ValueError, "Invalid gain_horizon"),
    "SGD gain_horizon=0": Bad(
        lambda w: optim.SGD(w.model.parameters(), lr=0.1, gain_horizon=0),
        ValueError,
        "Invalid gain_horizon",
    ),
    "eps=0": Bad(adam(eps=0.0), ValueError, "Invalid epsilon value.*> 0"),
    "eps=inf": Bad(adam(eps=float("inf")), ValueError, "Invalid epsilon value"),
    "weight_decay=-0.1": Bad(adam(weight_decay=-0.1), ValueError, "Invalid weight_decay"),
    "power=0": Bad(
        lambda w: optim.RMSprop(w.model.parameters(), lr=0.1, power=0),
        ValueError,
        "Invalid power",
    ),
    "centered='yes'": Bad(
        lambda w: optim.RMSprop(w.model.parameters(), lr=0.1, centered="yes"),
        ValueError,
        "Invalid centered: 'yes'; choose one of False, True",
    ),
    "second_moment='mean'": Bad(
        adam(second_moment="mean"), ValueError, "Invalid second_moment.*'example', 'batch'"
    ),
    "batch_scaling='cube'": Bad(adam(batch_scaling="cube"), ValueError, "Invalid batch_scaling"),
    "a parameter group's lr": Bad(
        lambda w: optim.Adam([{"params": w.model.parameters(), "lr": -2.0}], lr=0.1),
        ValueError,
        "Invalid learning rate: -2.0",
    ),
    "add_param_group with a bad lr": Bad(
        lambda w: w.opt.add_param_group({"params": [nn.Parameter(torch.zeros(2))], "lr": -1.0}),
        ValueError,
        "Invalid learning rate: -1.0",
    ),
    "torch.optim.Adam's betas": Bad(
        adam(betas=(0.9, 0.999)), TypeError, r"betas \(use grad_horizon and sq_horizon.*convert"
    ),
    "torch.optim.SGD's momentum": Bad(
        lambda w: optim.SGD(w.model.parameters(), lr=0.1, momentum=0.9),
        TypeError,
        r"momentum \(use grad_horizon.*from_torch_sgd",
    ),
    "torch.optim.RMSprop's alpha": Bad(
        lambda w: optim.RMSprop(w.model.parameters(), lr=0.1, alpha=0.99),
        TypeError,
        r"alpha \(use sq_horizon.*from_torch_rmsprop",
    ),
    "batch_scaling='gain' over two batch sizes": Bad(
        lambda w: w.opt.step(),
        RuntimeError,
        r"one batch size per parameter group.*\[3, 4\].*No parameter was changed",
        lambda w: (
            w.opt.param_groups[0].update(batch_scaling="gain"),
            hand_made_statistics(w.first, 3),
        ),
    ),
    # load_state_dict
    "torch.optim.Adam's state_dict": Bad(
        lambda w: w.opt.load_state_dict(torch_state(w)), ValueError, "lacks .*grad_horizon"
    ),
    "optim.SGD's state_dict into Adam": Bad(
        lambda w: w.opt.load_state_dict(sgd_state(w)), ValueError, "lacks .*sq_horizon"
    ),
    "optim.Adam's state_dict into SGD": Bad(
        lambda w: optim.SGD(w.model.parameters(), lr=0.1).load_state_dict(w.opt.state_dict()),
        ValueError,
        "has .*sq_horizon",
    ),
    "a state_dict of other parameters": Bad(
        lambda w: w.opt.load_state_dict(other_shapes_state(w)),
        ValueError,
        r"exp_avg of parameter 0 has shape \(2, 2\), the parameter \(5, 6\)",
    ),
    # pergrad.noise_scale
    "noise_scale without statistics": Bad(
        lambda w: pergrad.noise_scale(w.model.parameters()),
        ValueError,
        "call PerExample.backward",
        lambda w: w.opt.zero_grad(),
    ),
    "noise_scale of one example": Bad(
        lambda w: pergrad.noise_scale(w.model.parameters()),
        ValueError,
        "at least two examples",
        lambda w: (w.opt.zero_grad(), w.engine.backward(w.x[:1], w.y[:1])),
    ),
    "noise_scale with too few weights": Bad(
        lambda w: pergrad.noise_scale(w.model.parameters(), []), ValueError, "one per parameter"
    ),
    "noise_scale with a weight of another shape": Bad(
        lambda w: pergrad.noise_scale([w.first], [torch.ones(2)]),
        ValueError,
        "shaped like its parameter",
    ),
    "noise_scale with one tensor of weights": Bad(
        lambda w: pergrad.noise_scale([w.first], torch.ones(5, 6)),
        ValueError,
        "preconditioner is one tensor: give a list",
    ),
    **{
        f"{fn.__name__} of the model": Bad(
            lambda w, f=fn: f(w.model), TypeError, "not a Sequential: pass model.parameters()"
        )
        for fn in (pergrad.zero_grad, pergrad.noise_scale)
    },
    "clip_grad_norm_ of the model": Bad(
        lambda w: pergrad.clip_grad_norm_(w.model, 1.0), TypeError, "pass model.parameters()"
    ),
    "zero_grad of a list of modules": Bad(
        lambda w: pergrad.zero_grad(list(w.model)), TypeError, "got a Linear among them"
    ),
    # pergrad.clip_grad_norm_
    **{
        f"clip_grad_norm_ max_norm={value!r}": Bad(
            lambda w, v=value: pergrad.clip_grad_norm_(w.model.parameters(), v),
            ValueError,
            "Invalid max_norm.*>= 0",
        )
        for value in (-1.0, "1", True, float("nan"))
    },
    # rules
    "register_rule of a non-module": Bad(
        lambda w: pergrad.register_rule(int), TypeError, "nn.Module subclass"
    ),
    "register_rule of a type that has one": Bad(
        register_linear_again, ValueError, "Linear already has a rule"
    ),
    "register_rule with moments that are not a function": Bad(
        lambda w: pergrad.register_rule(Flaky, moments=3), TypeError, "moments must be a function"
    ),
    "register_rule decorating a non-function": Bad(
        lambda w: pergrad.register_rule(Flaky)(3), TypeError, "decorates a function"
    ),
    "check_rule of a non-module": Bad(
        lambda w: pergrad.testing.check_rule(nn.Linear, lambda b: torch.randn(b, 3)),
        TypeError,
        "layer must be an nn.Module instance",
    ),
    "check_rule of a layer without a rule": Bad(
        lambda w: pergrad.testing.check_rule(
            nn.ConvTranspose1d(2, 2, 1), lambda b: torch.randn(b, 2, 3)
        ),
        ValueError,
        r"ConvTranspose1d has no rule to check: register one with "
        r"@pergrad.register_rule\(ConvTranspose1d\)",
    ),
    "check_rule of a layer outside its rule": Bad(
        lambda w: pergrad.testing.check_rule(
            nn.Embedding(3, 2, sparse=True), lambda b: torch.zeros(b, 1).long()
        ),
        ValueError,
        "Embedding has no rule to check: sparse=True",
    ),
    "check_rule with inputs that are not a function": Bad(
        lambda w: pergrad.testing.check_rule(nn.Linear(3, 2), torch.randn(4, 3)),
        TypeError,
        "make_inputs must be a function",
    ),
    # optim.convert and TrainingStep
    "a beta of 1": Bad(
        lambda w: convert.from_torch_adam(1e-3, (0.9, 1.0), 32), ValueError, r"beta: 1.0.*\[0, 1\)"
    ),
    "a batch size of 0": Bad(
        lambda w: convert.to_torch_adam(1e-4, 320, 32_000, 0), ValueError, "batch_size: 0"
    ),
    "a horizon below one example": Bad(
        lambda w: convert.to_torch_sgd(1e-4, 0.5, 32), ValueError, "horizon: 0.5"
    ),
    "a TrainingStep optimizer that is not one": Bad(
        lambda w: optim.TrainingStep(w.model, CROSS_ENTROPY, "adam"),
        TypeError,
        "optimizer must be a torch.optim.Optimizer",
    ),
}


def snapshot(w: World) -> list:
    """Everything a raising call must leave as it was."""
    found: list = []
    for p in w.model.parameters():
        stats = pergrad.grad_stats(p)
        found += [p.detach().clone(), None if p.grad is None else p.grad.clone()]
        found += [None if stats is None else (stats.count, stats.sq_mean.clone())]
    found += [copy.deepcopy(w.opt.state_dict()), w.engine.mode]
    return found


def same(a, b) -> bool:
    if isinstance(a, Tensor):
        return isinstance(b, Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(same, a, b))
    return a == b


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_is_refused_where_it_enters_and_changes_nothing(name):
    bad = BAD[name]
    w = world(**dict(bad.options))
    if bad.prepare is not None:
        bad.prepare(w)
    before = snapshot(w)
    with pytest.raises(bad.error, match=bad.match):
        bad.call(w)
    assert same(snapshot(w), before), "the call that raised changed something"
    assert all(isinstance(p, nn.Parameter) for p in w.model.parameters())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in w.model.modules())
    w.opt.zero_grad()  # and the model still trains
    w.engine.backward(w.x, w.y)
    w.opt.step()


def test_a_bug_in_the_model_surfaces_as_the_model_raises_it():
    model = nn.Linear(6, 3).double()
    engine = pergrad.PerExample(model, CROSS_ENTROPY)
    with pytest.raises(RuntimeError, match="mat1 and mat2 shapes cannot be multiplied"):
        engine.backward(torch.randn(4, 5, dtype=torch.float64), torch.zeros(4).long())
    assert engine.mode == "auto"  # a user error never counts against a mode
