"""``verify=True`` checks every call against autograd with distinct per-example weights: a model
whose rows the per-layer path attributes wrongly fails it, with an error that names the
parameters, instead of giving wrong numbers."""

import pytest
import torch
from torch import nn
from zoo import CASES, CROSS_ENTROPY

import pergrad
from pergrad import verify


class FlippedQueries(nn.Module):
    """A learned query expanded to the batch and projected, its rows then reversed. The rows
    are alike, so each example alone computes what it does in the batch; but no example's
    inputs mark them, so nothing but verification sees that row ``b`` reaches example
    ``B - 1 - b``."""

    def __init__(self):
        super().__init__()
        self.query = nn.Parameter(torch.randn(1, 3))
        self.project, self.read = nn.Linear(3, 3), nn.Linear(3, 3)

    def forward(self, x):
        q = self.project(self.query.expand(len(x), 3)).flip(0)
        return (self.read(x) * q).sum(1)


def _squared(output, target):
    return (output - target).square()


@pytest.mark.parametrize("call", ["grads", "backward"])
def test_rows_no_example_marks_moved_between_examples_fail_verification(call):
    torch.manual_seed(0)
    model = FlippedQueries().double()
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    engine = pergrad.PerExample(model, _squared, verify=True)
    with pytest.raises(pergrad.VerificationError, match="'project.weight'.*disagree"):
        getattr(engine, call)(x, y)
    assert all(p.grad is None for p in model.parameters())  # nothing changed


@pytest.mark.filterwarnings("ignore::pergrad.FallbackWarning")  # parent_use: a whole-model mode
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


def test_the_weights_are_distinct():
    c = verify.weights(1000, torch.zeros(1))
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
