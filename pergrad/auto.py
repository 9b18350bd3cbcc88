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

from pergrad import alone, checks, randomness, reduce
from pergrad.assemble import LayerwiseResult
from pergrad.fallback import FallbackWarning, warn  # noqa: F401 - pergrad.auto's names
from pergrad.layerwise import Layerwise
from pergrad.modes import MODES, Mode, ModeError, PerExampleResult
from pergrad.structure import Structure

Params = dict[str, nn.Parameter]


@dataclass
class Chunk:
    """One chunk's per-example gradients ``(b, *shape)`` or moments ``(Σ_b g_b, Σ_b g_b²)``
    per parameter, its per-example losses, each parameter's source, and whether the model
    drew random numbers."""

    values: reduce.Values
    losses: Tensor
    sources: dict[str, str]
    random: bool = False


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
        params, mode = structure.params, self.whole_model_mode
        with torch.enable_grad():
            grads, losses = mode(params, inputs, target)
        random = False
        if mode.runs_alone:
            random = _compare_with_batch(mode, inputs, target, losses)
        values = reduce.clipped(
            quantity, lambda: reduce.sq_norms(grads), lambda scale: quantity.of(grads, scale)
        )
        return Chunk(values, losses, dict.fromkeys(params, self.mode), random)


def _compare_with_batch(mode: Mode, inputs: tuple, target: Tensor, losses: Tensor) -> bool:
    """Check the losses ``mode`` computed one example at a time against one plain forward
    pass of the batch (:mod:`pergrad.alone`); return whether the model drew random numbers.
    A model that cannot run the whole batch at once has no batch to disagree with: said, with
    the error, once per call that cannot compare."""
    draws = randomness.Draws()
    try:
        with draws, randomness.RandomState().replays():
            in_batch = alone.batch_losses(mode.model, mode.loss_fn, inputs, target)
    except checks.InputError:
        raise
    except Exception as error:
        first = (str(error).strip().splitlines() or [""])[0]
        warn(
            f"pergrad: the model cannot run the whole batch at once ({type(error).__name__}: "
            f"{first}), so the losses mode={mode.name!r} computed one example at a time were "
            f"not compared with the batch's; they are right if the model, run on a batch, "
            f"would not combine examples."
        )
        return bool(draws.found)
    alone.compare(mode, inputs, target, losses, in_batch, bool(draws.found), "")
    return bool(draws.found)


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
                rest.update(self._uncovered(params, left, inputs, target, done))
                return rest

            def sq_norms() -> Tensor:
                covered = done.sq_norms()
                return covered + reduce.sq_norms(whole_model())

            def values(scale: Tensor | None) -> reduce.Values:
                found = done.values(scale)
                return {**found, **quantity.of(whole_model(), scale)}

            found = reduce.clipped(quantity, sq_norms, values)
        sources = {**done.sources, **dict.fromkeys(rest, self.mode)}
        return Chunk(found, done.losses, sources, done.flow.random)

    def _uncovered(
        self,
        params: Params,
        uncovered: dict[str, str],
        inputs: tuple,
        target: Tensor,
        done: LayerwiseResult,
    ) -> dict[str, Tensor]:
        """Per-example gradients, from a whole-model mode, of what the layers leave; where
        an example's loss holds values of other examples (``done.flow.crossed``), from a mode
        that runs one example at a time. What such a mode computed is compared with the batch
        (:mod:`pergrad.alone`).

        Raises:
            InputError: an example's loss computed alone differs from its loss in the batch.
        """
        if not uncovered:
            return {}
        left = {name: params[name] for name in uncovered}
        flow = done.flow
        with torch.enable_grad():
            (grads, losses), failed = self._whole_model(left, inputs, target, flow.crossed)
        mode = self.whole_model_mode
        if mode.runs_alone:
            alone.compare(mode, inputs, target, losses, done.losses, flow.random, flow.where)
        if failed:
            slow = " (one backward per example: correct, slow)" if mode.name == "loop" else ""
            warn(f"pergrad: {'; '.join(failed)}. Using mode={mode.name!r}{slow}.")
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
    ) -> tuple[PerExampleResult, list[str]]:
        """The kept whole-model mode's result, or the first of ``MODES`` (after the kept one,
        if it fails) that runs the model (``"loop"`` always can), and why the modes tried
        before it failed. Where examples' values cross (``crossed``), ``"hooks"``, which reads
        the batch's forward pass, is passed over."""
        order = [name for name in MODES if not (crossed and name == "hooks")]
        start, reasons = 0, []
        random = randomness.RandomState()  # each mode tried draws what the first one would
        if self.whole_model_mode is not None and self.whole_model_mode.name in order:
            try:
                return self.whole_model_mode(params, inputs, target), []
            except ModeError as error:
                start = order.index(self.whole_model_mode.name) + 1
                reasons.append(f"mode={error.mode!r} failed: {error.reason}")
        for name in order[start:]:
            mode = MODES[name](self.model, self.loss_fn)
            random.rewind()
            try:
                result = mode(params, inputs, target)
            except ModeError as error:
                reasons.append(f"mode={error.mode!r} failed: {error.reason}")
                continue
            self.whole_model_mode = mode
            return result, reasons
        raise AssertionError("mode='loop' raised ModeError")  # pragma: no cover
