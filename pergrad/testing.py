"""The check every built-in per-layer rule passes, for rules of your own.

>>> @pergrad.register_rule(Scale)
... def scale(layer, call): ...
>>> pergrad.testing.check_rule(Scale(4), lambda b: torch.randn(b, 3, 4))

:func:`check_rule` runs the layer on batches drawn by ``hypothesis`` (batch sizes from 1,
random seeds), in float64, and compares the rule's per-example gradients, and the moments
``(Σ_b g_b, Σ_b g_b²)`` it leaves as ``p.grad`` and ``p.grad_stats`` — as they are, and
with every example clipped to the median norm (``max_example_norm``, which uses the rule's
``norms``) — with one autograd backward per example. It needs ``hypothesis``
(``pip install hypothesis``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import Tensor, nn

from pergrad.engine import PerExample
from pergrad.rules import rule_for
from pergrad.stats import zero_grad

Inputs = Tensor | tuple[Tensor, ...]
RTOL = 1e-8
"""Relative tolerance of the float64 comparison."""


class _Readout(nn.Module):
    """The layer, then a fixed random projection of its output to one number per example, so
    that every output element gets its own gradient."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, *inputs: Tensor) -> Tensor:
        out = self.layer(*inputs)
        out = out[0] if isinstance(out, tuple) else out
        generator = torch.Generator().manual_seed(0)
        weights = torch.randn(out.shape[1:], generator=generator, dtype=out.dtype)
        return (torch.tanh(out) * weights.to(out.device)).flatten(1).sum(1)


def _loss(output: Tensor, target: Tensor) -> Tensor:
    return (output - target).square()


def one_backward_per_example(model: nn.Module, inputs: tuple[Tensor, ...], target: Tensor):
    """Per-example gradients by one ``autograd.grad`` per example: the reference."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    grads: dict[str, list[Tensor]] = {n: [] for n in params}
    for b in range(len(target)):
        loss = _loss(model(*(x[b : b + 1] for x in inputs)), target[b : b + 1]).sum()
        found = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        for (name, p), g in zip(params.items(), found):
            grads[name].append(torch.zeros_like(p) if g is None else g)
    return {n: torch.stack(g) for n, g in grads.items()}


def check_call(layer: nn.Module, inputs: Inputs) -> None:
    """Check the rule of ``layer`` on one batch ``inputs`` (the batch on dim 0).

    Raises:
        AssertionError: the rule was not used for every parameter, or its numbers differ
            from one backward per example.
    """
    model = _Readout(copy.deepcopy(layer).double())
    inputs = (inputs,) if isinstance(inputs, Tensor) else tuple(inputs)
    inputs = tuple(x.double() if x.is_floating_point() else x for x in inputs)
    target = torch.randn(len(inputs[0]), dtype=torch.float64)
    expected = one_backward_per_example(model, inputs, target)
    engine = PerExample(model, _loss, verify=False)  # compared below, more closely
    grads = engine.grads(inputs, target)
    _check_sources(engine, type(layer).__name__)
    _check_statistics(engine, model, inputs, target, expected, torch.ones(len(target)))
    norms = sum(g.flatten(1).square().sum(1) for g in expected.values()).sqrt()
    limit = float(norms.median())
    if limit > 0:  # about half the examples clipped
        clipped = PerExample(model, _loss, max_example_norm=limit, verify=False)
        _check_statistics(clipped, model, inputs, target, expected, (limit / norms).clamp(max=1))
        _check_sources(clipped, type(layer).__name__)
    for name, g in expected.items():
        torch.testing.assert_close(grads[name], g, **_close(g), msg=f"per-example {name}")


def _check_sources(engine: PerExample, kind: str) -> None:
    others = {n: s for n, s in engine.sources.items() if s not in (kind, "unused")}
    assert not others, f"the {kind} rule did not give these parameters: {others}"


def _close(g: Tensor, power: int = 1) -> dict[str, float]:
    scale = max(float(g.abs().max()), 1.0)
    return {"rtol": RTOL, "atol": RTOL * scale**power}


def _check_statistics(engine, model, inputs, target, expected, factors: Tensor) -> None:
    """``p.grad`` and ``sq_mean`` after ``engine.backward`` against those of the reference
    gradients scaled by ``factors``, ``(B,)``."""
    engine.backward(inputs, target)
    for name, p in model.named_parameters():
        g = expected[name] * factors.view(-1, *[1] * (expected[name].dim() - 1))
        clipped = " (clipped)" if bool((factors < 1).any()) else ""
        torch.testing.assert_close(p.grad, g.mean(0), **_close(g), msg=f"mean of {name}{clipped}")
        torch.testing.assert_close(
            p.grad_stats.sq_mean,
            g.square().mean(0),
            **_close(g, 2),
            msg=f"mean of squares of {name}{clipped}",
        )
    zero_grad(model.parameters())


def check_rule(
    layer: nn.Module,
    make_inputs: Callable[[int], Inputs],
    *,
    max_batch: int = 5,
    max_examples: int = 20,
) -> None:
    """Check the rule of ``layer`` with ``hypothesis``: batch sizes ``1 … max_batch``, inputs
    ``make_inputs(batch_size)`` drawn under random seeds.

    Raises:
        AssertionError: with the failing batch size and seed (``hypothesis`` shrinks them).
        TypeError: ``layer`` is not a module or ``make_inputs`` not a function.
        ValueError: no rule applies to ``layer``.
        ImportError: ``hypothesis`` is not installed.
    """
    if not isinstance(layer, nn.Module):
        raise TypeError(f"layer must be an nn.Module instance, got {type(layer).__name__}")
    rule, why = rule_for(layer)
    if rule is None:
        kind = type(layer).__name__
        raise ValueError(
            f"{kind} has no rule to check: {why}"
            if why
            else f"{kind} has no rule to check: register one with @pergrad.register_rule({kind})"
        )
    if not callable(make_inputs):
        raise TypeError(
            f"make_inputs must be a function of the batch size that returns the layer's inputs, "
            f"got {type(make_inputs).__name__}"
        )
    try:
        from hypothesis import given, settings
        from hypothesis import strategies as st
    except ImportError as error:  # pragma: no cover - hypothesis is a test dependency
        raise ImportError("pergrad.testing needs hypothesis: pip install hypothesis") from error

    @settings(max_examples=max_examples, deadline=None, database=None)
    @given(batch_size=st.integers(1, max_batch), seed=st.integers(0, 2**16))
    def check(batch_size: int, seed: int) -> None:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            inputs = make_inputs(batch_size)
        check_call(layer, inputs)

    check()
