"""Per-example statistics layer by layer, from one batched forward and backward pass.

Every module that owns trainable parameters is *hooked*: a module with a rule
(:mod:`pergrad.rules`) for all its parameters, any other that holds no layers for those it owns
directly (a custom norm's ``weight``). While the batch runs forward, a hooked module runs on
detached views of those parameters, so autograd does not form their batch gradients; a
forward hook (run before any of the module's own) keeps its inputs, and hooks on its outputs
receive ``δ``. Every other use of a parameter — in the model's own code, in a module that holds
layers (a ``cls_token``), in a call on inputs that hold no example's data (a position table
looked up by positions) — is taken at the operation that makes it (:mod:`pergrad.uses`) and
recorded as a call of a layer of its own (a :class:`pergrad.record.Record`). After the
backward pass each parameter's values come from the records of its uses
(:mod:`pergrad.assemble`).

A parameter is covered only where that is provably its whole gradient:

- every use of it is a recorded call; autograd, asked for the parameter's own gradient, finds
  no other (a custom autograd Function given the parameter or a tensor computed from it, a
  tensor computed from it in an earlier pass, fail this), and the model puts no hook on a
  tensor computed from it;
- each call's inputs carry the batch on dim 0 or are shared by the whole batch. On the first
  call (and the first after the model's structure changed, :mod:`pergrad.structure`) a
  forward pass of one example shows which inputs follow the batch size, so a length that
  happens to equal ``B`` is not mistaken for it (that pass keeps autograd on, so that what
  the model keeps from it stays tied to the parameters, and restores the random state; a
  model whose forward pass changes its own state sees one call more). Which example each row
  holds is followed through the model (:mod:`pergrad.provenance`); rows a call gives to
  examples by their place are tagged so;
- a rule sees only the gradient of its layer's first output: if another output (attention
  weights) reaches the loss, the call goes to the layer-local path, which replays the layer on
  each example alone and refuses it if that replay's output differs from the batch's.

Every other parameter is reported with the reason, for a whole-model mode to compute. Calls
under ``torch.no_grad`` and recomputations during the backward pass (activation
checkpointing) are not uses.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from pergrad import assemble, checks, local, provenance
from pergrad import inputs as batch
from pergrad.assemble import Flow, LayerwiseResult
from pergrad.record import (
    LAYOUT_PROBLEMS,
    NO_EXAMPLE,
    NOT_ON_DIM_0,
    UNSEEN,
    Record,
    all_tensors,
    tensors,
)
from pergrad.reduce import Quantity
from pergrad.structure import Hooked, Structure
from pergrad.uses import OpUse, Uses


class Layerwise:
    """Computes a :class:`LayerwiseResult` for ``loss_fn(model(*inputs), target)`` (or
    ``model(**inputs)``)."""

    def __init__(self, model: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor]):
        self.model = model
        self.loss_fn = loss_fn
        self._probe: dict[int, list[frozenset]] | None = None  # id(module) -> per call
        self._probe_failed = False
        self._probed: Structure | None = None  # the structure the probe ran on
        self.loss_checked = False  # checks.separable, on the first batch of two or more
        self.warned: set[tuple[str, str]] = set()  # rule failures announced

    @contextmanager
    def run(
        self, structure: Structure, inputs: batch.Inputs, target: Tensor, quantity: Quantity
    ) -> Iterator[LayerwiseResult]:
        """The forward and backward pass, and its result, which asks its records for the
        covered parameters' ``quantity`` while entered."""
        if structure is not self._probed:  # a changed model: its calls are seen afresh
            self._probe, self._probe_failed, self._probed = None, False, structure
        if self._probe is None and len(target) > 1 and not self._probe_failed:
            self._run_probe(structure.hooked, inputs)
        forward = _Forward(self, structure, len(target), quantity)
        try:
            yield forward.run(inputs, target)
        finally:
            forward.release()

    def _run_probe(self, hooked: list[Hooked], inputs: batch.Inputs) -> None:
        """Run one example; record, per call of each hooked module, the length of dim 0 of
        each tensor input (those that follow the batch size have it ``B`` times longer in
        the batch)."""
        probe: dict[int, list[dict]] = defaultdict(list)

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            probe[id(module)].append({k: x.shape[0] for k, x in tensors(args, kwargs) if x.dim()})

        handles = [h.module.register_forward_pre_hook(hook, with_kwargs=True) for h in hooked]
        devices = [x.device for x in batch.tensors(inputs) if x.device.type == "cuda"]
        try:  # the model's warnings come from the batched pass; not twice from this one
            with torch.random.fork_rng(devices=devices), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                batch.run(self.model, batch.rows(inputs, slice(0, 1)))
        except Exception:  # the model cannot run one example: no input is known to be batched
            self._probe_failed = True
            return
        finally:
            for handle in handles:
                handle.remove()
        self._probe = dict(probe)

    def batched_keys(
        self, module: nn.Module, call_index: int, args, kwargs, size: int
    ) -> dict[int | str, int] | None:
        """The keys of the inputs that carry the batch on dim 0, each with its rows per
        example (an attention mask ``(B·heads, L, S)``: ``heads``), or ``None`` where that is
        unknown."""
        if size == 1:
            return {k: 1 for k, x in tensors(args, kwargs) if x.dim() and x.shape[0] == 1}
        calls = (self._probe or {}).get(id(module), [])
        if call_index >= len(calls):
            return None
        alone = calls[call_index]
        return {
            k: alone[k]
            for k, x in tensors(args, kwargs)
            if x.dim() and k in alone and alone[k] and x.shape[0] == size * alone[k]
        }


