"""Parameters used in a model's own code, outside the layers that own them: each use is taken
at the operation (``F.linear``, ``@``, ``conv1d``, element-wise scales, a table indexed by a
buffer), on each example's rows, and checked against one backward per example; a use pergrad
cannot see sends the parameter to a whole-model mode."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from zoo import reference_grads, statistics

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


class Converted(nn.Module):
    """A parent's use of a layer's weight cast to the input's dtype, as mixed-precision code
    writes ``W.type_as(x)``."""

    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(3, 2)

    def forward(self, x):
        return torch.tanh(self.layer(x)) @ self.layer.weight.type_as(x)


@pytest.mark.parametrize(
    "model, shape, out",
    [
        (FusedExperts, (5, 3, 4), (5, 4)),
        (Scaled, (5, 3, 3), (5, 3, 4)),
        (Convolved, (5, 4, 6), (5, 4, 6)),
        (Permuted, (5, 3), (5, 2)),
        (Converted, (5, 3), (5, 3)),
    ],
    ids=["fused_experts", "scaled", "convolved", "permuted", "converted"],
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
    with pytest.warns(pergrad.FallbackWarning, match="given to examples by their place"):
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


def _exact(model, x, y, loss_fn=_squared, fallback=None):
    """Per-example gradients equal to one backward per example, the check against autograd
    off; ``fallback``: the reason every parameter is expected to go to a whole-model mode."""
    reference = reference_grads(model, loss_fn, x, y)
    engine = pergrad.PerExample(model, loss_fn, verify=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", pergrad.FallbackWarning)
        grads = engine.grads(x, y)
    for name, g in reference.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-10, atol=1e-12, msg=name)
    messages = " ".join(str(w.message) for w in caught)
    assert (fallback in messages) if fallback else not messages, messages
    return engine.sources


class CallsItself(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(3))

    def forward(self, x, depth=0):
        if depth == 0:
            x = self(x, depth=1)
        return torch.tanh(x * self.w)


class CaughtFailure(nn.Module):
    """A position table called once on an index out of range, the error caught, then on the
    batch's own indices."""

    def __init__(self):
        super().__init__()
        self.pos, self.lin = nn.Embedding(5, 3), nn.Linear(3, 3)

    def forward(self, x):
        try:
            self.pos(torch.tensor([7]))
        except IndexError:
            pass
        return self.lin(x) + self.pos((x[:, 0] > 0).long())


class HookedGradient(nn.Module):
    """A hook on a gradient, put during the forward pass: it reverses the batch's rows of a
    layer's output gradient, which one example alone never sees."""

    def __init__(self):
        super().__init__()
        self.p, self.lin = nn.Parameter(torch.randn(3)), nn.Linear(3, 3)

    def forward(self, x):
        h = x * self.p
        if h.requires_grad:
            h.register_hook(lambda g: g.flip(0))
        return self.lin(h)


class Squared(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a):
        ctx.save_for_backward(a)
        return a * a

    @staticmethod
    def backward(ctx, g):
        (a,) = ctx.saved_tensors
        return 2 * a * g


class SmallHiddenUse(nn.Module):
    """A use of a tensor computed from ``p`` through a custom Function, small beside the
    others: the check that uses add up must compare element by element."""

    def __init__(self):
        super().__init__()
        self.p, self.lin = nn.Parameter(torch.tensor([0.5, -1.0, 2.0])), nn.Linear(3, 3)

    def forward(self, x):
        extra = x[:, 2:] * Squared.apply(self.p[2:] * 1.0)
        return self.lin(x) + x * self.p + torch.cat([torch.zeros_like(x[:, :2]), extra], 1)


class VmapInside(nn.Module):
    def __init__(self):
        super().__init__()
        self.p, self.lin = nn.Parameter(torch.randn(3)), nn.Linear(3, 3)

    def forward(self, x):
        return torch.vmap(lambda row: torch.tanh(row * self.p))(self.lin(x))


class FunctionalCall(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, x):
        weights = {"weight": self.lin.weight * 2, "bias": self.lin.bias}
        return torch.func.functional_call(self.lin, weights, (x,))


def test_a_layer_that_calls_itself_goes_to_a_whole_model_mode():
    torch.manual_seed(0)
    x = torch.randn(4, 3, dtype=torch.float64)
    _exact(CallsItself().double(), x, torch.randn_like(x), fallback="it calls itself")


def test_a_call_that_raises_inside_the_model_is_not_mistaken_for_the_next():
    torch.manual_seed(0)
    x = torch.randn(4, 3, dtype=torch.float64)
    assert _exact(CaughtFailure().double(), x, torch.randn_like(x))["pos.weight"] == "Embedding"


def test_a_hook_on_a_gradient_in_the_forward_pass_sends_the_model_to_a_whole_model_mode():
    torch.manual_seed(0)
    x = torch.randn(4, 3, dtype=torch.float64)
    _exact(
        HookedGradient().double(),
        x,
        torch.randn_like(x),
        fallback="a hook the model put on a gradient",
    )


def test_a_small_use_pergrad_does_not_see_is_not_hidden_by_large_ones():
    torch.manual_seed(0)
    x = torch.randn(4, 3, dtype=torch.float64)
    x[:, 0] *= 1e5
    sources = _exact(
        SmallHiddenUse().double(), x, torch.randn_like(x), fallback="'p': no layer owns it"
    )
    assert sources["p"] in ("func", "hooks", "loop")


def test_vmap_and_functional_call_inside_the_model():
    torch.manual_seed(0)
    x = torch.randn(4, 3, dtype=torch.float64)
    sources = _exact(VmapInside().double(), x, torch.randn_like(x), fallback="'p'")
    assert sources["p"] in ("func", "hooks", "loop") and sources["lin.weight"] == "Linear"
    sources = _exact(FunctionalCall().double(), x, torch.randn_like(x))
    assert sources == {"lin.weight": "linear (op)", "lin.bias": "linear (op)"}


class Cached(nn.Module):
    """A tensor computed from a parameter once, on the first forward pass, and kept."""

    def __init__(self):
        super().__init__()
        self.p, self.lin, self.kept = nn.Parameter(torch.randn(3)), nn.Linear(3, 3), None

    def forward(self, x):
        if self.kept is None:
            self.kept = self.p + 1
        return self.lin(x) * self.kept


def test_a_tensor_the_model_keeps_from_an_earlier_pass_is_never_silently_dropped():
    """The first pass takes ``p`` at its use; later passes see the kept tensor tied to ``p``
    itself (the one-example pass included), a use no operation reports: a whole-model mode,
    which cannot run the kept tensor and says so. The model still trains ``p`` plainly."""
    torch.manual_seed(0)
    model = Cached().double()
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    engine = pergrad.PerExample(model, _squared, verify=False)
    with pytest.raises(pergrad.InputError, match="do not depend on any trainable parameter"):
        engine.grads(x, y)
    _squared(model(x), y).sum().backward()
    assert model.p.grad is not None and bool(model.p.grad.abs().sum() > 0)
