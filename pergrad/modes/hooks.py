"""Per-example gradients from Opacus's hook-based ``GradSampleHooks``.

Opacus records each layer's inputs in a forward hook and its output gradients in a backward
hook, and forms per-example gradients layer by layer. It runs models that ``vmap`` cannot
(``.item()``, data-dependent control flow, autograd Functions without vmap support), but
only for layers it knows or can ``vmap`` one at a time. Its hooks and attributes live only
for the duration of one call.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from pergrad import checks
from pergrad import inputs as batch
from pergrad.modes.base import Mode, ModeError, PerExampleResult
from pergrad.verify import disagreeing, weighted_sum

_MODULE_ATTRIBUTES = ("activations", "max_batch_len")


def _opacus_hooks():
    from opacus.grad_sample.grad_sample_module import GradSampleHooks

    class EvalModeHooks(GradSampleHooks):
        """Opacus ignores layers in eval mode; per-example gradients do not depend on it."""

        def capture_activations_hook(self, module, forward_input, forward_output):
            training, module.training = module.training, True
            try:
                super().capture_activations_hook(module, forward_input, forward_output)
            finally:
                module.training = training

    return EvalModeHooks


class HooksMode(Mode):
    """``g_b`` from Opacus, with ``loss_reduction="sum"`` so that ``grad_sample[b]`` is the
    gradient of example ``b``'s own loss.

    As a guard against layers Opacus gets wrong, every call checks ``Σ_b g_b`` and
    ``Σ_b c_b g_b``, for distinct weights ``c_b``, against the gradients autograd computes for
    ``Σ_b ℓ_b`` and ``Σ_b c_b ℓ_b`` (so per-example gradients that are permuted or mixed between
    examples fail), and that every parameter autograd reaches has a ``grad_sample``.
    """

    name = "hooks"
    loss_checked = False  # checks.separable, on the first batch of two or more

    def __call__(
        self, params: dict[str, nn.Parameter], inputs: batch.Inputs, target: Tensor
    ) -> PerExampleResult:
        hooks = None
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", "Full backward hook is firing", UserWarning)
                hooks = _opacus_hooks()(self.model, loss_reduction="sum", strict=False)
                output = batch.run(self.model, inputs)
                losses = checks.per_example_loss(self.loss_fn(output, target), len(target))
                if not self.loss_checked:
                    checks.separable(self.loss_fn, output, target, losses)
                    self.loss_checked = len(target) > 1
                # Opacus's hooks fire only where autograd goes: ask for every trainable
                # parameter, so that a subset (what per-layer rules leave) gets its samples too
                everything = checks.trainable(self.model)
                weights = checks.distinct_weights(len(losses), losses).to(losses.dtype)
                hooks.disable_hooks()
                weighted = torch.autograd.grad(
                    (losses * weights).sum(),
                    list(everything.values()),
                    allow_unused=True,
                    retain_graph=True,
                )
                hooks.enable_hooks()
                totals = torch.autograd.grad(
                    losses.sum(), list(everything.values()), allow_unused=True
                )
            reference = dict(zip(everything, zip(totals, weighted)))
            grads = {
                name: self._grad_sample(name, p, reference[name][0], len(weights))
                for name, p in params.items()
            }
            self._check(grads, reference, weights)
        except (checks.InputError, ModeError):
            raise
        except Exception as error:
            raise ModeError.wrap(self.name, self.model, error) from error
        finally:
            if hooks is not None:
                hooks.cleanup()
            for module in self.model.modules():
                for attribute in _MODULE_ATTRIBUTES:
                    module.__dict__.pop(attribute, None)
        return grads, losses.detach()

    def _grad_sample(self, name: str, p: nn.Parameter, total: Tensor | None, size: int):
        """Opacus's per-example gradients of ``p``: zeros where the forward pass does not use
        it (``total`` is ``None``)."""
        sample = getattr(p, "grad_sample", None)
        if total is None:
            return torch.zeros((size, *p.shape), dtype=p.dtype, device=p.device)
        if not isinstance(sample, Tensor) or sample.shape != (size, *p.shape):
            raise ModeError(self.name, f"Opacus gave no per-example gradient for '{name}'")
        return sample

    def _check(self, grads: dict[str, Tensor], reference: dict, weights: Tensor) -> None:
        """``Σ_b g_b`` and ``Σ_b c_b g_b`` against autograd's, judged over all parameters at
        once (:func:`pergrad.verify.disagreeing`: a gradient that is 0 in exact arithmetic,
        such as an attention key's bias, is rounding noise of the others)."""
        used = {name: g for name, g in grads.items() if reference[name][0] is not None}
        sums = {name: _finite_pair(g.sum(0), reference[name][0]) for name, g in used.items()}
        mixed = {
            name: _finite_pair(weighted_sum(weights, g), reference[name][1])
            for name, g in used.items()
        }
        for wrong in [n for n, pair in sums.items() if pair is None][:1] + disagreeing(
            {n: pair for n, pair in sums.items() if pair is not None}
        )[:1]:
            raise ModeError(
                self.name,
                f"Opacus's per-example gradients of '{wrong}' do not sum to the batch gradient",
            )
        for wrong in disagreeing({n: pair for n, pair in mixed.items() if pair is not None})[:1]:
            raise ModeError(
                self.name,
                f"Opacus's per-example gradients of '{wrong}' are not each example's own (they "
                f"are permuted or mixed between examples)",
            )


def _finite_pair(actual: Tensor, expected: Tensor) -> tuple[Tensor, Tensor] | None:
    """The two with their entries that are not finite in both set to 0 (a NaN in the data
    is found as such where the statistics are checked), or ``None`` where one is not finite
    and the other is (the batch's sum overflowed where the examples' did not)."""
    finite = expected.isfinite()
    if bool(finite.all()):
        return actual, expected
    if not torch.equal(actual.isfinite(), finite):
        return None
    return actual.where(finite, 0), expected.where(finite, 0)
