"""From the records of one layerwise pass to each parameter's values.

A parameter is covered where every use of it is a record no problem marks (see
:mod:`pergrad.layerwise`); its values come from its one record, or, used several times, from
the per-example sum over its records' gradients before any reduction, a few examples at a
time. Clipping asks for ``|g_b|²`` first (:meth:`LayerwiseResult.sq_norms`), then for the
moments with each record's ``δ`` scaled by ``c_b``. A parameter whose record fails on the
way moves to :attr:`LayerwiseResult.uncovered`, with the reason, for a whole-model mode.
"""

from __future__ import annotations

import functools
from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from pergrad import local
from pergrad.fallback import warn
from pergrad.record import Record
from pergrad.reduce import NORMS, REDUCE_ELEMENTS, Quantity, Values, chunks, sq_norms
from pergrad.structure import Hooked

Uses = list[tuple[Record, str]]
"""The records that use a parameter, each with the parameter's name in its module."""


@dataclass(frozen=True)
class Flow:
    """What the pass found of how examples flow through the model as a whole.

    Attributes:
        crossed: whether an example's loss holds values of other examples (after an operation
            pergrad does not follow): then the batch's forward pass is not each example's,
            and only a mode that runs one example at a time may compute it.
        random: whether the model drew random numbers (dropout).
        unknown, mixing: the operations pergrad could not follow, and those that combined
            examples.
    """

    crossed: bool = False
    random: bool = False
    unknown: tuple[str, ...] = ()
    mixing: tuple[str, ...] = ()

    @property
    def where(self) -> str:
        """Those operations, for messages (empty where there are none)."""
        unknown = ", ".join(dict.fromkeys(self.unknown[:3]))
        mixing = ", ".join(dict.fromkeys(self.mixing[:3]))
        found = [f"pergrad could not follow {unknown}" if unknown else ""]
        found.append(f"{mixing} ran across the batch" if mixing else "")
        return "; ".join(filter(None, found))


