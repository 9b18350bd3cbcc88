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

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from pergrad import local, provenance
from pergrad.reduce import HALF, Moments, Quantity, Values
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
    groups: dict = field(default_factory=dict)  # batched keys with several rows per example
    precision: torch.dtype | None = None  # the dtype autocast ran the call in, if it was on
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

    @property
    def _all_outputs(self) -> bool:
        """Whether the module's rule reads the ``δ`` of every output."""
        rule = self.hooked.rule
        return rule is not None and (rule.own_layout or rule.all_outputs)

    def check_outputs(self) -> None:
        """Refuse the rule where an output other than the first received a gradient, unless
        it reads them all."""
        if (
            not self._all_outputs
            and any(g is not None for g in self.deltas[1:])
            and self.rule_problem is None
        ):
            self.rule_problem = "an output other than its first reaches the loss"

    def call(self) -> Call:
        """The call as a rule reads it: the inputs that carry the batch on dim 0 (shared ones
        with 1 there expanded to it), ``δ`` batched alike; for a rule in its own layout, as the
        layer received it."""
        if self.own_layout:
            deltas = self.all_deltas()
            return Call(
                self.args, self.kwargs, deltas[0], frozenset(), tuple(deltas), self._examples,
                self.size, tuple(self._batch_outputs()), precision=self.precision,
            )  # fmt: skip
        if self.moved is not None:
            return self._regrouped()
        args, batched = list(self.args), set(self.batched)
        for i, x in enumerate(args):
            if i in batched:
                continue
            if isinstance(x, Tensor) and x.dim() and x.shape[0] == 1:  # shared: expanded
                args[i] = x.expand(self.size, *x.shape[1:])
                batched.add(i)
            elif isinstance(x, (tuple, list)) and _rows_of_batch(x, self.size):
                batched.add(i)  # states (h, c), whose rows the tags of the outputs vouch for
        deltas = [self._scaled(d) for d in self.all_deltas()]
        call = Call(
            tuple(args), self.kwargs, deltas[0], frozenset(batched), groups=self.groups,
            precision=self.precision,
        )  # fmt: skip
        if self.hooked.rule.all_outputs:
            call = replace(call, output_grads=tuple(deltas), outputs=tuple(self._batch_outputs()))
        return call

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
        if rule.features is not None:
            move = lambda x, tag: (regroup(x), 1)  # noqa: E731
        else:
            move = lambda x, tag: _by_example(tag, x, ids, regroup)  # noqa: E731
        moved, groups = {}, {}
        for key, x in tensors(self.args, self.kwargs):
            if key not in self.batched:
                continue
            if rule.features is not None and not regroup.aligned(x):
                raise local.LocalError("an input's rows are not those of its output")
            moved[key], rows = move(x, self.input_tags.get(key))
            if rows > 1:
                groups[key] = rows
        args = tuple(moved.get(i, x) for i, x in enumerate(self.args))
        kwargs = {k: moved.get(k, x) for k, x in self.kwargs.items()}
        deltas = self.all_deltas()
        tags = self.output_tags if rule.all_outputs else self.output_tags[:1]
        changed = [move(d, tag)[0] for d, tag in zip(deltas, tags)]
        call = Call(
            args, kwargs, self._scaled(changed[0]), frozenset(moved), groups=groups,
            precision=self.precision, regrouped=True,
        )  # fmt: skip
        if rule.all_outputs:
            outputs = [move(o, tag)[0] for o, tag in zip(self._batch_outputs(), tags)]
            call = replace(
                call, output_grads=tuple(map(self._scaled, changed)), outputs=tuple(outputs)
            )
        return call

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
            owner = self._owner()
            if owner is not None:
                return self._owner_grads(owner, start, stop)
            return self._grads_by_rows(start, stop)
        args, kwargs = _detached(self.args), _detached(self.kwargs)
        rows = {key: self.groups.get(key, 1) for key in self.batched}
        for key, k in rows.items():
            local.put(args, kwargs, key, local.get(args, kwargs, key)[start * k : stop * k])
        return local.per_example_grads(
            module,
            names,
            tuple(args),
            kwargs,
            rows,
            [o[start:stop] for o in self._batch_outputs()],
            [g[start:stop] for g in self.all_deltas()],
        )

    def _owner(self) -> int | None:
        """The one example whose data every output holds, where one does (every call in a
        batch of one; a layer that reduces one example's rows to a number): all of ``δ`` then
        comes from that example's loss."""
        found = {
            provenance.single(tag, tuple(o.shape)) for tag, o in zip(self.output_tags, self.outputs)
        }
        owner = found.pop() if len(found) == 1 else provenance.MIXED
        return owner if owner >= 0 else None

    def _owner_grads(self, owner: int, start: int, stop: int) -> dict[str, Tensor]:
        """Per-example gradients of examples ``start:stop`` of a call whose outputs hold
        example ``owner``'s data alone: the layer's vector-Jacobian product for it, zeros for
        the others."""
        module = self.hooked.module
        theta = {n: module.get_parameter(n).detach().requires_grad_() for n in self.hooked.params}
        args, kwargs = tuple(_detached(self.args)), _detached(self.kwargs)
        found = local.replayed_grads(
            module, theta, args, kwargs, self._batch_outputs(), self.all_deltas()
        )
        grads = {}
        for name, g in found.items():
            grads[name] = g.new_zeros(stop - start, *g.shape)
            if start <= owner < stop:
                grads[name][owner - start] = g
        return grads

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
        """``use(rule, layer, call)`` where the layer's rule applies, in full precision (see
        :func:`_precise`). ``None`` where it gives nothing for this call, or where the rule
        fails: the layer-local path then takes over, for this call and every later use of
        it."""
        if not self._use_rule:
            return None
        try:
            call = self.call()
        except local.LocalError as error:  # moved rows it cannot read: the local path may
            self.rule_problem = f"it cannot read this call: {error}"
            return None
        try:
            parameters, leaf = self.hooked.slots[0]
            full = _full_precision() if self.precision is not None else contextlib.nullcontext()
            with torch.no_grad(), full:
                return use(self.hooked.rule, self.hooked.module, _precise(call, parameters[leaf]))
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


