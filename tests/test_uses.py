"""Parameters used in a model's own code, outside the layers that own them: each use is taken
at the operation (``F.linear``, ``@``, ``conv1d``, element-wise scales, a table indexed by a
buffer), on each example's rows, and checked against one backward per example; a use pergrad
cannot see sends the parameter to a whole-model mode."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from zoo import statistics

import pergrad


def _squared(output, target):
    return (output - target).square().reshape(len(target), -1).sum(1)


class FusedExperts(nn.Module):
    """Experts stored as one 3-D tensor owned by a ``Linear`` they are not called through,
    each token sent to its best expert and the expert's matrix taken by index, as fused
    mixture-of-experts layers do."""

    def __init__(self, width=4, count=3):
        super().__init__()
        self.router = nn.Linear(width, count)
        self.store = nn.Linear(width, width * count)  # its weight viewed as (count, w, w)
        self.count = count

    def forward(self, x):
        tokens = x.flatten(0, 1)
        choice = self.router(tokens).argmax(-1)
        weights = self.store.weight.view(self.count, *tokens.shape[1:], -1)
        out = torch.zeros_like(tokens)
        for e in range(self.count):
            rows = torch.where(choice == e)[0]
            out.index_add_(0, rows, F.linear(tokens[rows], weights[e]))
        return out.view(*x.shape[:2], -1).sum(1)


class Scaled(nn.Module):
    """A parent scaling its child's output by the child's own bias, and adding a row of a
    table the parent indexes by a buffer (a relative-position bias)."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(3, 4)
        self.table = nn.Embedding(5, 4)
        self.register_buffer("where", torch.tensor([1, 3, 3]))

    def forward(self, x):  # (B, 3, 3)
        h = self.inner(x) * self.inner.bias.sigmoid()
        return h + self.table.weight[self.where]


class Convolved(nn.Module):
    """``F.conv1d`` with a convolution's weight reshaped, outside its layer (Mamba's path)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(4, 4, 3, groups=4, padding=2)

    def forward(self, x):  # (B, 4, T)
        weight = self.conv.weight.squeeze(1).unsqueeze(1)
        return F.conv1d(x, weight, self.conv.bias, padding=2, groups=4)[..., : x.shape[-1]]


class Permuted(nn.Module):
    """The batch sorted by a feature before a parent's use of a weight, restored after."""

    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(3, 2)

    def forward(self, x):
        order = x[:, 0].argsort()
        return (torch.tanh(x[order]) @ self.layer.weight.T)[order.argsort()]


@pytest.mark.parametrize(
    "model, shape, out",
    [
        (FusedExperts, (5, 3, 4), (5, 4)),
        (Scaled, (5, 3, 3), (5, 3, 4)),
        (Convolved, (5, 4, 6), (5, 4, 6)),
        (Permuted, (5, 3), (5, 2)),
    ],
    ids=["fused_experts", "scaled", "convolved", "permuted"],
)
def test_uses_outside_their_layers_are_exact_on_the_per_layer_path(model, shape, out):
    torch.manual_seed(0)
    model = model().double()
    x, y = torch.randn(shape, dtype=torch.float64), torch.randn(out, dtype=torch.float64)
    sources = statistics(model, _squared, x, y)
    assert not {n: s for n, s in sources.items() if s in ("func", "hooks", "loop")}
    assert any(s.endswith("(op)") for s in sources.values())


def test_clipping_sees_the_uses_at_operations():
    torch.manual_seed(0)
    model = FusedExperts().double()
    x, y = torch.randn(6, 3, 4, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64)
    reference = pergrad.PerExample(model, _squared, mode="loop").grads(x, y)
    norms = sum(g.flatten(1).square().sum(1) for g in reference.values()).sqrt()
    bound = float(norms.median())
    engine = pergrad.PerExample(model, _squared, max_example_norm=bound)
    engine.backward(x, y)
    assert engine.sources["store.weight"] == "linear (op)"
    factors = (bound / norms).clamp(max=1)
    for name, p in model.named_parameters():
        clipped = reference[name] * factors.view(-1, *[1] * p.dim())
        torch.testing.assert_close(p.grad, clipped.mean(0), rtol=1e-10, atol=1e-12, msg=name)


class Prepended(nn.Module):
    """A layer that writes a learned token before each example's rows; the parent then hands
    each example the first row of another example's output."""

    def __init__(self):
        super().__init__()
        self.token = nn.Parameter(torch.randn(1, 1, 3))

    def forward(self, x):
        h = x.new_zeros(len(x), x.shape[1] + 1, x.shape[2])
        h[:, 1:] = x
        h[:, 0] = self.token[0]
        return h


class Handed(nn.Module):
    def __init__(self):
        super().__init__()
        self.prepend, self.head = Prepended(), nn.Linear(3, 2)

    def forward(self, x):
        h = self.prepend(x)
        return self.head(h[:, 1:]).sum(1) + h[:, 0, :2].flip(0)


def test_rows_that_come_from_no_example_are_not_given_to_an_example_by_their_place():
    """Row ``b`` of ``Prepended``'s output holds the token, which comes from no example; the
    parent gives it to example ``B - 1 - b``. Its gradient is not example ``b``'s: pergrad must
    not attribute it by its place (the check against autograd, which would catch it, is off)."""
    torch.manual_seed(0)
    model = Handed().double()
    x, y = torch.randn(4, 2, 3, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    with pytest.warns(pergrad.FallbackWarning, match="cannot follow"):
        sources = statistics(model, _squared, x, y, verify=False)
    assert sources["prepend.token"] in ("func", "hooks", "loop")


class FlippedLearnedQueries(nn.Module):
    """A learned query expanded to the batch, projected, its rows reversed: the expansion's
    rows are alike, and row ``b`` reaches example ``B - 1 - b``."""

    def __init__(self):
        super().__init__()
        self.query = nn.Parameter(torch.randn(1, 3))
        self.project, self.read = nn.Linear(3, 3), nn.Linear(3, 3)

    def forward(self, x):
        q = self.project(self.query.expand(len(x), 3)).flip(0)
        return (self.read(x) * q).sum(1)


def test_an_expanded_parameter_whose_rows_move_between_examples_is_exact():
    torch.manual_seed(0)
    model = FlippedLearnedQueries().double()
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    with pytest.warns(pergrad.FallbackWarning):
        statistics(model, lambda out, y: (out - y).square(), x, y, verify=False)