class LayerwiseResult:
    """The per-example losses of a layerwise pass, and each covered parameter's values.

    Attributes:
        quantity: what :meth:`values` gives, as the pass was asked.
        losses: ``(B,)``.
        uncovered: why each parameter the pass does not cover is left (name -> reason).
        flow: how examples flow through the model (:class:`Flow`).
        sources: where each covered parameter's values came from, once formed: its layer type
            (a rule), the type followed by ``" (local)"`` (``torch.func`` over that layer), a
            torch function followed by ``" (op)"`` (a use at that operation), several joined
            by ``+``, or ``"unused"``.
    """

    def __init__(
        self,
        params: dict[str, nn.Parameter],
        records: list[Record],
        quantity: Quantity,
        losses: Tensor,
        uncovered: dict[str, str],
        warned: set[tuple[str, str]],
        flow: Flow,
    ):
        self.quantity = quantity
        self.losses = losses
        self.flow = flow
        self.uncovered = uncovered
        self.sources: dict[str, str] = {}
        self._params, self._records, self._warned = params, records, warned
        self._size = len(losses)
        uses: dict[str, Uses] = defaultdict(list)
        for record in records:
            for local_name, name in record.hooked.params.items():
                uses[name].append((record, local_name))
        covered = [name for name in params if name not in uncovered]
        self._unused = [name for name in covered if not uses[name]]
        self._single = {name: uses[name][0] for name in covered if len(uses[name]) == 1}
        self._several = {name: uses[name] for name in covered if len(uses[name]) > 1}

    def sq_norms(self) -> Tensor:
        """``Σ |g_b|²`` over the covered parameters, ``(B,)`` in float64: the rules' closed
        forms where they have them. A parameter whose records cannot give it moves to
        :attr:`uncovered` first."""
        total = torch.zeros(self._size, dtype=torch.float64, device=self.losses.device)
        norms: dict[int, Values] = {}
        for name, (record, local_name) in list(self._single.items()):
            try:
                if id(record) not in norms:
                    norms[id(record)] = record.values(NORMS)
            except local.LocalError as error:
                self._leave([name], f"{record.label}: {error}")
                continue
            total += norms[id(record)][local_name].double()
        try:
            for start, stop, sums in self._summed_uses():
                total[start:stop] += sq_norms(sums)
        except local.LocalError as error:
            self._leave(list(self._several), f"one of its uses: {error}")
        return total

    def values(self, scale: Tensor | None = None) -> Values:
        """Each covered parameter's :attr:`quantity`, of ``c_b·g_b`` for the factors
        ``scale`` (clipped moments). A parameter whose records cannot give it moves to
        :attr:`uncovered`."""
        quantity, values = self.quantity, {}
        for record in self._records:
            record.scale = scale
        for name in self._unused:
            values[name] = quantity.zeros(self._params[name], self._size)
            self.sources[name] = "unused"
        for name, (record, local_name) in list(self._single.items()):
            try:
                if record.early is None:
                    record.early = record.values(quantity)
                values[name] = record.early[local_name]
                self.sources[name] = record.source
            except local.LocalError as error:
                self._leave([name], f"{record.label}: {error}")
        try:
            summed = (sums for *_, sums in self._summed_uses())
            values.update(quantity.joined(summed, in_place=True))
        except local.LocalError as error:
            self._leave(list(self._several), f"one of its uses: {error}")
        for name, found in self._several.items():
            self.sources[name] = "+".join(sorted({record.source for record, _ in found}))
        self._announce_failed_rules()
        return values

    def _leave(self, names: list[str], reason: str) -> None:
        for name in names:
            self.uncovered[name] = reason
            self._single.pop(name, None)
            self._several.pop(name, None)

    def _summed_uses(self):
        """``(start, stop, {name: Σ_uses g_b})`` for a few examples at a time, for parameters
        with several uses (each sum a tensor nothing else holds)."""
        if not self._several:
            return
        records = {id(r): r for found in self._several.values() for r, _ in found}
        numel = sum(r.hooked.numel for r in records.values())
        for start, stop in chunks(self._size, numel, REDUCE_ELEMENTS):
            grads = {key: r.grads(start, stop) for key, r in records.items()}
            yield (
                start,
                stop,
                {
                    name: functools.reduce(torch.add, (grads[id(r)][n] for r, n in found))
                    for name, found in self._several.items()
                },
            )

    def _announce_failed_rules(self) -> None:
        """Say, once per layer type and kind of error (its message may name sizes that change
        from batch to batch), where a rule failed and the layer-local path (slower) took
        over."""
        for record in self._records:
            failed = record.rule_problem or ""
            key = (record.hooked.kind, failed.split(":")[1] if ":" in failed else failed)
            covered = any(n in self.sources for n in record.hooked.params.values())
            if failed.startswith("its rule failed") and covered and key not in self._warned:
                self._warned.add(key)
                warn(
                    f"pergrad: the {record.hooked.kind} rule failed on a call "
                    f"({failed.removeprefix('its rule failed: ')}); torch.func over the layer "
                    f"alone (slower) computed it instead."
                )


def uncovered(
    params: dict[str, nn.Parameter],
    records: list[Record],
    others: dict[str, Tensor | None],
    owning_layers: dict[str, Hooked],
    untraced: str | None,
    unseen: dict[str, str],
) -> dict[str, str]:
    """Why each parameter the pass cannot cover is left: no row can be attributed
    (``untraced``); autograd found another use of it (``others``: its gradient outside the
    records); a record of it has a problem; or the model hooks a tensor computed from it
    (``unseen``)."""
    problems: dict[str, str] = {}
    for record in records:
        for name in record.hooked.params.values():
            if record.problem is not None and name not in problems:
                problems[name] = f"{record.hooked.label}: {record.problem}"
    found = {}
    for name in params:
        if untraced is not None:
            found[name] = untraced
        elif others[name] is not None:
            layer = owning_layers.get(name)
            found[name] = (
                "no layer owns it and takes it as a parameter"
                if layer is None
                else f"used outside the {layer.kind} layer that owns it"
            )
        elif name in problems:
            found[name] = problems[name]
        elif name in unseen:
            found[name] = unseen[name]
    return found
