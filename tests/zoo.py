"""Models the tests run every mode on, the references they compare with, and tolerances."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

import pergrad

RTOL, ATOL = 1e-6, 1e-9
"""Tolerances for float64 comparisons, defined once."""

ALL_MODES = frozenset({"func", "hooks", "loop"})


def reference_grads(model: nn.Module, loss_fn, inputs, target) -> dict[str, Tensor]:
    """Per-example gradients by one ``loss.backward()`` per example: the independent reference."""
    keyed = isinstance(inputs, dict)
    inputs = inputs if keyed or isinstance(inputs, tuple) else (inputs,)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    saved = {n: p.grad for n, p in params.items()}
    out: dict[str, list[Tensor]] = {n: [] for n in params}
    for b in range(len(target)):
        for p in params.values():
            p.grad = None
        if keyed:
            output = model(**{key: x[b : b + 1] for key, x in inputs.items()})
        else:
            output = model(*(x[b : b + 1] for x in inputs))
        loss_fn(output, target[b : b + 1]).sum().backward()
        for n, p in params.items():
            out[n].append(torch.zeros_like(p) if p.grad is None else p.grad.clone())
    for n, p in params.items():
        p.grad = saved[n]
    return {n: torch.stack(gs) for n, gs in out.items()}


def statistics(model, loss_fn, inputs, target, **options) -> dict[str, str]:
    """Run ``backward`` and ``grads`` in ``"auto"`` and compare every parameter's mean, mean of
    squares and per-example gradients with one backward per example; return where each
    parameter's statistics came from."""
    engine = pergrad.PerExample(model, loss_fn, **options)
    engine.backward(inputs, target)
    reference = reference_grads(model, loss_fn, inputs, target)
    for name, p in model.named_parameters():
        if name not in reference:
            continue
        g = reference[name]
        scale = max(float(g.abs().max()), 1.0)  # rounding noise of an all-zero gradient
        torch.testing.assert_close(p.grad, g.mean(0), rtol=RTOL, atol=1e-9 * scale, msg=name)
        torch.testing.assert_close(
            p.grad_stats.sq_mean, g.square().mean(0), rtol=RTOL, atol=1e-9 * scale**2, msg=name
        )
    pergrad.zero_grad(model.parameters())
    sources = engine.sources
    grads = engine.grads(inputs, target)  # the per-example rules give the same parameters
    assert engine.sources == sources
    for name, g in grads.items():
        scale = max(float(reference[name].abs().max()), 1.0)
        torch.testing.assert_close(g, reference[name], rtol=RTOL, atol=1e-9 * scale, msg=name)
        assert not g.requires_grad, f"{name}: per-example gradients that keep a graph"
    for p in model.parameters():  # and the statistics are plain numbers too
        assert p.grad is None or not p.grad.requires_grad
    return sources


def assert_close_dicts(actual: dict[str, Tensor], expected: dict[str, Tensor], **tolerances):
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(
            actual[name], expected[name], **(tolerances or {"rtol": RTOL, "atol": ATOL}), msg=name
        )


class Cube(torch.autograd.Function):
    """A custom autograd Function with no vmap support (no ``setup_context``)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x**3

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 3 * x**2 * grad


class CustomFunction(nn.Module):
    def __init__(self):
        super().__init__()
        self.hidden = nn.Linear(6, 5)
        self.out = nn.Linear(5, 3)

    def forward(self, x):
        return self.out(Cube.apply(self.hidden(x)))


class CubedScale(nn.Module):
    """A layer without a rule whose forward runs a custom autograd Function with no vmap
    support: neither the layer-local path, nor ``func``, nor Opacus can take it."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(5))

    def forward(self, x):
        return Cube.apply(x * self.weight)


class NoVmap(nn.Module):
    def __init__(self):
        super().__init__()
        self.hidden, self.cubed, self.out = nn.Linear(6, 5), CubedScale(), nn.Linear(5, 3)

    def forward(self, x):
        return self.out(self.cubed(self.hidden(x)))


