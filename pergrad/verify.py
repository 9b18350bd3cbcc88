"""An independent check of every call against autograd (``PerExample(..., verify=True)``).

For per-example gradients ``g_b`` of losses ``ℓ_b`` that depend on example ``b`` alone,

    Σ_b c_b g_b = ∇_Φ Σ_b c_b ℓ_b        for any weights c_b,

and the right side is one plain backward pass of the model with its own parameters. With
distinct weights, per-example gradients handed to the wrong example (rows routed, sorted or
flattened), mixed between examples (a mean over the batch between layers) or missing a use
of a parameter fail the check. Every parameter is compared, those from the whole-model modes
that run each example alone (``func``, ``loop``) too. The moments ``backward`` accumulates
are checked against those of the same per-example gradients (clipped alike where
``max_example_norm`` is set).

It costs a computation of the per-example gradients and a plain forward and backward pass
more per call: for tests, and for a model tried for the first time. Each check's pass starts
from the random number generators' state of the pass it checks, so dropout draws the same
masks where the model draws them in the same order (the per-layer path). A mode that runs each
example alone draws other masks than the batch: where the model draws random numbers, its
parameters are checked with every draw fixed (:class:`pergrad.randomness.FixedRandom`), their
per-example gradients computed again so.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

from pergrad import alone, checks, reduce
from pergrad import inputs as batch
from pergrad.randomness import RandomState

ENVIRONMENT = "PERGRAD_VERIFY"
"""``verify=None`` means on where this environment variable is ``1`` (a test suite's switch)."""


ABSOLUTE = 1e-12
"""Differences below this times the largest loss are rounding noise, whatever the gradients'
scale (autograd's gradient of a norm over one element is such noise)."""


ALONE = frozenset({"func", "loop"})
"""The modes that run each example alone, and draw other random numbers than the batch."""


class VerificationError(RuntimeError):
    """Per-example gradients disagree with autograd: the model is not one pergrad computes
    right as configured. The message names the parameters and the way out."""


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

    The identity needs a backward pass linear in the weights ``c_b``: where a hook of the
    model changes a gradient (clamps it), the parameters from the modes that run each example
    alone are not compared (their losses were compared with the batch's, :mod:`pergrad.alone`,
    and each example's gradient is its own); every other parameter still is.

    Raises:
        VerificationError: naming each parameter that disagrees and where its numbers came
            from.
    """
    if not params:
        return
    c = checks.distinct_weights(len(target), target)
    names = list(params)
    hooks = _Hooks()
    with torch.enable_grad(), hooks:
        losses = loss_fn(batch.run(model, inputs), target)
        weighted = (losses * c.to(losses.dtype)).sum()
        expected = torch.autograd.grad(weighted, [params[n] for n in names], allow_unused=True)
    if hooks.changed:
        kept = [i for i, n in enumerate(names) if sources.get(n) not in ALONE]
        names, expected = [names[i] for i in kept], [expected[i] for i in kept]
    pairs = {}
    for name, reference in zip(names, expected):
        g = grads[name].to_dense() if grads[name].is_sparse else grads[name]
        actual = weighted_sum(c, g)
        if reference is None:
            reference = torch.zeros_like(actual)
        pairs[name] = (actual, reference.to_dense() if reference.is_sparse else reference)
    noise = ABSOLUTE * float(losses.detach().abs().max())
    floor = rounding_floor(pairs, noise)
    wrong = [
        f"'{name}' (from {sources.get(name, '?')})"
        for name in disagreeing(pairs, noise)
        if not _zero_both_ways(model, loss_fn, inputs, target, params[name], pairs[name][0], floor)
    ]
    if wrong:
        raise VerificationError(
            f"per-example gradients of {', '.join(wrong)} disagree with autograd: "
            f"Σ_b c_b g_b ≠ ∇ Σ_b c_b ℓ_b for distinct weights c_b. The model moves rows "
            f"between examples or mixes them in a way pergrad did not see. Use mode='loop' "
            f"(one backward per example), and report the model."
        )


class _Hooks(TorchFunctionMode):
    """Notes whether a hook the model puts on a tensor changes the gradient it receives."""

    def __init__(self):
        super().__init__()
        self.changed = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not Tensor.register_hook:
            return func(*args, **kwargs)
        tensor, hook = args

        def watched(grad: Tensor):
            found = hook(grad)
            self.changed = self.changed or (found is not None and found is not grad)
            return found

        return func(tensor, watched)


def _zero_both_ways(model, loss_fn, inputs, target, p: Tensor, actual: Tensor, floor: float):
    """Whether a parameter that :func:`disagreeing` flags has a true gradient of 0, and
    pergrad says so: pergrad's weighted sum is below ``floor`` (the rounding level of the
    largest gradient), and no example's loss changes when the parameter moves far, either way
    (by more than its largest entry, by a different amount at each entry). A norm over one
    element gives its weight such a gradient, which autograd computes as rounding noise of
    the normalized inputs: a noise that the gradients' scales do not bound. The passes leave
    the random state and the model's buffers as they found them."""
    if not bool(actual.abs().max() <= floor):
        return False
    random = RandomState()
    ids = torch.arange(p.numel(), dtype=torch.float64, device=p.device).view(p.shape)
    with torch.no_grad(), random.replays(), alone.buffers_kept(model):
        before = loss_fn(batch.run(model, inputs), target)
        saved = p.detach().clone()
        step = ((1 + ids * checks.GOLDEN % 1) * (1 + float(saved.abs().max()))).to(p.dtype)
        moved = []
        try:
            for sign in (1, -1):
                p.copy_(saved + sign * step)
                random.rewind()
                moved.append(loss_fn(batch.run(model, inputs), target))
        finally:
            p.copy_(saved)
    bound = (
        1e2 * torch.finfo(before.dtype).eps * (float(before.abs().max()) if before.numel() else 0.0)
    )
    return all(bool(((after - before).abs() <= bound).all()) for after in moved)


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
    wrong = sorted(set(disagreeing(grad_sums, 0.0)) | set(disagreeing(sq_sums, 0.0)))
    if wrong:
        raise VerificationError(
            f"the moments of parameter(s) {', '.join(wrong)} disagree with those of their "
            f"per-example gradients. Use mode='loop', and report the model."
        )


def weighted_sum(weights: Tensor, grads: Tensor) -> Tensor:
    """``Σ_b c_b g_b`` of per-example gradients ``(B, *shape)``, in at least float32 (in half
    precision the distinct weights would round into each other)."""
    dtype = torch.promote_types(grads.dtype, torch.float32)
    return torch.tensordot(weights.to(dtype), grads.to(dtype), dims=1)


def _scale(t: Tensor) -> float:
    return float(t.double().abs().max()) if t.numel() else 0.0


def rounding_floor(pairs: dict[str, tuple[Tensor, Tensor]], noise: float = 0.0) -> float:
    """A hundred rounding errors of the largest expected entry over all parameters (ten in
    half precision, whose rounding error is already large), and at least ``noise``:
    differences below it are rounding, whatever the parameter."""
    if not pairs:
        return noise
    epsilon = max(torch.finfo(t.dtype).eps for pair in pairs.values() for t in pair)
    ulps = 10 if epsilon > torch.finfo(torch.float32).eps else 100
    return max(ulps * epsilon * max(_scale(e) for _, e in pairs.values()), noise)


def disagreeing(pairs: dict[str, tuple[Tensor, Tensor]], noise: float = 0.0) -> list[str]:
    """The names whose ``(actual, expected)`` differ by more than rounding: relative to the
    largest entry of the parameter's own expected value, with a floor of rounding of the
    largest entry over all parameters (:func:`rounding_floor`), and at least ``noise``: a
    gradient that is zero in exact arithmetic, like an attention key's bias, is rounding noise
    of the others, or of the loss. In half precision the floor is several per cent of the
    largest gradient: there the check catches gross errors only."""
    if not pairs:
        return []
    low = any(t.dtype in (torch.float16, torch.bfloat16) for pair in pairs.values() for t in pair)
    tolerance = 1e-2 if low else 1e-4
    floor = rounding_floor(pairs, noise)
    wrong = []
    for name, (actual, expected) in pairs.items():
        difference = (actual.double() - expected.double().to(actual.device)).abs()
        bound = tolerance * _scale(expected) + floor
        if difference.numel() and not bool(difference.max() <= bound):  # NaN fails too
            wrong.append(name)
    return wrong
