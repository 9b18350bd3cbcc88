"""Every way a shortcut could return wrong numbers: each is exact (against one backward per
example) or refused with an error that says what to do. Also the layer-local path, shared
inputs and repeated uses, which the shortcuts rely on."""

import warnings

import pytest
import torch
from torch import nn
from zoo import CROSS_ENTROPY, reference_grads, statistics

import optim
import pergrad

MSE = lambda out, y: (out - y).square().flatten(1).sum(1)  # noqa: E731
WHOLE_MODEL = {"func", "hooks", "loop"}


def quiet_statistics(*args, **kwargs) -> dict[str, str]:
    """``statistics`` where a fallback to a whole-model mode is allowed (and exact)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pergrad.FallbackWarning)
        return statistics(*args, **kwargs)


class AttentionPooling(nn.Module):
    """The attention weights that MultiheadAttention returns reach the loss."""

    def __init__(self, weights_only: bool):
        super().__init__()
        self.attention = nn.MultiheadAttention(4, 2, batch_first=True)
        self.out = nn.Linear(4, 3)
        self.weights_only = weights_only

    def forward(self, x):
        attended, weights = self.attention(x, x, x)  # need_weights=True, the default
        pooled = (weights.unsqueeze(-1) * x.unsqueeze(1)).sum(2).mean(1)
        return self.out(pooled if self.weights_only else pooled + attended.mean(1))


@pytest.mark.parametrize("weights_only", [False, True])
def test_attention_weights_that_reach_the_loss(weights_only):
    torch.manual_seed(0)
    model = AttentionPooling(weights_only).double()
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    sources = statistics(model, CROSS_ENTROPY, x, torch.randint(0, 3, (5,)))
    assert sources["attention.in_proj_weight"] == "MultiheadAttention"  # the rule reads both


@pytest.mark.parametrize("change", [lambda out: 2 * out, torch.tanh], ids=["double", "tanh"])
def test_a_forward_hook_that_changes_a_layer_output(change):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    model[0].register_forward_hook(lambda module, args, out: change(out))
    x = torch.randn(5, 4, dtype=torch.float64)
    assert statistics(model, CROSS_ENTROPY, x, torch.randint(0, 3, (5,)))["0.weight"] == "Linear"


@pytest.mark.parametrize("cls", [nn.Embedding, nn.EmbeddingBag])
def test_scale_grad_by_freq_is_refused_like_batchnorm(cls):
    model = nn.Sequential(cls(7, 3, scale_grad_by_freq=True), nn.Flatten(), nn.LazyLinear(2))
    tokens = torch.tensor([[1, 1, 2], [1, 3, 3]])
    model(tokens)
    engine = pergrad.PerExample(model, CROSS_ENTROPY)
    with pytest.raises(pergrad.InputError, match=r"model\[0\].scale_grad_by_freq = False"):
        engine.backward(tokens, torch.tensor([0, 1]))
    assert all(p.grad is None for p in model.parameters())


def test_a_plain_backward_after_pergrad_is_refused_before_it_is_used():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3)).double()
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    engine = pergrad.PerExample(model, CROSS_ENTROPY)
    opt = optim.Adam(model.parameters(), lr=1e-3)
    engine.backward(x, y)
    CROSS_ENTROPY(model(x), y).mean().backward()  # adds into .grad behind pergrad's back
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(pergrad.InputError, match="changed after pergrad computed it"):
        opt.step()
    with pytest.raises(pergrad.InputError, match="changed after pergrad computed it"):
        engine.backward(x, y)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(state["seen"] == 0 and not state["exp_avg"].any() for state in opt.state.values())
    opt.zero_grad()
    engine.backward(x, y)
    opt.step()  # cleared and recomputed: accepted


def test_statistics_stay_with_their_grad_over_accumulation():
    torch.manual_seed(0)
    model = nn.Linear(4, 3).double()
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    engine = pergrad.PerExample(model, CROSS_ENTROPY)
    engine.backward(x[:3], y[:3])
    engine.backward(x[3:], y[3:])  # pergrad's own accumulation is not a foreign change
    optim.SGD(model.parameters(), lr=0.1).step()


class LearnedScale(nn.Module):
    """A layer no rule knows, owning its parameter directly."""

    def __init__(self, width):
        super().__init__()
        self.gain = nn.Parameter(torch.randn(width))

    def forward(self, x):
        return x * self.gain.exp()


class Container(nn.Module):
    """A ViT-style container: a class token and position embeddings used directly."""

    def __init__(self):
        super().__init__()
        self.cls_token = nn.Parameter(torch.randn(1, 1, 4))
        self.position = nn.Parameter(torch.randn(1, 4, 4))
        self.patch = nn.Linear(2, 4)
        self.scale = LearnedScale(4)
        self.out = nn.Linear(4, 3)

    def forward(self, x):
        h = self.patch(x)
        h = torch.cat([self.cls_token.expand(len(h), -1, -1), h], 1) + self.position
        return self.out(torch.tanh(self.scale(h))[:, 0])


def test_layers_without_rules_use_the_layer_local_path():
    """A layer without a rule is replayed alone; a container's own parameters are taken at
    the operations that use them (replaying it would replay its layers too)."""
    torch.manual_seed(0)
    model = Container().double()
    x = torch.randn(5, 3, 2, dtype=torch.float64)
    sources = statistics(model, CROSS_ENTROPY, x, torch.randint(0, 3, (5,)))
    assert sources == {
        "cls_token": "cat (op)",
        "position": "add (op)",
        "patch.weight": "Linear",
        "patch.bias": "Linear",
        "scale.gain": "LearnedScale (local)",
        "out.weight": "Linear",
        "out.bias": "Linear",
    }


class InPlaceResidual(nn.Module):
    """Falcon's pattern: a layer's output changed in place by the model (``h += residual``),
    then an in-place activation."""

    def __init__(self):
        super().__init__()
        self.first, self.scale, self.out = nn.Linear(3, 4), LearnedScale(4), nn.Linear(4, 3)

    def forward(self, x):
        residual = self.first(x)
        h = self.scale(residual)
        h += residual
        h.tanh_()
        return self.out(h)


def test_an_in_place_change_of_a_layer_output_keeps_it_on_the_per_layer_path():
    torch.manual_seed(0)
    model = InPlaceResidual().double()
    x = torch.randn(5, 3, dtype=torch.float64)
    sources = statistics(model, CROSS_ENTROPY, x, torch.randint(0, 3, (5,)), verify=True)
    assert sources == {
        "first.weight": "Linear",
        "first.bias": "Linear",
        "scale.gain": "LearnedScale (local)",
        "out.weight": "Linear",
        "out.bias": "Linear",
    }


class ExpScale(nn.Module):
    """A layer without a rule whose backward needs its output, not its input."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4))

    def forward(self, x):
        return torch.exp(x) * self.weight


