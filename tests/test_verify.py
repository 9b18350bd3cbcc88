"""``verify=True`` checks every call against autograd with distinct per-example weights: the
models whose rows the per-layer path cannot attribute fail it, with an error that names the
parameters, instead of giving wrong numbers."""

import pytest
import torch
from torch import nn
from zoo import CASES, CROSS_ENTROPY

import pergrad
from pergrad import verify


class Routed(nn.Module):
    """An expert called on the tokens the batch routed to it, flattened: example 0 routes
    one token, so in a one-example probe the expert's rows look like examples."""

    def __init__(self):
        super().__init__()
        self.expert = nn.Linear(2, 1)

    def forward(self, x):
        tokens = x.flatten(0, 1)
        rows = (tokens[:, 0] > 0).nonzero().squeeze(1)
        routed = self.expert(tokens[rows])
        out = torch.zeros(len(tokens), 1, dtype=x.dtype).index_add(0, rows, routed)
        return out.view(len(x), -1).sum(1)


class Sorted(nn.Module):
    """A layer that sees the batch sorted by a feature, and the order restored after."""

    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(3, 2)

    def forward(self, x):
        order = x[:, 0].argsort()
        return self.layer(x[order])[order.argsort()]


class Centered(nn.Module):
    """Examples mixed by an operation between two layers: the batch mean subtracted."""

    def __init__(self):
        super().__init__()
        self.first, self.second = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x):
        h = self.first(x)
        return self.second(h - h.mean(0, keepdim=True))


class Contrastive(nn.Module):
    """Logits normalised over the batch, as in-batch contrastive heads do."""

    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(3, 2)

    def forward(self, x):
        z = self.layer(x)
        return z - z.logsumexp(0)


def _squared(output, target):
    return (output - target).square().reshape(len(target), -1).sum(1)


def _routed_tokens():
    signs = [[1, -1, -1], [1, 1, -1], [-1, 1, -1], [-1, -1, -1]]  # 1, 2, 1, 0 tokens routed
    x = torch.tensor(signs, dtype=torch.float64)[..., None] * torch.tensor([1.0, 0.5])
    return x.double(), torch.randn(4, dtype=torch.float64)


CASES_19 = {
    "routed tokens": (Routed, _routed_tokens, _squared),
    "a sorted batch": (
        Sorted,
        lambda: (torch.randn(4, 3, dtype=torch.float64), torch.randint(0, 2, (4,))),
        CROSS_ENTROPY,
    ),
    "the batch mean subtracted": (
        Centered,
        lambda: (torch.randn(4, 3, dtype=torch.float64), torch.randint(0, 2, (4,))),
        CROSS_ENTROPY,
    ),
    "logits normalised over the batch": (
        Contrastive,
        lambda: (torch.randn(4, 3, dtype=torch.float64), torch.randint(0, 2, (4,))),
        CROSS_ENTROPY,
    ),
}


@pytest.mark.parametrize("call", ["grads", "backward"])
@pytest.mark.parametrize("case", sorted(CASES_19))
def test_a_model_whose_rows_the_layers_cannot_attribute_fails_verification(case, call):
    make, data, loss_fn = CASES_19[case]
    torch.manual_seed(0)
    model = make().double()
    x, y = data()
    engine = pergrad.PerExample(model, loss_fn, verify=True)
    with pytest.raises(pergrad.VerificationError, match="disagree"):
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