class _Forward:
    """One batched forward and backward pass with the hooks in place."""

    def __init__(self, layerwise: Layerwise, structure: Structure, size: int, quantity: Quantity):
        self.layerwise = layerwise
        self.params = structure.params
        self.hooked = structure.hooked
        self.size = size
        self.quantity = quantity
        self.records: list[Record] = []
        self.calls: dict[int, int] = defaultdict(int)
        self.anchors: dict[tuple, Tensor] = {}  # by dtype and device
        self.single_use: set[int] = set()  # records whose parameters have no other use
        self.tracker = provenance.Provenance()  # which example each value comes from
        self.uses = Uses(self.params, size, self.tracker, self._op_use)  # uses outside layers
        self.untraced: str | None = None  # why no record's rows can be attributed
        self.entered: list[tuple[nn.Module, bool]] = []  # running calls: parameters detached?
        self.recursive: set[int] = set()  # modules called inside a call of themselves
        self.placed: list[str] = []  # layers whose output rows were given examples by place
        self.crossed = False  # whether an example's loss holds values of other examples
        self.precision = checks.autocast_dtype()  # what autocast runs the layers in, if on

    def run(self, inputs: batch.Inputs, target: Tensor) -> LayerwiseResult:
        """Run the model forward and backward with the hooks in place; the parameters each
        record covers, and why each other is left."""
        handles = []
        for hooked in self.hooked:
            detached = {name: self.params[name].detach() for name in hooked.params.values()}
            handles.append(
                hooked.module.register_forward_pre_hook(
                    self._detach_hook(hooked, detached), with_kwargs=True
                )
            )
            handles.append(
                hooked.module.register_forward_hook(
                    self._record_hook(hooked, detached),
                    with_kwargs=True,
                    prepend=True,
                    always_call=True,
                )
            )
        try:
            losses, output = self._forward(inputs, target)
            self._check_provenance(losses)
            if not self.layerwise.loss_checked:
                checks.separable(self.layerwise.loss_fn, output, target, losses)
                self.layerwise.loss_checked = self.size > 1
            self._count_uses()
            try:
                grads = torch.autograd.grad(
                    losses.sum(), [*self.params.values(), *self.anchors.values()], allow_unused=True
                )
            except RuntimeError as error:
                if "use_reentrant=True" not in str(error):
                    raise
                raise checks.InputError(
                    "the model uses activation checkpointing with use_reentrant=True, which "
                    "works only with loss.backward(). Use use_reentrant=False: "
                    "torch.utils.checkpoint.checkpoint(..., use_reentrant=False), or for a "
                    "Hugging Face model activation_checkpointing_enable("
                    "activation_checkpointing_kwargs={'use_reentrant': False})."
                ) from error
        finally:
            for handle in handles:
                handle.remove()
            for hooked in self.hooked:
                hooked.swap(self.params)
        if self.uses.changed:
            self.untraced = (
                f"a hook the model put on a gradient during its forward pass changed it "
                f"({self.uses.changed[0]}): pergrad cannot follow what it does to each "
                f"example's gradient"
            )
        for record in self.records:
            record.check_outputs()
            if id(record.hooked.module) in self.recursive:
                record.problem = "it calls itself"
        owning_layers = {name: h for h in self.hooked for name in h.params.values()}
        others = dict(zip(self.params, grads))
        uncovered = assemble.uncovered(
            self.params, self.records, others, owning_layers, self.untraced, self.uses.unseen
        )
        return LayerwiseResult(
            self.params,
            self.records,
            self.quantity,
            losses.detach(),
            uncovered,
            self.layerwise.warned,
            self._flow(),
        )

    def _flow(self) -> Flow:
        tracker = self.tracker
        return Flow(
            self.crossed, bool(tracker.random), tuple(tracker.unknown), tuple(tracker.mixing)
        )

    def _forward(self, inputs: batch.Inputs, target: Tensor) -> tuple[Tensor, object]:
        """The model and the loss under :attr:`tracker`, each input's row ``b`` example ``b``."""
        given = [x for x in (*batch.tensors(inputs), target) if x.dim() and len(x) == self.size]
        for x in given:
            self.tracker.set(x, provenance.batch(x.dim(), self.size))
        with self.tracker:
            with self.uses:
                output = batch.run(self.layerwise.model, inputs)
            losses = checks.per_example_loss(self.layerwise.loss_fn(output, target), self.size)
        return losses, output

    def _check_provenance(self, losses: Tensor) -> None:
        """Each example's loss must come from that example alone. Where it does not because
        an operation combines examples, refuse; where pergrad cannot follow an operation, no
        row can be attributed: every parameter goes to a whole-model mode.

        Raises:
            InputError: an operation of the model or the loss combines examples.
        """
        tag = self.tracker.tag(losses)
        if isinstance(tag, provenance.Axis) and tag == provenance.batch(1, self.size):
            return
        ids = provenance.table(tag, tuple(losses.shape)).expand(losses.shape)
        own = (ids == torch.arange(self.size)) | (ids == provenance.NONE)
        if bool(own.all()):
            return
        self.crossed = True
        tracker = self.tracker
        if self.placed and not tracker.unknown:  # maybe those rows, not the model, mix
            self.untraced = (
                f"rows that hold no example's data (from {self.placed[0]}) were given to "
                f"examples by their place in the batch, and the model combines them with "
                f"other examples' rows"
            )
            return
        if tracker.mixing and not tracker.unknown:
            raise checks.InputError(
                f"the model or loss_fn combines examples: "
                f"{', '.join(dict.fromkeys(tracker.mixing)) or 'an operation'} runs across "
                f"the batch, so one example's loss depends on other examples' inputs and has "
                f"no gradient of its own. Compute each example's loss from that example alone "
                f"(a statistic over the batch, as BatchNorm in training mode takes, cannot be "
                f"given per example)."
            )
        if tracker.unknown:
            through = ", ".join(dict.fromkeys(tracker.unknown[:3]))
            self.untraced = (
                f"pergrad cannot follow which example each value comes from through {through}"
            )
        else:
            self.untraced = (
                "one example's loss holds values of other examples: the model moves them "
                "between examples"
            )

    def _detach_hook(self, hooked: Hooked, detached: dict[str, Tensor]):
        """A forward pre-hook that makes the module's parameters the detached views, except
        for calls whose parameters are taken at their uses (:mod:`pergrad.uses`): a call on
        inputs that hold no example's data (a position table looked up by positions), and a
        call whose parameters the model replaced (``torch.func.functional_call``)."""

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            with torch._C.DisableTorchFunction():
                detach = torch.is_grad_enabled() and not self._replaced(hooked, detached)
                if detach and _recording() and self._shared(module, args, kwargs):
                    self.calls[id(module)] += 1
                    detach = False
                self.entered.append((module, detach))
                if detach:  # a recomputation too: it must save what the forward did
                    hooked.swap(detached)

        return hook

    def _replaced(self, hooked: Hooked, detached: dict[str, Tensor]) -> bool:
        """Whether the module's parameters are neither the model's nor their detached views."""
        return any(
            parameters[leaf] is not self.params[name] and parameters[leaf] is not detached[name]
            for (parameters, leaf), name in zip(hooked.slots, hooked.params.values())
        )

    def _shared(self, module: nn.Module, args: tuple, kwargs: dict) -> bool:
        """Whether no input holds an example's data, nor follows the batch size in the
        one-example pass (positions expanded to the batch are rows of examples)."""
        tags = (self.tracker.tag(x) for x in all_tensors(args, kwargs))
        if not all(map(provenance.unmarked, tags)):
            return False
        index = self.calls[id(module)]
        return self.layerwise.batched_keys(module, index, args, kwargs, self.size) == {}

    def _record_hook(self, hooked: Hooked, detached: dict[str, Tensor]):
        """A forward hook, run even where the call raises: the module's parameters back as
        they were before the call (the detached views while a call of it that encloses this
        one runs), and the call recorded where its parameters were detached (one that raised,
        its error caught by the model, with no output: its parameters go to a whole-model
        mode)."""

        def hook(module: nn.Module, args: tuple, kwargs: dict, output):
            with torch._C.DisableTorchFunction():  # pergrad's bookkeeping, not uses
                while self.entered:  # calls that raised inside this one left theirs
                    entered, detach = self.entered.pop()
                    if entered is module:
                        break
                if not detach:
                    return None
                outer = any(m is module and d for m, d in self.entered)
                hooked.swap(detached if outer else self.params)
                if outer:  # a replay of the enclosing call would count this one again
                    self.recursive.add(id(module))
                return self._on_call(hooked, module, args, kwargs, output)

        return hook

    def _on_call(self, hooked: Hooked, module: nn.Module, args: tuple, kwargs: dict, output):
        """Record a call of a hooked module (or of an operation on parameters); return the
        output the model receives, or ``None`` where that is ``output`` itself."""
        if isinstance(output, Tensor):  # the common case, without pytree's walk
            leaves, spec = [output], None
        else:
            leaves, spec = pytree.tree_flatten(output)
        floating = [
            i for i, x in enumerate(leaves) if isinstance(x, Tensor) and x.is_floating_point()
        ]
        # a zero anchor makes δ reach the outputs even where nothing before needs it; a
        # recomputation (activation checkpointing) adds it too, to save what this did
        tracker = self.tracker
        with tracker.paused():
            for i in floating:
                tag = tracker.tag(leaves[i])
                leaves[i] = leaves[i] + self._anchor(leaves[i])
                tracker.set(leaves[i], tag)
        if not _recording():
            return _rebuild(leaves, spec)
        record = self._record(hooked, module, args, kwargs)
        record.precision = self.precision
        if not floating:
            record.problem = record.problem or "it returns no floating-point tensor"
            return None
        with tracker.paused():
            record.outputs = [leaves[i].detach() for i in floating]
        record.versions = [leaves[i]._version for i in floating]
        record.deltas = [None] * len(floating)
        self._trace(record, [leaves[i] for i in floating], args, kwargs)
        if record.moved is None and record.batched:
            self._attribute(record, [leaves[i] for i in floating])
        if not record.batched and record.problem is None:
            record.problem = NO_EXAMPLE
        # the pre-hook of the anchor's own node sees δ as autograd sends it into the
        # layer: after any hook the model puts on the output
        for slot, i in enumerate(floating):
            leaves[i].grad_fn.register_prehook(self._grad_hook(record, slot))
        first = record.outputs[0]
        in_order = first.dim() and first.shape[0] == self.size
        if record.problem is None and not in_order and record.moved is None:
            record.problem = NOT_ON_DIM_0
        if record.own_layout:  # its rule reads the examples from these tags
            record.leaf_tags = {id(x): tracker.tag(x) for x in all_tensors(args, kwargs)}
            if record.problem in LAYOUT_PROBLEMS:
                record.layout_problem, record.problem = record.problem, None
        return _rebuild(leaves, spec)

    def _op_use(self, op: OpUse, tensors: tuple, output):
        """A use of parameters outside their layers (:mod:`pergrad.uses`), recorded as a call
        of a layer without a rule; returns the output the model receives."""
        names = {local: name for name, local in op.names.items()}
        with torch._C.DisableTorchFunction():
            found = self._on_call(Hooked(op, None, names, None), op, tensors, {}, output)
        return output if found is None else found

    def _trace(self, record: Record, outputs: list[Tensor], args: tuple, kwargs: dict) -> None:
        """Where the output's rows are not the batch in order (flattened, routed or reordered
        inside the model), mark the record :attr:`Record.moved`, take the inputs that carry
        examples from their tags, not from the one-example pass, and keep those tags."""
        tag = self.tracker.tag(outputs[0])
        shape = tuple(outputs[0].shape)
        if provenance.in_order(tag, shape, self.size) and self._inputs_in_order(record):
            return
        record.moved = tag
        record.output_tags = [self.tracker.tag(o) for o in outputs]
        for key, x in tensors(args, kwargs):
            if not provenance.unmarked(found := self.tracker.tag(x)):
                record.input_tags[key] = found
        record.batched = frozenset(record.input_tags)
        if record.problem == UNSEEN:
            record.problem = None

    def _attribute(self, record: Record, outputs: list[Tensor]) -> None:
        """A call with batched inputs gives row ``b`` of its outputs' ``δ`` to example ``b``,
        which is right only if every later use keeps the whole row example ``b``'s. Rows
        whose elements come from no example, in part (a ``cls`` token written before the
        tokens) or whole (a learned query expanded to the batch, which the one-example pass
        finds following the batch size), are tagged example ``b``'s from here on, so the
        losses' check sees any use that moves them to another example (:attr:`placed`)."""
        tracker = self.tracker
        for x in outputs:
            tag, shape = tracker.tag(x), tuple(x.shape)
            if isinstance(tag, provenance.Axis) or not shape or shape[0] != self.size:
                continue
            with tracker.paused():
                if provenance.in_order(tag, shape, self.size):  # unmarked ones too
                    tracker.set(x, provenance.batch(len(shape), self.size))
                    if bool((provenance.table(tag, shape) == provenance.NONE).any()):
                        self.placed.append(record.hooked.label)

    def _inputs_in_order(self, record: Record) -> bool:
        """Whether every batched input of an operation's use holds the batch in order on dim
        0 (a layer's are known from the one-example pass)."""
        if not isinstance(record.hooked.module, OpUse):
            return True
        return all(
            provenance.in_order(self.tracker.tag(x), tuple(x.shape), self.size)
            for key, x in tensors(record.args, record.kwargs)
            if key in record.batched
        )

    def _anchor(self, output: Tensor) -> Tensor:
        """The pass's zero anchor in ``output``'s dtype and device (one for all outputs)."""
        key = (output.dtype, output.device)
        if key not in self.anchors:
            self.anchors[key] = output.new_zeros((), requires_grad=True)
        return self.anchors[key]

    def release(self) -> None:
        """Drop every tensor the pass kept (:meth:`Record.release`)."""
        for record in self.records:
            record.release()
        self.records, self.anchors = [], {}

    def _record(self, hooked: Hooked, module: nn.Module, args: tuple, kwargs: dict) -> Record:
        index = self.calls[id(module)]
        self.calls[id(module)] += 1
        if isinstance(module, OpUse):  # not in the one-example pass: the tags tell
            batched = {
                key: 1
                for key, x in tensors(args, kwargs)
                if not provenance.unmarked(self.tracker.tag(x))
            }
        else:
            batched = self.layerwise.batched_keys(module, index, args, kwargs, self.size)
            batched = batched if batched is None else self._proven(batched, args, kwargs)
        record = Record(hooked, args, kwargs, frozenset(batched or ()), self.size)
        record.groups = {key: rows for key, rows in (batched or {}).items() if rows > 1}
        record.input_versions = [x._version for x in all_tensors(args, kwargs)]
        self.records.append(record)
        if batched is None:
            record.problem = UNSEEN
        elif torch.nn.modules.module._global_forward_hooks:
            record.problem = "a global forward hook may change its output"
        return record

    def _proven(self, batched: dict, args: tuple, kwargs: dict) -> dict:
        """The batched inputs, but those with several rows per example whose tags do not
        prove that each example's rows are consecutive, in order."""
        if all(rows == 1 for rows in batched.values()):  # the common case
            return batched
        given = dict(tensors(args, kwargs))
        return {
            key: rows
            for key, rows in batched.items()
            if rows == 1
            or provenance.grouped(self.tracker.tag(given[key]), tuple(given[key].shape), rows)
        }

    def _grad_hook(self, record: Record, slot: int):
        def hook(grads: tuple[Tensor | None]) -> None:
            if grads[0] is None:  # no gradient reached the output after all
                return
            record.deltas[slot] = grads[0]
            eager = self.quantity.max_norm is None and len(record.deltas) == 1
            eager = eager and record.problem is None
            eager = eager and (record.moved is None or record._use_rule)  # no autograd in here
            if eager and id(record) in self.single_use:
                try:
                    record.early = record.values(self.quantity)
                except local.LocalError:
                    return  # the reason is found again, and reported, after the backward pass
                record.deltas[0] = None  # δ is no longer needed
                record.outputs = []

        return hook

    def _count_uses(self) -> None:
        """Mark the records whose parameters no other record uses: their values can be formed
        as soon as ``δ`` arrives, and ``δ`` dropped."""
        counts: dict[str, int] = defaultdict(int)
        for record in self.records:
            for name in record.hooked.params.values():
                counts[name] += 1
        self.single_use = {
            id(r) for r in self.records if all(counts[n] == 1 for n in r.hooked.params.values())
        }


def _rebuild(leaves: list, spec) -> object:
    """The output from its leaves: itself where it was one tensor (``spec`` ``None``)."""
    return leaves[0] if spec is None else pytree.tree_unflatten(leaves, spec)


def _recording() -> bool:
    """Whether a module call is part of the batched forward pass: not a recomputation during
    the backward pass (activation checkpointing) nor a call without gradients."""
    return torch.is_grad_enabled() and torch._C._current_graph_task_id() == -1
