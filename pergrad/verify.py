"""An independent check of every call against autograd (``PerExample(..., verify=True)``).

For per-example gradients ``g_b`` of losses ``ℓ_b`` that depend on example ``b`` alone,

    Σ_b c_b g_b = ∇_Φ Σ_b c_b ℓ_b        for any weights c_b,

and the right side is one plain backward pass of the model with its own parameters. With
distinct weights, per-example gradients handed to the wrong example (rows routed, sorted or
flattened), mixed between examples (a mean over the batch between layers) or missing a use
of a parameter fail the check. Parameters from the whole-model modes that run each example
alone (``func``, ``loop``) are right by construction and are not compared. The moments
``backward`` accumulates are checked against those of the same per-example gradients (clipped
alike where ``max_example_norm`` is set).

It costs a computation of the per-example gradients and a plain forward and backward pass
more per call: for tests, and for a model tried for the first time. Each check's pass starts
from the random number generators' state of the pass it checks, so dropout draws the same
masks where the model draws them in the same order (the per-layer path); a whole-model mode
that draws a mask per example (``func``) cannot be checked on a model with dropout.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

from pergrad import checks, reduce
from pergrad import inputs as batch

ENVIRONMENT = "PERGRAD_VERIFY"
"""``verify=None`` means on where this environment variable is ``1`` (a test suite's switch)."""


ABSOLUTE = 1e-12
"""Differences below this times the largest loss are rounding noise, whatever the gradients'
scale (autograd's gradient of a norm over one element is such noise)."""


ALONE = frozenset({"func", "loop"})
"""The modes that run each example alone: right by construction, and for a model that mixes
examples not comparable with the batch's gradient, so not checked."""


class VerificationError(RuntimeError):
    """Per-example gradients disagree with autograd: the model is not one pergrad computes
    right as configured. The message names the parameters and the way out."""


class RandomState:
    """The random number generators' state when made, so that the checks' passes draw the
    same random numbers (dropout masks) as the pass they check: :meth:`rewind` before each,
    inside :meth:`replays`, which leaves the generators as the checked pass left them."""

    def __init__(self):
        self.cpu = torch.random.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None

    def rewind(self) -> None:
        torch.random.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)

    @contextmanager
    def replays(self) -> Iterator[None]:
        after = RandomState()
        try:
            yield
        finally:
            after.rewind()


def enabled(verify: bool | None) -> bool:
    """``verify``, or, where it is ``None``, whether :data:`ENVIRONMENT` is ``1``."""
    return os.environ.get(ENVIRONMENT) == "1" if verify is None else verify


def against_autograd(
    model: torch.nn.Module,
    loss_fn: Callable,
    inputs: batch.Inputs,
    target: Tensor,
    params: dict[str, Tensor],
    grads: dict[str, Tensor],
    sources: dict[str, str],
) -> None:
    """Check ``Σ_b c_b g_b`` of ``grads`` against ``∇ Σ_b c_b ℓ_b`` by autograd.

    Raises:
        VerificationError: naming each parameter that disagrees and where its numbers came
            from.
    """
    c = checks.distinct_weights(len(target), target)
    names = list(params)
    with torch.enable_grad():
        losses = loss_fn(batch.run(model, inputs), target)
        weighted = (losses * c.to(losses.dtype)).sum()
        expected = torch.autograd.grad(weighted, [params[n] for n in names], allow_unused=True)
    pairs = {}
    for name, reference in zip(names, expected):
        if sources.get(name) in ALONE:
            continue
        g = grads[name].to_dense() if grads[name].is_sparse else grads[name]
        actual = torch.tensordot(c.to(g.dtype), g, dims=1)
        if reference is None:
            reference = torch.zeros_like(actual)
        pairs[name] = (actual, reference.to_dense() if reference.is_sparse else reference)
    noise = ABSOLUTE * float(losses.detach().abs().max())
    wrong = [f"'{name}' (from {sources.get(name, '?')})" for name in _disagree(pairs, noise)]
    if wrong:
        raise VerificationError(
            f"per-example gradients of {', '.join(wrong)} disagree with autograd: "
            f"Σ_b c_b g_b ≠ ∇ Σ_b c_b ℓ_b for distinct weights c_b. The model moves rows "
            f"between examples or mixes them in a way pergrad did not see. Use mode='loop' "
            f"(one backward per example), and report the model."
        )


def moments(
    values: dict[str, reduce.Moments], grads: dict[str, Tensor], max_norm: float | None
) -> None:
    """Check the moments ``backward`` formed against those of ``grads`` (clipped to
    ``max_norm`` where given).

    Raises:
        VerificationError: naming each parameter whose moments disagree.
    """
    quantity = reduce.Quantity("moments", max_norm)
    expected = reduce.clipped(
        quantity, lambda: reduce.sq_norms(grads), lambda scale: quantity.of(grads, scale)
    )
    grad_sums = {name: (values[name].grad_sum, expected[name].grad_sum) for name in values}
    sq_sums = {name: (values[name].sq_sum, expected[name].sq_sum) for name in values}
    wrong = sorted(set(_disagree(grad_sums, 0.0)) | set(_disagree(sq_sums, 0.0)))
    if wrong:
        raise VerificationError(
            f"the moments of parameter(s) {', '.join(wrong)} disagree with those of their "
            f"per-example gradients. Use mode='loop', and report the model."
        )


def _disagree(pairs: dict[str, tuple[Tensor, Tensor]], noise: float) -> list[str]:
    """The names whose ``(actual, expected)`` differ by more than rounding: relative to the
    largest entry of the parameter's own expected value, with a floor of a hundred rounding
    errors of the largest entry over all parameters, and at least ``noise`` (a gradient that
    is zero in exact arithmetic, like an attention key's bias or the weight of a norm over one
    element, is rounding noise of the others, or of the loss). In half precision the floor is
    about the largest gradient itself: there the check catches gross errors only."""
    if not pairs:
        return []
    low = any(t.dtype in (torch.float16, torch.bfloat16) for pair in pairs.values() for t in pair)
    tolerance = 1e-2 if low else 1e-4
    epsilon = max(torch.finfo(t.dtype).eps for pair in pairs.values() for t in pair)
    scales = {
        name: float(e.double().abs().max()) if e.numel() else 0.0 for name, (_, e) in pairs.items()
    }
    floor = max(1e2 * epsilon * max(scales.values()), noise)
    wrong = []
    for name, (actual, expected) in pairs.items():
        difference = (actual.double() - expected.double().to(actual.device)).abs()
        bound = tolerance * scales[name] + floor
        if difference.numel() and not bool(difference.max() <= bound):  # NaN fails too
            wrong.append(name)
    return wrong