class InputChangedAfterTheCall(nn.Module):
    """The model changes a layer's input in place after calling it, and then its output:
    valid PyTorch (exp keeps its result), where a rule or a replay reading the recorded input
    would see the changed values."""

    def __init__(self):
        super().__init__()
        self.pre, self.scale, self.head = nn.Linear(3, 4), ExpScale(), nn.Linear(4, 2)

    def forward(self, x):
        h = self.pre(x)
        y = self.scale(h)
        h.mul_(3)
        y.add_(h)
        return self.head(y)


def test_a_layer_whose_input_the_model_changes_afterwards_leaves_the_per_layer_path():
    torch.manual_seed(0)
    model = InputChangedAfterTheCall().double()
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randint(0, 2, (5,))
    with pytest.warns(pergrad.FallbackWarning, match="changed its input in place"):
        sources = statistics(model, CROSS_ENTROPY, x, y)
    assert sources["scale.weight"] not in ("ExpScale", "ExpScale (local)")


class Mixing(nn.Module):
    """A layer whose output for one example depends on the others."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4))

    def forward(self, x):
        return (x - x.mean(0)) * self.weight


def test_a_layer_that_mixes_examples_is_refused():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), Mixing(), nn.Linear(4, 3)).double()
    x = torch.randn(5, 4, dtype=torch.float64)
    engine = pergrad.PerExample(model, CROSS_ENTROPY, verify=False)
    with pytest.raises(pergrad.InputError, match="combines examples: aten.mean"):
        engine.grads(x, torch.randint(0, 3, (5,)))


class PositionModel(nn.Module):
    """Position embeddings whose indices are shared by the batch: ``(T,)`` as in nanoGPT,
    ``(1, T)`` as in Hugging Face models; optionally used again, or with a hook on it."""

    def __init__(self, shape: str, misuse: str | None = None):
        super().__init__()
        self.tokens = nn.Embedding(7, 4)
        self.positions = nn.Embedding(8, 4)
        self.out = nn.Linear(4, 3)
        self.shape, self.misuse = shape, misuse

    def forward(self, tokens):
        length = tokens.shape[1]
        index = torch.arange(length) if self.shape == "T" else torch.arange(length)[None]
        position = self.positions(index)
        h = self.tokens(tokens) + position.to(torch.float64)
        if self.misuse == "index":  # indexed, then broadcast: no expansion sees it
            h = h + position.reshape(-1, length, 4)[0]
        elif self.misuse == "scale":  # scaled, then broadcast: its gradient is scaled too
            h = h + 2 * position
        elif self.misuse == "hook" and position.requires_grad:  # a hook scales its gradient
            position.register_hook(lambda g: 3 * g)
        return self.out(torch.tanh(h)).mean(1)


@pytest.mark.parametrize("length", [3, 5])  # 5 = B
@pytest.mark.parametrize("shape", ["T", "1T"])
def test_position_indices_shared_by_the_batch(shape, length):
    torch.manual_seed(0)
    model = PositionModel(shape).double()
    tokens = torch.randint(0, 7, (5, length))
    sources = statistics(model, CROSS_ENTROPY, tokens, torch.randint(0, 3, (5,)))
    # the table's call holds no example's data: its weight is taken where the batch meets it
    assert sources["positions.weight"] == "add (op)"


@pytest.mark.parametrize("misuse", ["index", "scale"])
def test_a_shared_output_used_again_is_taken_at_each_use(misuse):
    torch.manual_seed(0)
    model = PositionModel("1T", misuse).double()
    tokens = torch.randint(0, 7, (5, 3))
    sources = statistics(model, CROSS_ENTROPY, tokens, torch.randint(0, 3, (5,)))
    assert sources["positions.weight"] == "add (op)"


def test_a_hook_on_a_shared_output_sends_its_parameter_to_a_whole_model_mode():
    torch.manual_seed(0)
    model = PositionModel("1T", "hook").double()
    tokens = torch.randint(0, 7, (5, 3))
    with pytest.warns(pergrad.FallbackWarning, match="'positions.weight': a hook"):
        sources = statistics(model, CROSS_ENTROPY, tokens, torch.randint(0, 3, (5,)))
    assert sources["positions.weight"] in WHOLE_MODEL


def test_one_example_batches_with_shared_inputs():
    torch.manual_seed(0)
    model = PositionModel("T").double()
    statistics(model, CROSS_ENTROPY, torch.randint(0, 7, (1, 3)), torch.randint(0, 3, (1,)))


class Checkpointed(nn.Module):
    def __init__(self):
        super().__init__()
        self.first = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 6))
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        h = torch.utils.checkpoint.checkpoint(self.first, x, use_reentrant=False)
        return self.out(torch.tanh(h))


def test_activation_checkpointing_recomputation_is_not_a_second_use():
    torch.manual_seed(0)
    model = Checkpointed().double()
    x = torch.randn(5, 4, dtype=torch.float64)
    sources = statistics(model, CROSS_ENTROPY, x, torch.randint(0, 3, (5,)))
    assert set(sources.values()) == {"Linear"}


class GradientHooked(nn.Module):
    """A model that triples the gradient reaching its first layer's output: by a tensor hook in
    its forward, or by a backward pre-hook of the layer. Autograd sends 3·δ into the layer. A
    tensor hook that changes a gradient could as well move it between examples (``g.flip(0)``),
    so the model goes to a whole-model mode; the layer's own backward pre-hook is honoured."""

    def __init__(self, where: str):
        super().__init__()
        self.first, self.out = nn.Linear(4, 6), nn.Linear(6, 3)
        self.where = where
        if where == "module backward pre-hook":
            self.first.register_full_backward_pre_hook(lambda layer, grads: (3 * grads[0],))

    def forward(self, x):
        h = self.first(x)
        if self.where == "tensor hook in forward" and h.requires_grad:
            h.register_hook(lambda g: 3 * g)
        return self.out(torch.tanh(h))