class ItemControlFlow(nn.Module):
    """Data-dependent Python control flow through ``.item()``, the same branch for every example."""

    def __init__(self):
        super().__init__()
        self.hidden = nn.Linear(6, 5)
        self.out = nn.Linear(5, 3)

    def forward(self, x):
        h = self.hidden(x)
        if h.abs().max().item() < 1e6:  # a guard like this is common, and vmap cannot trace it
            h = 2 * h
        return self.out(torch.tanh(h))


class Recurrent(nn.Module):
    def __init__(
        self, cell: type[nn.RNNBase], batch_first: bool = True, hidden: int = 7, **options
    ):
        super().__init__()
        self.embed = nn.Embedding(11, 6)
        self.rnn = cell(6, hidden, batch_first=batch_first, **options)
        self.out = nn.Linear(7, 3)
        self.batch_first = batch_first

    def forward(self, tokens):
        if self.batch_first:
            return self.out(self.rnn(self.embed(tokens))[0][:, -1])
        return self.out(self.rnn(self.embed(tokens.T))[0][-1])


class Packed(nn.Module):
    """A GRU on packed sequences of different lengths (each read from its first token), in
    no order; its final state reaches the loss."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 6)
        self.rnn = nn.GRU(6, 7, batch_first=True)
        self.out = nn.Linear(7, 3)

    def forward(self, tokens):
        lengths = 1 + tokens[:, 0] % tokens.shape[1]
        packed = nn.utils.rnn.pack_padded_sequence(
            self.embed(tokens), lengths, batch_first=True, enforce_sorted=False
        )
        return self.out(self.rnn(packed)[1][0])


class Transformer(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 8)
        self.encoder = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.out = nn.Linear(8, 3)

    def forward(self, tokens):
        return self.out(self.encoder(self.embed(tokens)).mean(1))


class EmbeddingLayerNorm(nn.Module):
    def __init__(self, padding_idx: int | None = None):
        super().__init__()
        self.embed = nn.Embedding(11, 8, padding_idx=padding_idx)
        self.norm = nn.LayerNorm(8)
        self.out = nn.Linear(8, 3)

    def forward(self, tokens):
        return self.out(self.norm(self.embed(tokens)).mean(1))


class Tied(nn.Module):
    """An embedding whose weight is also the output projection."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 6)
        self.hidden = nn.Linear(6, 6)
        self.out = nn.Linear(6, 11, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, tokens):
        return self.out(torch.tanh(self.hidden(self.embed(tokens))).mean(1))


class ParentUse(nn.Module):
    """The embedding's weight also used by the parent, outside the layer (a tied head written
    ``h @ embed.weight.T``, as nanoGPT-style code does): the per-layer path takes that use at
    the operation."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 6)
        self.hidden = nn.Linear(6, 6)

    def forward(self, tokens):
        return torch.tanh(self.hidden(self.embed(tokens))).mean(1) @ self.embed.weight.T


class TimesTransposed(torch.autograd.Function):
    """``h @ wᵀ`` as a custom autograd Function: an operation on a parameter whose inside no
    torch function reports to pergrad (``vmap`` runs it)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(h, w):
        return h @ w.T

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, grad):
        h, w = ctx.saved_tensors
        return grad @ w, grad.T @ h


class OpaqueUse(ParentUse):
    """The parent's use of the embedding's weight through a custom autograd Function: the
    per-layer path covers the other parameters, a whole-model mode the embedding's."""

    def forward(self, tokens):
        hidden = torch.tanh(self.hidden(self.embed(tokens))).mean(1)
        return TimesTransposed.apply(hidden, self.embed.weight)


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 5)
        self.b = nn.Linear(4, 5)
        self.out = nn.Linear(5, 3)

    def forward(self, x, z):
        return self.out(torch.tanh(self.a(x) + self.b(z)))


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))


def frozen() -> nn.Module:
    model = mlp()
    model[0].weight.requires_grad_(False)
    return model


def cnn1d() -> nn.Module:
    return nn.Sequential(
        nn.Conv1d(2, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU(), nn.Flatten(), nn.Linear(32, 3)
    )


def cnn2d() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, stride=2), nn.GroupNorm(2, 4), nn.ReLU(), nn.Flatten(), nn.Linear(36, 3)
    )


