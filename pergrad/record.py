"""One call of a hooked module in the batched forward pass, and what it gives.

A :class:`Record` keeps a call's inputs, outputs and the gradients ``δ`` its outputs received,
and turns them into the per-example gradients of the module's parameters, or a
:class:`pergrad.reduce.Quantity` of them: by the module's rule (:mod:`pergrad.rules`) where it
has one that applies to the call, else by ``torch.func`` over the module alone
(:mod:`pergrad.local`). Where the model moved the call's rows between examples
(:mod:`pergrad.provenance`), the rule reads them regrouped by example
(:mod:`pergrad.regroup`) and the local path replays the module on each example's rows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from pergrad import local, provenance
from pergrad.reduce import Moments, Quantity, Values
from pergrad.regroup import Regroup
from pergrad.rules.base import Call, Rule
from pergrad.structure import Hooked
from pergrad.uses import OpUse


@dataclass
class Record:
    """One call of a hooked module in the batched forward pass, and the gradients its outputs
    received in the backward pass."""

    hooked: Hooked
    args: tuple
    kwargs: dict
    batched: frozenset  # keys (positions, keyword names) of the inputs that carry the batch
    size: int
    outputs: list[Tensor] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)  # of the outputs, when returned
    input_versions: list[int] = field(default_factory=list)  # of the tensor inputs, when called
    deltas: list[Tensor | None] = field(default_factory=list)  # δ of each floating output
    problem: str | None = None  # why neither a rule nor the local path can use this call
    rule_problem: str | None = None  # why the rule cannot
    early: Values | None = None  # the pass's quantity, formed as soon as δ arrived
    scale: Tensor | None = None  # per-example factors c_b on δ (clipping), once known
    moved: provenance.Tag | None = None  # the first output's, where rows are not the batch
    input_tags: dict = field(default_factory=dict)  # where moved: of each batched input
    output_tags: list = field(default_factory=list)  # and of each floating output
    leaf_tags: dict = field(default_factory=dict)  # own layout: id -> tag of each input tensor
    layout_problem: str | None = None  # own layout: why the local path cannot take the call
    _recomputed: list[Tensor] | None = None  # outputs computed again (see _batch_outputs)
    _own_grads: dict[str, Tensor] | None = None  # own layout: every example's, unscaled

    @property
    def source(self) -> str:
        if self._use_rule or isinstance(self.hooked.module, OpUse):
            return self.hooked.kind
        return f"{self.hooked.kind} (local)"

    @property
    def label(self) -> str:
        """The layer type, and why its rule does not apply to it or to this call."""
        why = f" (its rule: {self.rule_problem})" if self.rule_problem else ""
        return self.hooked.label + why

    @property
    def _use_rule(self) -> bool:
        return self.hooked.rule is not None and self.rule_problem is None

    @property
    def own_layout(self) -> bool:
        """Whether the module's rule reads the call in the layer's own layout."""
        return self.hooked.rule is not None and self.hooked.rule.own_layout

    def all_deltas(self) -> list[Tensor]:
        """``δ`` of every floating output, zeros where none arrived."""
        return [torch.zeros_like(o) if g is None else g for o, g in zip(self.outputs, self.deltas)]

    def check_outputs(self) -> None:
        """Refuse the rule where an output other than the first received a gradient (a rule
        in its own layout reads them all)."""
        if (
            not self.own_layout
            and any(g is not None for g in self.deltas[1:])
            and self.rule_problem is None
        ):
            self.rule_problem = "an output other than its first reaches the loss"

    def call(self) -> Call:
        """The call as a rule reads it: every positional input and ``δ`` batched on dim 0;
        for a rule in its own layout, as the layer received it."""
        if self.own_layout:
            deltas = self.all_deltas()
            return Call(
                self.args, self.kwargs, deltas[0], frozenset(), tuple(deltas), self._examples,
                self.size, tuple(self._batch_outputs()),
            )  # fmt: skip
        if self.moved is not None:
            return self._regrouped()
        args = tuple(
            x.expand(self.size, *x.shape[1:])
            if isinstance(x, Tensor) and i not in self.batched and x.dim() and x.shape[0] == 1
            else x
            for i, x in enumerate(self.args)
        )
        delta = self._scaled(self.all_deltas()[0])
        return Call(args, self.kwargs, delta, self._batched_keywords())

    def _regrouped(self) -> Call:
        """The call with its rows regrouped by example, ``(B, K, …)``, where the model moved
        them (:mod:`pergrad.regroup`); without positions (:attr:`Rule.features`), each
        example must have one row at most.

        Raises:
            LocalError: a row belongs to several examples or none, an input's rows are not the
                output's, or (a layer without positions) an example has several rows.
        """
        rule, layer, output = self.hooked.rule, self.hooked.module, self.outputs[0]
        shape, dim = tuple(output.shape), 0
        if rule.features is None:  # examples along one dimension: moved to the front
            dim = provenance.example_dim(self.moved, shape)
            if dim < 0:
                raise local.LocalError("its output holds examples along several dimensions")
        features = rule.features(layer) if rule.features is not None else output.dim() - 1
        front = lambda x: x.movedim(dim, 0)  # noqa: E731
        tag = provenance.moved_to_front(self.moved, shape, dim)
        ids = provenance.rows(tag, tuple(front(output).shape), features)
        if ids is None:
            raise local.LocalError("a row of its output comes from several examples or none")
        leading = tuple(front(output).shape[: output.dim() - features])
        regroup = Regroup(ids, self.size, leading, output.device)
        if rule.features is None and regroup.per_example > 1:
            raise local.LocalError(
                f"several rows of one example reach it on dim {dim} (no {self.hooked.kind} "
                f"positions)"
            )
        moves = {}
        for key, x in tensors(self.args, self.kwargs):
            if key not in self.batched:
                continue
            if rule.features is not None:
                if not regroup.aligned(x):
                    raise local.LocalError("an input's rows are not those of its output")
                moves[key] = regroup
                continue
            # without positions: each input's own example dimension, holding the same
            # examples as the output's (a padding mask is (B, S) where the query is (L, B, E))
            own, examples = _examples(self.input_tags[key], x)
            if len(examples) != len(ids) or not torch.equal(examples.cpu(), ids):
                raise local.LocalError("an input's examples are not those of its output")
            moves[key] = lambda x, own=own: regroup(x.movedim(own, 0)).squeeze(1)
        args = tuple(moves[i](x) if i in moves else x for i, x in enumerate(self.args))
        kwargs = {k: moves[k](x) if k in moves else x for k, x in self.kwargs.items()}
        move = regroup if rule.features is not None else lambda x: regroup(front(x)).squeeze(1)
        return Call(
            args, kwargs, self._scaled(move(self.all_deltas()[0])), self._batched_keywords()
        )

    def _batched_keywords(self) -> frozenset[str]:
        return frozenset(k for k in self.batched if isinstance(k, str))

    def values(self, quantity: Quantity) -> Values:
        """The ``quantity`` of the per-example gradients of the module's parameters: the
        rule's closed form where it has one for this call, else formed a few examples at a
        time from the rule's or the layer-local path's per-example gradients."""
        self.check_inputs()
        numel = self.hooked.numel
        if quantity.per_example:
            return self.grads(0, self.size)
        if self.own_layout:  # every example's gradients at once: no closed form
            return quantity.in_chunks(self.grads, self.size, numel)

        def by_rule(rule: Rule, layer: nn.Module, call: Call) -> Values:
            closed_form = rule.moments if quantity.kind == "moments" else rule.norms
            if closed_form is not None and (found := closed_form(layer, call)) is not None:
                if quantity.kind == "moments":  # a user's rule may give plain pairs
                    return {name: _moments(layer, name, pair) for name, pair in found.items()}
                return found
            grads = lambda i, j: rule.grads(layer, call.narrow(i, j))  # noqa: E731
            return quantity.in_chunks(grads, self.size, numel)

        found = self._by_rule(by_rule)
        return found if found is not None else quantity.in_chunks(self.grads, self.size, numel)

    def check_inputs(self) -> None:
        """Refuse the call if the model changed one of its inputs in place after it (``h *=
        2`` after ``layer(h)``): its rule and its replay would read the changed values.

        Raises:
            LocalError: saying so.
        """
        now = [x._version for x in all_tensors(self.args, self.kwargs)]
        if now != self.input_versions:
            raise local.LocalError("the model changed its input in place after the call")

    def grads(self, start: int, stop: int) -> dict[str, Tensor]:
        """Per-example gradients of examples ``start:stop``."""
        self.check_inputs()
        if self.own_layout:
            if self._own_grads is None:
                self._own_grads = self._by_rule(lambda rule, layer, call: rule.grads(layer, call))
            found = self._own_grads
            found = self._local_grads(start, stop) if found is None else found
            found = {name: g[start:stop] for name, g in found.items()}
        else:
            found = self._by_rule(
                lambda rule, layer, call: rule.grads(layer, call.narrow(start, stop))
            )
            if found is not None:
                return found
            found = self._local_grads(start, stop)
        if self.scale is None:
            return found
        # c_b·g_b: scaled after, in the parameter's precision (a layer may compute in less)
        scale = self.scale[start:stop]
        return {n: g * scale.to(g).view(-1, *[1] * (g.dim() - 1)) for n, g in found.items()}

    def _local_grads(self, start: int, stop: int) -> dict[str, Tensor]:
        """Per-example gradients of examples ``start:stop`` from the layer-local path,
        unscaled.

        Raises:
            LocalError: the call is one the local path cannot attribute.
        """
        if self.layout_problem is not None:
            raise local.LocalError(self.layout_problem)
        module, names = self.hooked.module, list(self.hooked.params)
        if self.moved is not None:
            return self._grads_by_rows(start, stop)
        args, kwargs = _detached(self.args), _detached(self.kwargs)
        for key in self.batched:
            local.put(args, kwargs, key, local.get(args, kwargs, key)[start:stop])
        return local.per_example_grads(
            module,
            names,
            tuple(args),
            kwargs,
            self.batched,
            [o[start:stop] for o in self._batch_outputs()],
            [g[start:stop] for g in self.all_deltas()],
        )

    def _grads_by_rows(self, start: int, stop: int) -> dict[str, Tensor]:
        """Per-example gradients of a layer without a rule whose rows the model moved: the
        layer replayed on each example's rows (:func:`pergrad.local.grads_by_rows`), taken
        along the dimension that carries examples in each input and output (a sequence-first
        layer's dim 1)."""
        args, kwargs = tuple(_detached(self.args)), _detached(self.kwargs)
        inputs = {
            key: _examples(tag, local.get(args, kwargs, key))
            for key, tag in self.input_tags.items()
        }
        outputs = self._batch_outputs()
        found = [_examples(tag, o) for tag, o in zip(self.output_tags, outputs)]
        return local.grads_by_rows(
            self.hooked.module,
            list(self.hooked.params),
            args,
            kwargs,
            inputs,
            outputs,
            found,
            self.all_deltas(),
            range(start, stop),
        )

    def _batch_outputs(self) -> list[Tensor]:
        """The layer's outputs for the batch: as it returned them, or, where the model has
        changed one in place since (``h += residual``), computed again by its ``forward`` on
        the recorded inputs, so that each example's replay is still compared with them."""
        if all(o._version == v for o, v in zip(self.outputs, self.versions)):
            return self.outputs
        if self._recomputed is None:
            module = self.hooked.module
            theta = {name: module.get_parameter(name).detach() for name in self.hooked.params}
            with torch.no_grad():
                self._recomputed = local.forward(module, theta, self.args, self.kwargs)
        return self._recomputed

    def release(self) -> None:
        """Drop every tensor the record keeps. The hooks left on the pass's tensors hold the
        records, and the records the inputs whose autograd graph holds those hooks: a cycle
        through C++ that Python's garbage collector cannot see, which would keep every model
        alive."""
        self.args, self.kwargs, self.outputs, self.deltas = (), {}, [], []
        self.early = self._recomputed = self._own_grads = None
        self.leaf_tags = {}

    def _by_rule(self, use: Callable[[Rule, nn.Module, Call], Values | None]) -> Values | None:
        """``use(rule, layer, call)`` where the layer's rule applies. ``None`` where it gives
        nothing for this call, or where the rule fails: the layer-local path then takes over,
        for this call and every later use of it."""
        if not self._use_rule:
            return None
        try:
            with torch.no_grad():
                return use(self.hooked.rule, self.hooked.module, self.call())
        except local.LocalError:
            raise
        except Exception as error:  # outside what the rule handles
            self.rule_problem = f"its rule failed: {type(error).__name__}: {error}"
            return None

    def _examples(self, x: Tensor, dim: int) -> Tensor:
        """The example of each index of input ``x`` along ``dim`` (``-1``: none's data).

        Raises:
            LocalError: ``x`` is not one of the call's inputs, or an index holds several
                examples.
        """
        tag = self.leaf_tags.get(id(x))
        if tag is None:
            raise local.LocalError(
                "its rule asked which examples a tensor holds that it was not given"
            )
        others = [d for d in range(x.dim()) if d != dim % x.dim()]
        shape = tuple(x.shape)
        ids = provenance.table(provenance.reduce(tag, shape, others, keepdim=False), (shape[dim],))
        ids = ids.expand(shape[dim]).clone()
        if bool((ids == provenance.MIXED).any()):
            raise local.LocalError("an index of its inputs holds several examples")
        return ids.to(x.device)

    def _scaled(self, delta: Tensor) -> Tensor:
        """``c_b·δ_b``: with per-example factors (clipping), each ``g_b`` comes out ``c_b·g_b``
        (``g_b`` is linear in ``δ_b``)."""
        if self.scale is None:
            return delta
        return delta * self.scale.to(delta.dtype).view(-1, *[1] * (delta.dim() - 1))


UNSEEN = "the one-example forward pass did not see this call"
NO_EXAMPLE = "none of its inputs holds an example's data"
NOT_ON_DIM_0 = "its output does not carry the batch on dim 0"
LAYOUT_PROBLEMS = (UNSEEN, NO_EXAMPLE, NOT_ON_DIM_0)
"""Why the local path cannot read a call, where a rule in the layer's own layout can."""


def tensors(args: tuple, kwargs: dict):
    """``(key, tensor)`` for the tensors among the positional and keyword inputs."""
    yield from ((i, x) for i, x in enumerate(args) if isinstance(x, Tensor))
    yield from ((k, x) for k, x in kwargs.items() if isinstance(x, Tensor))


def all_tensors(args: tuple, kwargs: dict) -> list[Tensor]:
    """Every tensor among the inputs, nested ones too (an LSTM's ``(h, c)``, a packed
    sequence's) in lists, tuples and dicts: what a module call takes, without pytree's cost
    on every call."""
    found = []
    for x in (*args, *kwargs.values()):
        if isinstance(x, Tensor):
            found.append(x)
        elif isinstance(x, (list, tuple, dict)):
            found.extend(all_tensors(tuple(x.values()) if isinstance(x, dict) else x, {}))
    return found


def _examples(tag: provenance.Tag, x: Tensor) -> tuple[int, Tensor]:
    """The dimension of ``x`` that carries examples and the example of each index along it.

    Raises:
        LocalError: no dimension does, one index holds several examples or none.
    """
    dim = provenance.example_dim(tag, tuple(x.shape))
    ids = provenance.along(tag, tuple(x.shape), dim) if dim >= 0 else None
    if ids is None:
        raise local.LocalError("a row of its inputs or outputs holds several examples or none")
    return dim, ids.to(x.device)


def _detached(inputs):
    detached = pytree.tree_map(lambda x: x.detach() if isinstance(x, Tensor) else x, inputs)
    return list(detached) if isinstance(detached, tuple) else detached


def _moments(layer: nn.Module, name: str, pair: object) -> Moments:
    """A rule's ``(Σ_b g_b, Σ_b g_b²)`` for parameter ``name``, as :class:`Moments`.

    Raises:
        TypeError: the rule returned something other than a pair.
    """
    if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
        raise TypeError(
            f"the moments rule of {type(layer).__name__} returned a {type(pair).__name__} for "
            f"{name!r}: return (Σ_b g_b, Σ_b g_b²), two tensors shaped like the parameter"
        )
    return Moments(*pair)
