"""``verify=True`` checks every call against autograd with distinct per-example weights: per-layer
gradients handed to the wrong examples fail it, with an error that names the parameters,
instead of giving wrong numbers."""

import pytest
import torch
from torch import nn
from zoo import CASES, CROSS_ENTROPY

import pergrad
from pergrad import verify
from pergrad.rules import linear


def _squared(output, target):
    return (output - target).square().sum(1)


@pytest.mark.parametrize("call", ["grads", "backward"])
def test_a_rule_that_hands_gradients_to_the_wrong_examples_fails_verification(call, monkeypatch):
    """A permutation keeps the moments, so only the weighted check can see it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    right = linear.weight_grads
    monkeypatch.setattr(linear, "weight_grads", lambda a, delta: right(a, delta).flip(0))
    engine = pergrad.PerExample(model, _squared, verify=True)
    with pytest.raises(pergrad.VerificationError, match="'0.weight'.*disagree"):
        getattr(engine, call)(x, y)
    assert all(p.grad is None for p in model.parameters())  # nothing changed


@pytest.mark.filterwarnings("ignore::pergrad.FallbackWarning")
@pytest.mark.parametrize("case", ["mlp", "transformer", "tied", "parent_use"])
def test_verification_passes_where_the_numbers_are_right(case):
    model, inputs, target = CASES[case].build(5)
    engine = pergrad.PerExample(model, CROSS_ENTROPY, verify=True, max_example_norm=0.5)
    engine.backward(inputs, target)
    engine.grads(inputs, target)


def test_verification_is_on_where_the_environment_says(monkeypatch):
    model = nn.Linear(2, 2)
    monkeypatch.setenv(verify.ENVIRONMENT, "1")
    assert pergrad.PerExample(model, CROSS_ENTROPY).verify
    assert not pergrad.PerExample(model, CROSS_ENTROPY, verify=False).verify
    monkeypatch.setenv(verify.ENVIRONMENT, "0")
    assert not pergrad.PerExample(model, CROSS_ENTROPY).verify
    with pytest.raises(TypeError, match="verify must be"):
        pergrad.PerExample(model, CROSS_ENTROPY, verify="yes")


def test_the_check_weights_are_distinct():
    c = pergrad.checks.distinct_weights(1000, torch.zeros(1, dtype=torch.long))
    assert len(set(c.tolist())) == 1000 and bool((c >= 1).all() and (c < 2).all())


def test_verification_replays_dropout_and_leaves_the_random_stream_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Dropout(0.5), nn.Linear(8, 2)).double()
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randint(0, 2, (6,))
    after = {}
    for verified in (False, True):
        torch.manual_seed(1)
        pergrad.PerExample(model, CROSS_ENTROPY, verify=verified).backward(x, y)
        after[verified] = (torch.rand(3), model[0].weight.grad.clone())
        pergrad.zero_grad(model.parameters())
    assert torch.equal(after[True][0], after[False][0])  # the same random stream after
    assert torch.equal(after[True][1], after[False][1])  # and the same masks