@pytest.mark.parametrize("where", ["tensor hook in forward", "module backward pre-hook"])
def test_a_gradient_hook_of_the_model_on_a_layer_output_is_honoured(where):
    torch.manual_seed(0)
    model = GradientHooked(where).double()
    x = torch.randn(5, 4, dtype=torch.float64)
    with warnings.catch_warnings():  # torch: no input of the hooked layer requires grad
        warnings.filterwarnings("ignore", "Full backward hook is firing")
        warnings.simplefilter("ignore", pergrad.FallbackWarning)
        sources = statistics(model, CROSS_ENTROPY, x, torch.randint(0, 3, (5,)))
    assert sources["first.weight"] == ("func" if where == "tensor hook in forward" else "Linear")


def test_embedding_bag_with_repeated_tokens_is_exact():
    torch.manual_seed(0)
    model = nn.Sequential(nn.EmbeddingBag(9, 4, mode="sum"), nn.Linear(4, 3)).double()
    tokens = torch.tensor([[1, 1, 2], [3, 3, 3], [1, 2, 4], [5, 5, 1]])
    sources = quiet_statistics(model, CROSS_ENTROPY, tokens, torch.randint(0, 3, (4,)))
    assert sources["1.weight"] == "Linear"


def test_no_whole_model_probe_where_the_layers_cover_everything(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a whole-model mode ran")

    for mode in pergrad.modes.MODES.values():
        monkeypatch.setattr(mode, "__call__", refuse)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    engine = pergrad.PerExample(model, CROSS_ENTROPY)
    engine.backward(torch.randn(5, 4), torch.randint(0, 3, (5,)))
    assert engine.mode == "layerwise"
    assert set(engine.sources.values()) == {"Linear"}


class PackedLSTM(nn.Module):
    """Opacus's DPLSTM on sequences packed with ``enforce_sorted=False``: Opacus returns their
    per-example gradients in length-sorted order."""

    def __init__(self):
        super().__init__()
        from opacus.layers import DPLSTM

        self.lstm = DPLSTM(3, 4, batch_first=True)
        self.out = nn.Linear(4, 2)

    def forward(self, x, lengths):
        packed = nn.utils.rnn.pack_padded_sequence(
            x, lengths, batch_first=True, enforce_sorted=False
        )
        _, (h, _) = self.lstm(packed)
        return self.out(h[-1])


def test_per_example_gradients_returned_in_the_wrong_order_are_refused():
    torch.manual_seed(0)
    model = PackedLSTM()  # float32: DPLSTM's packing casts to it
    inputs = (torch.randn(4, 5, 3), torch.tensor([2, 5, 3, 4]))
    target = torch.randint(0, 2, (4,))
    with pytest.raises(pergrad.ModeError, match="permuted or mixed between examples"):
        pergrad.PerExample(model, CROSS_ENTROPY, mode="hooks").grads(inputs, target)
    engine = pergrad.PerExample(model, CROSS_ENTROPY)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        grads = engine.grads(inputs, target)
    expected = reference_grads(model, CROSS_ENTROPY, inputs, target)
    for name, g in grads.items():
        torch.testing.assert_close(g, expected[name], rtol=1e-4, atol=1e-6, msg=name)
    assert engine.sources["lstm.weight_ih_l0"] == engine.mode == "loop"


def _changes():
    """Ways a model changes between two calls of one engine, each with what must follow."""

    def replace_layer(model):
        model[2] = nn.Linear(6, 3).double()

    def replace_weight(model):
        model[0].weight = nn.Parameter(torch.randn(6, 4, dtype=torch.float64))

    def freeze(model):
        model[0].weight.requires_grad_(False)

    def add_layer(model):
        model.append(nn.Linear(3, 3).double())

    return {"replace_layer": replace_layer, "replace_weight": replace_weight,
            "freeze": freeze, "add_layer": add_layer}  # fmt: skip


@pytest.mark.parametrize("change", list(_changes()))
def test_the_structure_an_engine_keeps_follows_the_model_between_calls(change):
    """The engine keeps what the model's structure determines from one call to the next; a
    model changed in between gets its statistics as a fresh engine would give them."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    engine = pergrad.PerExample(model, CROSS_ENTROPY)
    engine.backward(x, y)
    pergrad.zero_grad(model.parameters())
    _changes()[change](model)
    grads = engine.grads(x, y)
    expected = reference_grads(model, CROSS_ENTROPY, x, y)
    assert grads.keys() == expected.keys()
    for name, g in grads.items():
        torch.testing.assert_close(g, expected[name])
    engine.backward(x, y)
    for name, p in model.named_parameters():
        assert (p.grad is None) == (name not in expected)


def test_a_layer_reconfigured_between_calls_is_checked_again():
    model = nn.Sequential(nn.Embedding(7, 3), nn.Flatten(), nn.Linear(6, 2)).double()
    tokens, y = torch.tensor([[1, 1], [2, 3], [4, 4]]), torch.tensor([0, 1, 1])
    engine = pergrad.PerExample(model, CROSS_ENTROPY)
    engine.backward(tokens, y)
    assert engine.sources["0.weight"] == "Embedding"
    pergrad.zero_grad(model.parameters())
    model[0].sparse = True  # outside the Embedding rule now
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pergrad.FallbackWarning)
        grads = engine.grads(tokens, y)
    assert engine.sources["0.weight"] != "Embedding"
    torch.testing.assert_close(
        grads["0.weight"], reference_grads(model, CROSS_ENTROPY, tokens, y)["0.weight"]
    )
    model[0].sparse, model[0].scale_grad_by_freq = False, True
    with pytest.raises(pergrad.InputError, match="scale_grad_by_freq"):
        engine.backward(tokens, y)
    model[0].scale_grad_by_freq = False
    bn = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)).double().eval()
    engine = pergrad.PerExample(bn, CROSS_ENTROPY)
    engine.backward(torch.randn(4, 4, dtype=torch.float64), torch.zeros(4).long())
    bn.train()
    with pytest.raises(pergrad.InputError, match="training mode"):
        engine.backward(torch.randn(4, 4, dtype=torch.float64), torch.zeros(4).long())


def opaque(x: torch.Tensor) -> torch.Tensor:
    """The identity here, through an operation pergrad does not follow: each row scaled to a
    norm of at most 10⁶."""
    return torch.renorm(x, p=2, dim=0, maxnorm=1e6)


class Centred(nn.Module):
    """A layer, an operation pergrad does not follow, then, optionally, the batch's mean
    subtracted (the example of the errors guide)."""

    def __init__(self, centred: bool, dropout: float = 0.0):
        super().__init__()
        self.lin, self.drop, self.centred = nn.Linear(5, 3), nn.Dropout(dropout), centred

    def forward(self, x):
        h = opaque(self.drop(self.lin(x)))
        return h - h.mean(0) if self.centred else h


@pytest.mark.parametrize("mode", ["auto", "func", "loop"])
@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_examples_combined_after_an_operation_not_followed_are_refused(mode, dropout):
    """The modes compute each example alone; what they compute is compared with the batch
    (with dropout, with every random draw fixed), and the model refused."""
    torch.manual_seed(0)
    model = Centred(centred=True, dropout=dropout).double()
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    engine = pergrad.PerExample(model, MSE, mode=mode)
    with pytest.raises(pergrad.InputError, match="combines examples: the loss of example"):
        engine.backward(x, y)
    assert all(p.grad is None for p in model.parameters())


def test_an_operation_not_followed_on_a_model_that_does_not_combine_examples():
    torch.manual_seed(0)
    model = Centred(centred=False).double()
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    with pytest.warns(pergrad.FallbackWarning, match="cannot follow .*aten.renorm"):
        sources = statistics(model, MSE, x, y)
    assert set(sources.values()) == {"func"}


def test_with_dropout_the_examples_alone_are_compared_with_every_draw_fixed():
    """Dropout draws other masks for each example alone than for the batch: the comparison
    and the verification of the parameters from ``func`` run with every draw fixed."""
    torch.manual_seed(0)
    model = Centred(centred=False, dropout=0.5).double()
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    engine = pergrad.PerExample(model, MSE, verify=True)
    with pytest.warns(pergrad.FallbackWarning):
        engine.backward(x, y)
    assert engine.sources == {"lin.weight": "func", "lin.bias": "func"}
    assert all(bool(p.grad.ne(0).any()) for p in model.parameters())


def test_a_random_draw_pergrad_cannot_fix_is_refused():
    class Gamma(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(5, 3)

        def forward(self, x):
            h = opaque(self.lin(x))
            return h * torch._standard_gamma(torch.ones_like(h))

    torch.manual_seed(0)
    x, y = torch.randn(6, 5), torch.randn(6, 3)
    with pytest.raises(pergrad.InputError, match="random numbers with aten._standard_gamma"):
        pergrad.PerExample(Gamma(), MSE, mode="loop").backward(x, y)


@pytest.mark.parametrize(
    "end, expected",
    [("low", [0, 0, -1, 2, -1.5, 3, 0]), ("high", [1 / 0.7, 1 - 2**-24, 1, 4, 4.5, 8, 1])],
)
def test_fixed_draws_do_not_depend_on_how_many_examples_a_call_holds(end, expected):
    """At either end of what it draws, each draw of one example alone is the batch's row;
    a permutation is the identity at one end and reverses the batch at the other."""
    from pergrad.randomness import Draws, FixedRandom

    def draws(size: int) -> list[torch.Tensor]:
        x = torch.ones(size, 4)
        return [
            nn.functional.dropout(x, 0.3),
            torch.rand(size, 4),
            torch.randn_like(x),
            torch.empty(size, 4).uniform_(2.0, 4.0),
            torch.empty(size, 4).normal_(1.5, 3.0),
            torch.randint(3, 9, (size, 4)).float(),
            torch.bernoulli(torch.full((size, 4), 0.2)),
        ]

    state = torch.random.get_rng_state()
    with FixedRandom(end):
        batch, alone = draws(5), draws(1)
        order = torch.randperm(5)
    for many, one in zip(batch, alone):
        assert torch.equal(many, one.expand_as(many))
    assert [float(t[0, 0]) for t in alone] == pytest.approx(expected)
    assert torch.equal(order, torch.arange(5) if end == "low" else torch.arange(4, -1, -1))
    torch.random.set_rng_state(state)
    seen = Draws()
    with seen:
        nn.functional.dropout(torch.ones(3), 0.0)  # draws nothing
        torch.rand(2)
    assert seen.found == ["aten.rand.default"]


def test_a_random_permutation_that_mixes_examples_is_refused():
    """Mixup: each example mixed with another drawn at random. The draw fixed as the
    identity would hide it; at the other end it reverses the batch."""

    class Mixup(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(5, 3)

        def forward(self, x):
            return self.lin(0.5 * x + 0.5 * x[torch.randperm(len(x))])

    torch.manual_seed(0)
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    for mode in ("auto", "func", "loop"):
        model = Mixup().double()
        with pytest.raises(pergrad.InputError, match="combines examples"):
            pergrad.PerExample(model, MSE, mode=mode).backward(x, y)
        assert all(p.grad is None for p in model.parameters())


def test_verification_checks_the_parameters_of_the_modes_that_run_each_example_alone(monkeypatch):
    torch.manual_seed(0)
    model = Centred(centred=False).double()
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    call = pergrad.modes.FuncMode.__call__

    def shuffled(self, params, inputs, target):  # each gradient given to another example
        grads, losses = call(self, params, inputs, target)
        return {name: g.roll(1, 0) for name, g in grads.items()}, losses

    monkeypatch.setattr(pergrad.modes.FuncMode, "__call__", shuffled)
    engine = pergrad.PerExample(model, MSE, verify=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pergrad.FallbackWarning)
        with pytest.raises(pergrad.VerificationError, match="'lin.weight' .from func."):
            engine.grads(x, y)


class Summed(nn.Module):
    """A module that owns its parameter and reduces its input to a number."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(3))

    def forward(self, x):
        return (x * self.w).sum()


class OneNumberPerExample(nn.Module):
    def __init__(self):
        super().__init__()
        self.summed = Summed()

    def forward(self, x):
        return torch.stack([self.summed(row) for row in x])


@pytest.mark.parametrize("size, chunk_size", [(1, None), (3, 2), (4, 1)])
def test_a_call_on_one_example_that_returns_a_number(size, chunk_size):
    """A batch of one, or chunks of one: the layer's output, a 0-dim number, is that one
    example's."""
    torch.manual_seed(0)
    model = OneNumberPerExample().double()
    x, y = torch.randn(size, 3, dtype=torch.float64), torch.randn(size, dtype=torch.float64)
    sources = statistics(model, lambda out, t: (out - t) ** 2, x, y, chunk_size=chunk_size)
    assert sources == {"summed.w": "Summed (local)"}


class Counting(Centred):
    """Centred, counting its forward passes in a buffer, as a running statistic would."""

    def __init__(self, dropout: float):
        super().__init__(centred=False, dropout=dropout)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        self.calls += 1
        return super().forward(x)


def test_the_comparisons_passes_leave_the_buffers_as_they_were():
    """With dropout, the comparison runs the batch and each example again: the buffers (a
    running statistic) count the passes that computed, not those that only compared."""
    counts = {}
    for dropout in (0.0, 0.5):
        torch.manual_seed(0)
        model = Counting(dropout).double()
        x, y = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
        engine = pergrad.PerExample(model, MSE, verify=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", pergrad.FallbackWarning)
            engine.backward(x, y)
        counts[dropout] = int(model.calls)
    assert counts[0.5] == counts[0.0]


class Masked(nn.Module):
    """Attention with a causal mask ``(L, L)`` shared by the batch, passed by position."""

    def __init__(self):
        super().__init__()
        self.attention = nn.MultiheadAttention(4, 2, batch_first=True)

    def forward(self, x):
        mask = torch.triu(torch.full((x.shape[1],) * 2, float("-inf"), dtype=x.dtype), 1)
        return self.attention(x, x, x, None, False, mask)[0].sum((1, 2))


@pytest.mark.parametrize("size", [1, 3])
def test_a_shared_positional_input_is_not_cut_into_examples(size):
    torch.manual_seed(0)
    model = Masked().double()
    x, y = torch.randn(size, 4, 4, dtype=torch.float64), torch.randn(size, dtype=torch.float64)
    sources = statistics(model, lambda out, t: (out - t) ** 2, x, y, chunk_size=2)
    assert set(sources.values()) == {"MultiheadAttention"}


def test_a_half_precision_model_keeps_its_rules():
    """Parameters in bfloat16: the rules run in their precision (not float32 inputs against
    bfloat16 weights), and the comparison with the batch at bfloat16's rounding."""
    torch.manual_seed(0)
    for layer, shape in [
        (nn.LSTMCell(3, 4), (5, 3)),
        (nn.LSTM(3, 4, batch_first=True), (5, 6, 3)),
        (nn.GRU(3, 4, batch_first=True), (5, 6, 3)),
    ]:
        model = nn.Sequential(layer).to(torch.bfloat16)

        def loss(out, y):
            out = out[0] if isinstance(out, tuple) else out
            return (out.float().flatten(1).sum(1) - y) ** 2

        x, y = torch.randn(*shape, dtype=torch.bfloat16), torch.randn(5)
        engine = pergrad.PerExample(model, loss, verify=False)
        engine.grads(x, y)
        assert set(engine.sources.values()) == {type(layer).__name__}
        for mode in ("loop", "func"):  # one example at a time, against the batch
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", pergrad.FallbackWarning)
                try:
                    pergrad.PerExample(model, loss, mode=mode, verify=False).grads(x, y)
                except pergrad.ModeError:  # vmap cannot run the layer: not this test's matter
                    pass
