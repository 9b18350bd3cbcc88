"""How ``mode="auto"`` decides, in one place, and the one-mode computation it replaces.

``"auto"`` works layer by layer (:mod:`pergrad.layerwise`) wherever that is provably each
example's gradient. For the parameters the layers leave, it runs the whole-model modes of
:data:`pergrad.modes.MODES` in their order (``func``, ``hooks``, ``loop``) and keeps the first
that runs the model; should the kept mode fail on a later call, it goes on to the next. Each
decision is announced once, by a :class:`FallbackWarning` naming the parameters or layers
and why.

Both computations take one chunk and a :class:`pergrad.reduce.Quantity` and give a
:class:`Chunk`: each parameter's per-example gradients or their moments, the losses, and where
each parameter's numbers came from. Clipped moments take two steps, in
:func:`pergrad.reduce.clipped`: every example's norm over all parameters, then the moments of
the scaled gradients.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from pergrad import reduce
from pergrad.fallback import FallbackWarning, warn  # noqa: F401 - pergrad.auto's names
from pergrad.layerwise import Layerwise
from pergrad.modes import MODES, Mode, ModeError, PerExampleResult
from pergrad.structure import Structure

Params = dict[str, nn.Parameter]


@dataclass
class Chunk:
    """One chunk's per-example gradients ``(b, *shape)`` or moments ``(Σ_b g_b, Σ_b g_b²)``
    per parameter, its per-example losses, and each parameter's source."""

    values: reduce.Values
    losses: Tensor
    sources: dict[str, str]


class OneMode:
    """A whole-model mode asked for by name: every parameter from it, its errors raised."""

    def __init__(self, mode: Mode):
        self.whole_model_mode = mode

    @property
    def mode(self) -> str:
        return self.whole_model_mode.name

    def __call__(
        self, structure: Structure, inputs: tuple, target: Tensor, quantity: reduce.Quantity
    ) -> Chunk:
        params = structure.params
        with torch.enable_grad():
            grads, losses = self.whole_model_mode(params, inputs, target)
        values = reduce.clipped(
            quantity, lambda: reduce.sq_norms(grads), lambda scale: quantity.of(grads, scale)
        )
        return Chunk(values, losses, dict.fromkeys(params, self.mode))


class Auto:
    """``mode="auto"``: the per-layer path, and the first whole-model mode that runs what it
    leaves, chosen when first needed and kept."""

    def __init__(self, model: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor]):
        self.model = model
        self.loss_fn = loss_fn
        self.layerwise = Layerwise(model, loss_fn)
        self.whole_model_mode: Mode | None = None
        self._ran = False
        self._warned: set[str] = set()

    @property
    def mode(self) -> str:
        """``"auto"`` until the first call, then ``"layerwise"``, or the whole-model mode
        chosen for what the layers leave."""
        if self.whole_model_mode is not None:
            return self.whole_model_mode.name
        return "layerwise" if self._ran else "auto"

    def __call__(
        self, structure: Structure, inputs: tuple, target: Tensor, quantity: reduce.Quantity
    ) -> Chunk:
        params = structure.params
        rest: dict[str, Tensor] = {}  # from a whole-model mode

        with torch.enable_grad(), self.layerwise.run(structure, inputs, target, quantity) as done:
            self._ran = True

            def whole_model() -> dict[str, Tensor]:
                """Per-example gradients of what the layers leave, each computed once."""
                left = {name: why for name, why in done.uncovered.items() if name not in rest}
                rest.update(self._uncovered(params, left, inputs, target, done.crossed))
                return rest

            def sq_norms() -> Tensor:
                covered = done.sq_norms()
                return covered + reduce.sq_norms(whole_model())

            def values(scale: Tensor | None) -> reduce.Values:
                found = done.values(scale)
                return {**found, **quantity.of(whole_model(), scale)}

            found = reduce.clipped(quantity, sq_norms, values)
        sources = {**done.sources, **dict.fromkeys(rest, self.mode)}
        return Chunk(found, done.losses, sources)

    def _uncovered(
        self, params: Params, uncovered: dict[str, str], inputs: tuple, target: Tensor, crossed
    ) -> dict[str, Tensor]:
        """Per-example gradients, from a whole-model mode, of what the layers leave; where
        an example's loss holds values of other examples (``crossed``), from a mode that runs
        one example at a time."""
        if not uncovered:
            return {}
        left = {name: params[name] for name in uncovered}
        with torch.enable_grad():
            grads, _ = self._whole_model(left, inputs, target, crossed)
        if not set(uncovered) <= self._warned:
            self._warned |= set(uncovered)
            listed = "; ".join(f"'{name}': {reason}" for name, reason in uncovered.items())
            warn(
                f"pergrad: neither a per-layer rule nor the layer-local path covers {listed}. "
                f"Their per-example gradients come from mode={self.mode!r}, which runs the "
                f"whole model."
            )
        return grads

    def _whole_model(
        self, params: Params, inputs: tuple, target: Tensor, crossed: bool
    ) -> PerExampleResult:
        """The kept whole-model mode's result, or the first of ``MODES`` (after the kept one,
        if it fails) that runs the model (``"loop"`` always can); warn unless it is the
        first tried. Where examples' values cross (``crossed``), ``"hooks"``, which reads
        the batch's forward pass, is passed over."""
        order = [name for name in MODES if not (crossed and name == "hooks")]
        start, reasons = 0, []
        if self.whole_model_mode is not None and self.whole_model_mode.name in order:
            try:
                return self.whole_model_mode(params, inputs, target)
            except ModeError as error:
                start = order.index(self.whole_model_mode.name) + 1
                reasons.append(f"mode={error.mode!r} failed: {error.reason}")
        for name in order[start:]:
            mode = MODES[name](self.model, self.loss_fn)
            try:
                result = mode(params, inputs, target)
            except ModeError as error:
                reasons.append(f"mode={error.mode!r} failed: {error.reason}")
                continue
            self.whole_model_mode = mode
            if reasons:
                slow = " (one backward per example: correct, slow)" if name == "loop" else ""
                warn(f"pergrad: {'; '.join(reasons)}. Using mode={name!r}{slow}.")
            return result
        raise AssertionError("mode='loop' raised ModeError")  # pragma: no cover
