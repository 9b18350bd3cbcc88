"""The statistics in every precision.

A mean of squares is never negative nor below the square of the mean (up to rounding); every
built-in rule's closed forms give that, in float64, float32 and under bfloat16 autocast, where
they are formed and summed in float32 and come within bfloat16's rounding of a float64
reference. Real models trained a few steps under bfloat16
autocast with ``optim.Adam`` stay finite."""

from __future__ import annotations

import contextlib
import copy
import warnings

import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st
from test_rules import RULE_CASES
from torch import nn
from zoo import reference_grads

import optim
import pergrad

PRECISIONS = {
    # name: (parameter dtype, autocast, tolerance against float64, relative to the largest;
    # under autocast, beyond what autograd itself reaches there)
    "float64": (torch.float64, False, 1e-9),
    "float32": (torch.float32, False, 1e-4),
    "bfloat16 autocast": (torch.float32, True, 2e-2),
}


class Readout(nn.Module):
    """The layer, then a fixed random projection of its first output to one number per
    example."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, *inputs):
        out = self.layer(*inputs)
        out = out[0] if isinstance(out, tuple) else out
        generator = torch.Generator().manual_seed(0)
        weights = torch.randn(out.shape[1:], generator=generator).to(out)
        return (torch.tanh(out) * weights).flatten(1).sum(1)


def _squared(output, target):
    return (output.float() - target) ** 2


def _autocast(on: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16) if on else contextlib.nullcontext()


@pytest.mark.parametrize("precision", sorted(PRECISIONS))
@pytest.mark.parametrize("case", sorted(RULE_CASES))
@settings(max_examples=4)
@given(size=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_the_mean_of_squares_is_at_least_the_square_of_the_mean(case, precision, size, seed):
    dtype, autocast, tolerance = PRECISIONS[precision]
    make_layer, make_inputs = RULE_CASES[case]
    torch.manual_seed(seed)
    layer = make_layer()
    for p in layer.parameters():
        nn.init.normal_(p)
    model = Readout(layer).to(dtype)
    inputs = make_inputs(size)
    inputs = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
    target = torch.randn(size)
    exact = Readout(copy.deepcopy(layer).double())
    expected = reference_grads(
        exact, _squared, tuple(x.double() if x.is_floating_point() else x for x in inputs), target
    )
    inputs = tuple(x.to(dtype) if x.is_floating_point() else x for x in inputs)
    plain = _plain(model, inputs, target, autocast)
    if plain is None:
        pytest.skip(f"PyTorch cannot run {case} in {precision} on this processor")
    engine = pergrad.PerExample(model, _squared, verify=not autocast)
    with _autocast(autocast), warnings.catch_warnings():
        warnings.simplefilter("ignore", pergrad.FallbackWarning)  # slower, as exact
        engine.backward(inputs, target)
    for name, p in model.named_parameters():
        grad, sq_mean = p.grad.double(), p.grad_stats.sq_mean.double()
        g = expected[name]
        scale = max(float(g.abs().max()), 1e-6)
        squares = tolerance
        if autocast:  # plus twice autograd's own distance from float64 in this precision
            total = g.sum(0)
            off = float(
                (plain[name].double() - total).abs().max() / total.abs().max().clamp(min=1e-6)
            )
            tolerance = PRECISIONS[precision][2] + 2 * off
            squares = 2 * tolerance
        assert bool((sq_mean >= 0).all()), f"{name}: a negative mean of squares"
        below = float((grad.square() - sq_mean).max())
        assert below <= squares * scale**2, f"{name}: {below:.3g} below the square of the mean"
        torch.testing.assert_close(
            grad, g.mean(0), rtol=0, atol=tolerance * scale, msg=f"{name} ({precision})"
        )
        torch.testing.assert_close(
            sq_mean, g.square().mean(0), rtol=0, atol=squares * scale**2, msg=name
        )


def _plain(model, inputs, target, autocast: bool) -> dict | None:
    """``∇ Σ_b ℓ_b`` by autograd in the precision given, or ``None`` where PyTorch cannot
    run the layer in it (oneDNN's bfloat16 LSTM, on some processors)."""
    try:
        with _autocast(autocast):
            loss = _squared(model(*inputs), target).sum()
            grads = torch.autograd.grad(loss, list(model.parameters()))
    except RuntimeError:
        return None
    return dict(zip((n for n, _ in model.named_parameters()), grads))


def test_the_mean_of_squares_of_identical_examples_is_the_square_of_the_mean():
    """Identical examples: ``q = ĝ²`` in exact arithmetic, up to rounding in float32, through
    accumulation too; and on positions whose products cancel (the pair expansion)."""
    torch.manual_seed(0)
    for x in (torch.randn(1, 7).expand(6, 7) * 1e3, torch.randn(1, 2, 7).expand(6, 2, 7)):
        model = nn.Linear(7, 3)
        engine = pergrad.PerExample(model, lambda out, y: (out - y).square().flatten(1).sum(1))
        for _ in range(3):
            engine.backward(x, torch.randn(1, *x.shape[1:-1], 3).expand(6, *x.shape[1:-1], 3))
            for p in model.parameters():
                sq_mean, square = p.grad_stats.sq_mean, p.grad.square()
                assert bool((sq_mean >= 0).all())
                assert bool((sq_mean >= square * (1 - 1e-5)).all())


def _gpt2():
    config = transformers.GPT2Config(
        vocab_size=61, n_positions=16, n_embd=32, n_layer=2, n_head=4, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config), "tokens"


def _llama():
    config = transformers.LlamaConfig(
        vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config), "tokens"


def _vit():
    config = transformers.ViTConfig(
        image_size=8, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=4, intermediate_size=64, num_labels=5,
    )  # fmt: skip
    return transformers.ViTForImageClassification(config), "images"


class Block(nn.Module):
    """A residual block with GroupNorm."""

    def __init__(self, width: int):
        super().__init__()
        self.conv1, self.conv2 = (
            nn.Conv2d(width, width, 3, padding=1),
            nn.Conv2d(width, width, 3, padding=1),
        )
        self.norm1, self.norm2 = nn.GroupNorm(4, width), nn.GroupNorm(4, width)

    def forward(self, x):
        h = torch.relu(self.norm1(self.conv1(x)))
        return torch.relu(x + self.norm2(self.conv2(h)))


def _resnet_gn():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(4, 8), nn.ReLU(), Block(8), Block(8),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5),
    )  # fmt: skip
    return model, "images"