def batchnorm_eval() -> nn.Module:
    model = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3))
    model[1].running_mean.uniform_(-1, 1)
    model[1].running_var.uniform_(0.5, 2)
    return model.eval()


def _features(b: int) -> tuple[Tensor, ...]:
    return (torch.randn(b, 6, dtype=torch.float64),)


def _tokens(b: int) -> tuple[Tensor, ...]:
    return (torch.randint(0, 11, (b, 5)),)


@dataclass(frozen=True)
class Case:
    """A model, a way to make its inputs, and the modes that can run it."""

    make: Callable[[], nn.Module]
    inputs: Callable[[int], tuple[Tensor, ...]]
    modes: frozenset[str]
    auto: str  # the mode "auto" ends in: "layerwise", or the whole-model mode for what it leaves
    classes: int = 3

    def build(self, batch_size: int, seed: int = 0):
        torch.manual_seed(seed)
        model = self.make().double()
        inputs = self.inputs(batch_size)
        target = torch.randint(0, self.classes, (batch_size,))
        return model, inputs, target


CASES = {
    "mlp": Case(mlp, _features, ALL_MODES, "layerwise"),
    "frozen": Case(frozen, _features, ALL_MODES, "layerwise"),
    "two_inputs": Case(
        TwoInputs,
        lambda b: (torch.randn(b, 6, dtype=torch.float64), torch.randn(b, 4, dtype=torch.float64)),
        ALL_MODES,
        "layerwise",
    ),
    "cnn1d_groupnorm": Case(
        cnn1d, lambda b: (torch.randn(b, 2, 8, dtype=torch.float64),), ALL_MODES, "layerwise"
    ),
    "cnn2d_groupnorm": Case(
        cnn2d, lambda b: (torch.randn(b, 2, 7, 7, dtype=torch.float64),), ALL_MODES, "layerwise"
    ),
    "embedding_layernorm": Case(EmbeddingLayerNorm, _tokens, ALL_MODES, "layerwise"),
    # Opacus gives the padding row a gradient; the hooks guard catches it
    "embedding_padding_idx": Case(
        lambda: EmbeddingLayerNorm(padding_idx=0), _tokens, frozenset({"func", "loop"}), "layerwise"
    ),
    "batchnorm_eval": Case(batchnorm_eval, _features, frozenset({"func", "loop"}), "layerwise"),
    "transformer": Case(Transformer, _tokens, frozenset({"func", "loop"}), "layerwise"),
    "tied": Case(Tied, _tokens, frozenset({"func", "hooks", "loop"}), "layerwise", classes=11),
    # Opacus misses the parent's use, and the hooks guard catches it
    "parent_use": Case(ParentUse, _tokens, frozenset({"func", "loop"}), "layerwise", classes=11),
    "opaque_use": Case(OpaqueUse, _tokens, frozenset({"func", "loop"}), "func", classes=11),
    # vmap runs a float32 LSTM on CPU, not a float64 one
    "lstm": Case(lambda: Recurrent(nn.LSTM), _tokens, frozenset({"loop"}), "layerwise"),
    "gru": Case(lambda: Recurrent(nn.GRU), _tokens, frozenset({"loop"}), "layerwise"),
    "gru_time_first": Case(
        lambda: Recurrent(nn.GRU, batch_first=False), _tokens, frozenset({"loop"}), "layerwise"
    ),
    # vmap cannot pack
    "gru_packed": Case(Packed, _tokens, frozenset({"loop"}), "layerwise"),
    # vmap cannot replay a projected LSTM, its rule can
    "lstm_projected": Case(
        lambda: Recurrent(nn.LSTM, hidden=9, proj_size=7), _tokens, frozenset({"loop"}), "layerwise"
    ),
    "no_vmap": Case(NoVmap, _features, frozenset({"loop"}), "loop"),
    "item": Case(ItemControlFlow, _features, frozenset({"hooks", "loop"}), "layerwise"),
    "custom_function": Case(CustomFunction, _features, frozenset({"hooks", "loop"}), "layerwise"),
}

CROSS_ENTROPY = nn.CrossEntropyLoss(reduction="none")
