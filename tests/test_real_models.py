"""``mode="auto"`` on small, randomly initialised versions of models people train (GPT-2,
BERT, Llama, Falcon, OPT, Mixtral, Qwen2-MoE, Mamba, ViT, Swin, nanoGPT, ResNet-18 with
GroupNorm), against one backward per example, to float64 rounding; builders in
``examples/real_models.py``."""

import sys
from pathlib import Path

import pytest
import torch
from torch import Tensor
from zoo import reference_grads

import pergrad

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
from real_models import REAL_MODELS  # noqa: E402

B = 4
RTOL = 1e-10
WHOLE_MODEL = {"func", "hooks", "loop"}


def scale(per_example: Tensor) -> float:
    """The absolute tolerance's unit: the largest per-example gradient, at least 1 (a gradient
    that is zero in exact arithmetic, like an attention key's bias, is rounding noise)."""
    return max(float(per_example.abs().max()), 1.0)


def assert_statistics(p: Tensor, per_example: Tensor, name: str) -> None:
    """``p.grad`` and ``p.grad_stats.sq_mean`` are the mean and mean of squares of
    ``per_example``."""
    s = scale(per_example)
    mean, sq_mean = per_example.mean(0), per_example.square().mean(0)
    torch.testing.assert_close(p.grad, mean, rtol=RTOL, atol=RTOL * s, msg=name)
    torch.testing.assert_close(p.grad_stats.sq_mean, sq_mean, rtol=RTOL, atol=RTOL * s**2, msg=name)


def assert_per_example(actual: Tensor, per_example: Tensor, name: str) -> None:
    s = scale(per_example)
    torch.testing.assert_close(actual, per_example, rtol=RTOL, atol=RTOL * s, msg=name)


@pytest.mark.parametrize("name", sorted(REAL_MODELS))
def test_backward_and_grads_match_one_backward_per_example(name):
    model, inputs, target, loss_fn = REAL_MODELS[name](B)
    reference = reference_grads(model, loss_fn, inputs, target)

    engine = pergrad.PerExample(model, loss_fn)
    engine.backward(inputs, target)
    sources = dict(engine.sources)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert params.keys() == reference.keys() == sources.keys()
    for n, p in params.items():
        assert_statistics(p, reference[n], n)

    pergrad.zero_grad(model.parameters())
    grads = engine.grads(inputs, target)
    assert grads.keys() == reference.keys()
    for n, g in grads.items():
        assert g.shape == (B, *params[n].shape), n
        assert_per_example(g, reference[n], n)
    assert engine.sources == sources
    assert not {n: s for n, s in sources.items() if s in WHOLE_MODEL}

    pergrad.zero_grad(model.parameters())  # every example clipped to the median norm
    norms = sum(g.flatten(1).square().sum(1) for g in reference.values()).sqrt()
    clipping = pergrad.PerExample(model, loss_fn, max_example_norm=float(norms.median()))
    clipping.backward(inputs, target)
    factors = (norms.median() / norms).clamp(max=1)
    for n, p in params.items():
        clipped = reference[n] * factors.view(-1, *[1] * params[n].dim())
        assert_statistics(p, clipped, f"{n} (clipped)")
    assert clipping.sources == sources


@pytest.mark.parametrize(
    "name, embedding, head",
    [("gpt2", "model.transformer.wte", "model.lm_head"), ("nanogpt", "transformer.wte", "lm_head")],
    ids=["gpt2", "nanogpt"],
)
def test_tied_output_embedding(name, embedding, head):
    model, inputs, target, loss_fn = REAL_MODELS[name](B)
    tied = model.get_submodule(embedding).weight
    assert model.get_submodule(head).weight is tied
    names = [n for n, p in model.named_parameters() if p is tied]
    assert names == [f"{embedding}.weight"]  # once, under its first name

    reference = reference_grads(model, loss_fn, inputs, target)[names[0]]
    engine = pergrad.PerExample(model, loss_fn)
    engine.backward(inputs, target)
    assert_statistics(tied, reference, names[0])
    assert_per_example(engine.grads(inputs, target)[names[0]], reference, names[0])
    assert engine.sources[names[0]] not in WHOLE_MODEL


def test_hugging_face_activation_checkpointing():
    model, inputs, target, loss_fn = REAL_MODELS["gpt2"](3)
    model.model.activation_checkpointing_enable({"use_reentrant": False})
    reference = reference_grads(model, loss_fn, inputs, target)
    engine = pergrad.PerExample(model, loss_fn)
    grads = engine.grads(inputs, target)
    for n, g in grads.items():
        assert_per_example(g, reference[n], n)
    assert not {n: s for n, s in engine.sources.items() if s in WHOLE_MODEL}
    model.model.activation_checkpointing_enable({"use_reentrant": True})
    with pytest.raises(pergrad.InputError, match="use_reentrant=False"):
        engine.backward(inputs, target)
    assert all(p.grad is None for p in model.parameters())