MODELS = {"gpt2": _gpt2, "llama": _llama, "vit": _vit, "resnet_gn": _resnet_gn}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_real_models_train_under_bfloat16_autocast_and_stay_finite(name):
    torch.manual_seed(0)
    model, kind = MODELS[name]()
    if kind == "tokens":
        loss_fn = pergrad.losses.causal_lm
        batches = [torch.randint(0, 61, (4, 12)) for _ in range(3)]
        batches = [({"input_ids": x}, x) for x in batches]
    else:
        loss_fn = (
            pergrad.losses.classification
            if name == "vit"
            else nn.CrossEntropyLoss(reduction="none")
        )
        batches = [(torch.randn(4, 3, 8, 8), torch.randint(0, 5, (4,))) for _ in range(3)]
        batches = [({"pixel_values": x} if name == "vit" else x, y) for x, y in batches]
    engine = pergrad.PerExample(model, loss_fn, verify=False)
    opt = optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for inputs, target in batches:
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            losses.append(float(engine.backward(inputs, target)))
        for p in model.parameters():
            assert p.grad.dtype == p.dtype == torch.float32
            sq_mean = p.grad_stats.sq_mean
            assert bool((sq_mean >= 0).all()) and bool((sq_mean >= p.grad.square() * 0.999).all())
        opt.step()
        assert all(bool(p.isfinite().all()) for p in model.parameters())
    whole = {n for n, s in engine.sources.items() if s in ("func", "hooks", "loop")}
    assert not whole, f"whole-model mode for {sorted(whole)}"
    assert all(map(torch.isfinite, map(torch.tensor, losses)))