def _full_precision() -> contextlib.AbstractContextManager:
    """Autocast off, where it is on: a rule's closed forms run in the precision of the
    tensors it is given."""
    on = [device for device in ("cpu", "cuda") if torch.is_autocast_enabled(device)]
    if not on:
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    for device in on:
        stack.enter_context(torch.autocast(device, enabled=False))
    return stack


def _precise(call: Call, parameter: Tensor) -> Call:
    """The call with its half-precision tensors in the precision of the layer's
    ``parameter``: under autocast a layer with float32 parameters computes in half precision,
    and its statistics are formed and summed in float32 (a closed form such as
    :func:`pergrad.rules.base.pair_moments` would lose its sign in half precision); a layer
    whose parameters are themselves in half precision stays there. ``examples`` still reads
    the tags of the tensors the layer received."""
    dtype = parameter.dtype
    if dtype in HALF:
        return call
    leaves = [*all_tensors(call.args, call.kwargs), call.output_grad, *call.output_grads]
    if not any(x.dtype in HALF for x in leaves):
        return call
    originals: dict[int, Tensor] = {}

    def full(x):
        if not isinstance(x, Tensor) or x.dtype not in HALF:
            return x
        y = x.to(dtype)
        originals[id(y)] = x
        return y

    examples = call.examples
    if examples is not None:
        examples = lambda x, dim: call.examples(originals.get(id(x), x), dim)  # noqa: E731
    return replace(
        call,
        args=pytree.tree_map(full, call.args),
        kwargs=pytree.tree_map(full, call.kwargs),
        output_grad=full(call.output_grad),
        output_grads=tuple(map(full, call.output_grads)),
        outputs=tuple(map(full, call.outputs)),
        examples=examples,
    )


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


def _rows_of_batch(values: tuple | list, size: int) -> bool:
    """Whether every tensor in a positional input of tensors has the batch size on dim 0."""
    found = all_tensors(tuple(values), {})
    return bool(found) and all(x.dim() and x.shape[0] == size for x in found)


def _by_example(tag: provenance.Tag, x: Tensor, ids: Tensor, regroup: Regroup):
    """For a layer without positions whose rows the model moved: ``x`` with its examples
    along dim 0, in the batch's order, as ``regroup`` lays out the output's one row per
    example (``ids``), and its rows per example. ``x`` holds its examples along a dimension of
    its own (a padding mask is ``(B, S)`` where the query is ``(L, B, E)``), one row each or
    several together (a mask ``(B·heads, L, S)``).

    Raises:
        LocalError: ``x``'s examples are not those of the output.
    """
    own, examples = _examples(tag, x)
    rows = len(examples) // max(1, len(ids))
    if rows < 1 or not torch.equal(examples.cpu(), ids.repeat_interleave(rows)):
        raise local.LocalError("an input's examples are not those of its output")
    if rows > 1 and len(ids.unique()) < 2:  # a sequence-first key at B = 1 looks so too
        raise local.LocalError("with one example, its inputs' rows do not say their layout")
    x = x.movedim(own, 0)
    if rows == 1:
        return regroup(x).squeeze(1), 1
    return regroup(x.unflatten(0, (-1, rows))).squeeze(1).flatten(0, 1), rows


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
