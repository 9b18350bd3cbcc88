"""Per-example statistics layer by layer, from one batched forward and backward pass.

Every module that owns trainable parameters is *hooked*: a module with a rule
(:mod:`pergrad.rules`) for all its parameters, any other that holds no layers for those it owns
directly (a custom norm's ``weight``). While the batch runs forward, a hooked module runs on
detached views of those parameters, so autograd does not form their batch gradients; a
forward hook (run before any of the module's own) keeps its inputs, and hooks on its outputs
receive ``δ``. Every other use of a parameter — in the model's own code, in a module that holds
layers (a ``cls_token``), in a call on inputs that hold no example's data (a position table
looked up by positions) — is taken at the operation that makes it (:mod:`pergrad.uses`) and
recorded as a call of a layer of its own. After the backward pass each parameter's
per-example gradients, or their moments ``(Σ_b g_b, Σ_b g_b²)``, come from its module's rule
or, without one, from ``torch.func`` over that module alone (:mod:`pergrad.local`); a
parameter used by several modules, or by one module called several times, gets the
per-example sum over its uses before squaring, a few examples at a time.

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

import functools
import warnings
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from pergrad import checks, local, provenance
from pergrad import inputs as batch
from pergrad.fallback import warn
from pergrad.regroup import Regroup
from pergrad.rules.base import (
    REDUCE_ELEMENTS,
    Call,
    Moments,
    Rule,
    add_moments,
    chunks,
    fresh_moments,
    moments_in_chunks,
    sq_norms_in_chunks,
)
from pergrad.stats import sq_norms
from pergrad.structure import Hooked, Structure
from pergrad.uses import OpUse, Uses

Values = dict[str, "Tensor | Moments"]

Clip = Callable[[Tensor, dict[str, str]], Tensor]
"""``clip(sq_norms, uncovered) -> c``: given ``Σ |g_b|²`` over the covered parameters,
``(B,)`` in float64, and the parameters left uncovered (name -> why), the factors ``c_b`` by
which each example's gradient is scaled before the moments are formed."""


@dataclass
class LayerwiseResult:
    """For each covered parameter, its per-example gradients ``(B, *shape)`` or their moments
    ``(Σ_b g_b, Σ_b g_b²)``; and the per-example losses."""

    values: Values
    losses: Tensor
    sources: dict[str, str] = field(default_factory=dict)
    """Where each covered parameter's values came from: its layer type (a rule), the type
    followed by ``" (local)"`` (``torch.func`` over that layer), a torch function followed by
    ``" (op)"`` (a use at that operation), several joined by ``+``, or ``"unused"``."""
    uncovered: dict[str, str] = field(default_factory=dict)
    """Why each other parameter is not covered."""


@dataclass
class _Record:
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
    values: Values | None = None  # computed during the backward pass, where that is safe
    scale: Tensor | None = None  # per-example factors c_b on δ (clipping), once known
    moved: provenance.Tag | None = None  # the first output's, where rows are not the batch
    input_tags: dict = field(default_factory=dict)  # where moved: of each batched input
    output_tags: list = field(default_factory=list)  # and of each floating output
    _recomputed: list[Tensor] | None = None  # outputs computed again (see _batch_outputs)

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

    def all_deltas(self) -> list[Tensor]:
        """``δ`` of every floating output, zeros where none arrived."""
        return [torch.zeros_like(o) if g is None else g for o, g in zip(self.outputs, self.deltas)]

    def check_outputs(self) -> None:
        """Refuse the rule where an output other than the first received a gradient."""
        if any(g is not None for g in self.deltas[1:]) and self.rule_problem is None:
            self.rule_problem = "an output other than its first reaches the loss"

    def call(self) -> Call:
        """The call as a rule reads it: every positional input and ``δ`` batched on dim 0."""
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
        for key, x in _tensors(self.args, self.kwargs):
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

    def compute(self, per_example: bool) -> Values:
        """All per-example gradients of the module's covered parameters, or their moments."""
        self.check_inputs()
        if per_example:
            return self.grads(0, self.size)
        return self._reduced("moments", moments_in_chunks)

    def sq_norms(self) -> dict[str, Tensor]:
        """``|g_b|²`` of each covered parameter, ``(B,)``: the rule's closed form where it has
        one, else from per-example gradients formed a few examples at a time."""
        self.check_inputs()
        return self._reduced("norms", sq_norms_in_chunks)

    def _reduced(self, closed_form: str, in_chunks: Callable) -> Values:
        """The rule's ``closed_form`` (``"moments"`` or ``"norms"``) where it has one for this
        call, else ``in_chunks`` of the per-example gradients, the rule's or the layer-local
        path's, formed a few examples at a time."""

        def by_rule(rule: Rule, layer: nn.Module, call: Call) -> Values:
            form = getattr(rule, closed_form)
            if form is not None and (found := form(layer, call)) is not None:
                return found
            grads = lambda i, j: rule.grads(layer, call.narrow(i, j))  # noqa: E731
            return in_chunks(grads, self.size, self.hooked.numel)

        found = self._by_rule(by_rule)
        if found is not None:
            return found
        return in_chunks(self.grads, self.size, self.hooked.numel)

    def check_inputs(self) -> None:
        """Refuse the call if the model changed one of its inputs in place after it (``h *=
        2`` after ``layer(h)``): its rule and its replay would read the changed values.

        Raises:
            LocalError: saying so.
        """
        now = [x._version for _, x in _tensors(self.args, self.kwargs)]
        if now != self.input_versions:
            raise local.LocalError("the model changed its input in place after the call")

    def grads(self, start: int, stop: int) -> dict[str, Tensor]:
        """Per-example gradients of examples ``start:stop``."""
        self.check_inputs()
        found = self._by_rule(lambda rule, layer, call: rule.grads(layer, call.narrow(start, stop)))
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
        unscaled."""
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

    def _scaled(self, delta: Tensor) -> Tensor:
        """``c_b·δ_b``: with per-example factors (clipping), each ``g_b`` comes out ``c_b·g_b``
        (``g_b`` is linear in ``δ_b``)."""
        if self.scale is None:
            return delta
        return delta * self.scale.to(delta.dtype).view(-1, *[1] * (delta.dim() - 1))


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

    def __call__(
        self,
        structure: Structure,
        inputs: batch.Inputs,
        target: Tensor,
        per_example: bool = False,
        clip: Clip | None = None,
    ) -> LayerwiseResult:
        """Per-example gradients of the covered parameters if ``per_example``, else their
        moments; with ``clip``, the moments of ``c_b·g_b`` for the factors ``c`` it returns."""
        params, hooked = structure.params, structure.hooked
        size = len(target)
        if structure is not self._probed:  # a changed model: its calls are seen afresh
            self._probe, self._probe_failed, self._probed = None, False, structure
        if self._probe is None and size > 1 and not self._probe_failed:
            self._run_probe(hooked, inputs)
        forward = _Forward(self, params, hooked, size, per_example, clip)
        try:
            losses, others = forward.run(inputs, target)
            return forward.result(losses, others)
        finally:
            forward.release()

    def _run_probe(self, hooked: list[Hooked], inputs: batch.Inputs) -> None:
        """Run one example; record, per call of each hooked module, which tensor inputs had
        1 on dim 0 (those that follow the batch size)."""
        probe: dict[int, list[frozenset]] = defaultdict(list)

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            ones = frozenset(k for k, x in _tensors(args, kwargs) if x.dim() and x.shape[0] == 1)
            probe[id(module)].append(ones)

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

    def batched_keys(self, module: nn.Module, call_index: int, args, kwargs, size: int):
        """The keys of the inputs that carry the batch, or ``None`` where that is unknown."""
        if size == 1:
            return frozenset(k for k, x in _tensors(args, kwargs) if x.dim() and x.shape[0] == 1)
        calls = (self._probe or {}).get(id(module), [])
        if call_index >= len(calls):
            return None
        follows = calls[call_index]
        return frozenset(
            k for k, x in _tensors(args, kwargs) if x.dim() and x.shape[0] == size and k in follows
        )


class _Forward:
    """One batched forward and backward pass with the hooks in place."""

    def __init__(self, owner: Layerwise, params, hooked, size: int, per_example, clip):
        self.owner = owner
        self.params = params
        self.hooked = hooked
        self.size = size
        self.per_example = per_example
        self.clip: Clip | None = clip
        self.records: list[_Record] = []
        self.calls: dict[int, int] = defaultdict(int)
        self.anchors: dict[tuple, Tensor] = {}  # by dtype and device
        self.single_use: set[int] = set()  # records whose parameters have no other use
        self.tracker = provenance.Provenance()  # which example each value comes from
        self.uses = Uses(params, size, self.tracker, self._op_use)  # uses outside layers
        self.untraced: str | None = None  # why no record's rows can be attributed
        self.entered: list[tuple[nn.Module, bool]] = []  # running calls: parameters detached?
        self.recursive: set[int] = set()  # modules called inside a call of themselves

    def run(self, inputs: batch.Inputs, target: Tensor) -> tuple[Tensor, dict]:
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
            if not self.owner.loss_checked:
                checks.separable(self.owner.loss_fn, output, target, losses)
                self.owner.loss_checked = self.size > 1
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
        return losses.detach(), dict(zip(self.params, grads))

    def _forward(self, inputs: batch.Inputs, target: Tensor) -> tuple[Tensor, object]:
        """The model and the loss under :attr:`tracker`, each input's row ``b`` example ``b``."""
        given = [x for x in (*batch.tensors(inputs), target) if x.dim() and len(x) == self.size]
        for x in given:
            self.tracker.set(x, provenance.batch(x.dim(), self.size))
        with self.tracker:
            with self.uses:
                output = batch.run(self.owner.model, inputs)
            losses = checks.per_example_loss(self.owner.loss_fn(output, target), self.size)
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
        tracker = self.tracker
        if tracker.mixing and not tracker.unknown:
            raise checks.InputError(
                f"the model or loss_fn combines examples: "
                f"{', '.join(dict.fromkeys(tracker.mixing)) or 'an operation'} runs across "
                f"the batch, so one example's loss depends on other examples' inputs and has "
                f"no gradient of its own. Compute each example's loss from that example alone "
                f"(a statistic over the batch, as BatchNorm in training mode takes, cannot be "
                f"given per example)."
            )
        through = ", ".join(dict.fromkeys(tracker.unknown[:3])) or "the model's operations"
        self.untraced = (
            f"pergrad cannot follow which example each value comes from through {through}"
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
        tags = (self.tracker.tag(x) for _, x in _tensors(args, kwargs))
        if not all(map(provenance.unmarked, tags)):
            return False
        index = self.calls[id(module)]
        return self.owner.batched_keys(module, index, args, kwargs, self.size) == frozenset()

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
        if not floating:
            record.problem = record.problem or "it returns no floating-point tensor"
            return None
        with tracker.paused():
            record.outputs = [leaves[i].detach() for i in floating]
        record.versions = [leaves[i]._version for i in floating]
        record.deltas = [None] * len(floating)
        self._trace(record, [leaves[i] for i in floating], args, kwargs)
        if record.moved is None and record.batched:
            self._attribute([leaves[i] for i in floating])
        if not record.batched and record.problem is None:
            record.problem = "none of its inputs holds an example's data"
        # the pre-hook of the anchor's own node sees δ as autograd sends it into the
        # layer: after any hook the model puts on the output
        for slot, i in enumerate(floating):
            leaves[i].grad_fn.register_prehook(self._grad_hook(record, slot))
        first = record.outputs[0]
        in_order = first.dim() and first.shape[0] == self.size
        if record.problem is None and not in_order and record.moved is None:
            record.problem = "its output does not carry the batch on dim 0"
        return _rebuild(leaves, spec)

    def _op_use(self, op: OpUse, tensors: tuple, output):
        """A use of parameters outside their layers (:mod:`pergrad.uses`), recorded as a call
        of a layer without a rule; returns the output the model receives."""
        names = {local: name for name, local in op.names.items()}
        with torch._C.DisableTorchFunction():
            found = self._on_call(Hooked(op, None, names, None), op, tensors, {}, output)
        return output if found is None else found

    def _trace(self, record: _Record, outputs: list[Tensor], args: tuple, kwargs: dict) -> None:
        """Where the output's rows are not the batch in order (flattened, routed or reordered
        inside the model), mark the record :attr:`_Record.moved`, take the inputs that carry
        examples from their tags, not from the one-example pass, and keep those tags."""
        tag = self.tracker.tag(outputs[0])
        shape = tuple(outputs[0].shape)
        if provenance.in_order(tag, shape, self.size) and self._inputs_in_order(record):
            return
        record.moved = tag
        record.output_tags = [self.tracker.tag(o) for o in outputs]
        for key, x in _tensors(args, kwargs):
            if not provenance.unmarked(found := self.tracker.tag(x)):
                record.input_tags[key] = found
        record.batched = frozenset(record.input_tags)
        if record.problem == _UNSEEN:
            record.problem = None

    def _attribute(self, outputs: list[Tensor]) -> None:
        """A call with batched inputs gives row ``b`` of its outputs' ``δ`` to example ``b``,
        which is right only if every later use keeps the whole row example ``b``'s. Rows
        whose elements come from no example, in part (a ``cls`` token written before the
        tokens) or whole (a learned query expanded to the batch, which the one-example pass
        finds following the batch size), are tagged example ``b``'s from here on, so the
        losses' check sees any use that moves them to another example."""
        tracker = self.tracker
        for x in outputs:
            tag, shape = tracker.tag(x), tuple(x.shape)
            if isinstance(tag, provenance.Axis) or not shape or shape[0] != self.size:
                continue
            with tracker.paused():
                if provenance.in_order(tag, shape, self.size):  # unmarked ones too
                    tracker.set(x, provenance.batch(len(shape), self.size))

    def _inputs_in_order(self, record: _Record) -> bool:
        """Whether every batched input of an operation's use holds the batch in order on dim
        0 (a layer's are known from the one-example pass)."""
        if not isinstance(record.hooked.module, OpUse):
            return True
        return all(
            provenance.in_order(self.tracker.tag(x), tuple(x.shape), self.size)
            for key, x in _tensors(record.args, record.kwargs)
            if key in record.batched
        )

    def _anchor(self, output: Tensor) -> Tensor:
        """The pass's zero anchor in ``output``'s dtype and device (one for all outputs)."""
        key = (output.dtype, output.device)
        if key not in self.anchors:
            self.anchors[key] = output.new_zeros((), requires_grad=True)
        return self.anchors[key]

    def release(self) -> None:
        """Drop every tensor the pass kept. The hooks left on its tensors hold the records, and
        the records the inputs whose autograd graph holds those hooks: a cycle through C++ that
        Python's garbage collector cannot see, which would keep every model alive."""
        for record in self.records:
            record.args, record.kwargs, record.outputs, record.deltas = (), {}, [], []
            record.values = None
        self.records, self.anchors = [], {}

    def _record(self, hooked: Hooked, module: nn.Module, args: tuple, kwargs: dict) -> _Record:
        index = self.calls[id(module)]
        self.calls[id(module)] += 1
        if isinstance(module, OpUse):  # not in the one-example pass: the tags tell
            batched = frozenset(
                key
                for key, x in _tensors(args, kwargs)
                if not provenance.unmarked(self.tracker.tag(x))
            )
        else:
            batched = self.owner.batched_keys(module, index, args, kwargs, self.size)
        record = _Record(hooked, args, kwargs, batched or frozenset(), self.size)
        record.input_versions = [x._version for _, x in _tensors(args, kwargs)]
        self.records.append(record)
        if batched is None:
            record.problem = _UNSEEN
        elif torch.nn.modules.module._global_forward_hooks:
            record.problem = "a global forward hook may change its output"
        return record

    def _grad_hook(self, record: _Record, slot: int):
        def hook(grads: tuple[Tensor | None]) -> None:
            if grads[0] is None:  # no gradient reached the output after all
                return
            record.deltas[slot] = grads[0]
            eager = self.clip is None and len(record.deltas) == 1 and record.problem is None
            eager = eager and (record.moved is None or record._use_rule)  # no autograd in here
            if eager and id(record) in self.single_use:
                try:
                    record.values = record.compute(self.per_example)
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

    def result(self, losses: Tensor, others: dict[str, Tensor | None]) -> LayerwiseResult:
        result = LayerwiseResult({}, losses)
        uses: dict[str, list[tuple[_Record, str]]] = defaultdict(list)
        for record in self.records:
            record.check_outputs()
            if id(record.hooked.module) in self.recursive:
                record.problem = "it calls itself"
            for local_name, name in record.hooked.params.items():
                uses[name].append((record, local_name))
        owners = {name: h for h in self.hooked for name in h.params.values()}
        single: dict[str, tuple[_Record, str]] = {}
        several: dict[str, list[tuple[_Record, str]]] = {}
        for name, p in self.params.items():
            found = uses.get(name, [])
            reason = self.untraced or self._problem(name, found, others[name], owners.get(name))
            reason = reason or self.uses.unseen.get(name)
            if reason is not None:
                result.uncovered[name] = reason
            elif not found:  # never used: every g_b is zero
                result.values[name] = (
                    p.new_zeros(self.size, *p.shape)
                    if self.per_example
                    else (torch.zeros_like(p), torch.zeros_like(p))
                )
                result.sources[name] = "unused"
            elif len(found) == 1:
                single[name] = found[0]
            else:
                several[name] = found
        if self.clip is not None:
            self._scale(single, several, result)
        for name, (record, local_name) in single.items():
            try:
                if record.values is None:
                    record.values = record.compute(self.per_example)
                result.values[name] = record.values[local_name]
                result.sources[name] = record.source
            except local.LocalError as error:
                result.uncovered[name] = f"{record.label}: {error}"
        self._combine(several, result)
        self._announce_failed_rules(result)
        return result

    def _announce_failed_rules(self, result: LayerwiseResult) -> None:
        """Say, once per layer type and kind of error (its message may name sizes that change
        from batch to batch), where a rule failed and the layer-local path (slower) took
        over."""
        for record in self.records:
            failed = record.rule_problem or ""
            key = (record.hooked.kind, failed.split(":")[1] if ":" in failed else failed)
            covered = any(n in result.sources for n in record.hooked.params.values())
            if failed.startswith("its rule failed") and covered and key not in self.owner.warned:
                self.owner.warned.add(key)
                warn(
                    f"pergrad: the {record.hooked.kind} rule failed on a call "
                    f"({failed.removeprefix('its rule failed: ')}); torch.func over the layer "
                    f"alone (slower) computed it instead."
                )

    def _problem(self, name, found, other: Tensor | None, owner: Hooked | None) -> str | None:
        if other is not None:
            if owner is None:
                return "no layer owns it and takes it as a parameter"
            return f"used outside the {owner.kind} layer that owns it"
        for record, _ in found:
            if record.problem is not None:
                return f"{record.hooked.label}: {record.problem}"
        return None

    def _scale(self, single, several, result: LayerwiseResult) -> None:
        """Clipping: ``Σ |g_b|²`` over the covered parameters (closed forms where the rules
        have them), the factors ``c`` that :attr:`clip` returns for it, and ``δ_b`` of every
        record scaled by ``c_b`` from now on. A parameter the local path cannot give moves to
        ``result.uncovered`` first, so that ``clip`` sees every parameter it must add."""
        total = torch.zeros(self.size, dtype=torch.float64, device=result.losses.device)
        norms: dict[int, dict[str, Tensor]] = {}
        for name, (record, local_name) in list(single.items()):
            try:
                if id(record) not in norms:
                    norms[id(record)] = record.sq_norms()
            except local.LocalError as error:
                result.uncovered[name] = f"{record.label}: {error}"
                del single[name]
                continue
            total += norms[id(record)][local_name].double()
        try:
            for start, stop, sums in self._summed_uses(several) if several else ():
                total[start:stop] += sq_norms(sums)
        except local.LocalError as error:
            for name in list(several):
                result.uncovered[name] = f"one of its uses: {error}"
                del several[name]
        scale = self.clip(total, dict(result.uncovered))
        for record in self.records:
            record.scale = scale

    def _summed_uses(self, several: dict[str, list[tuple[_Record, str]]]):
        """``(start, stop, {name: Σ_uses g_b})`` for a few examples at a time, for parameters
        with several uses."""
        records = {id(r): r for found in several.values() for r, _ in found}
        numel = sum(r.hooked.numel for r in records.values())
        for start, stop in chunks(self.size, numel, REDUCE_ELEMENTS):
            grads = {key: r.grads(start, stop) for key, r in records.items()}
            sums = {
                name: functools.reduce(torch.add, (grads[id(r)][n] for r, n in found))
                for name, found in several.items()
            }  # a sum of two or more: a fresh tensor
            yield start, stop, sums

    def _combine(self, several: dict[str, list[tuple[_Record, str]]], result) -> None:
        """Parameters with several uses: the per-example sum over uses, then its moments, a few
        examples at a time."""
        if not several:
            return
        try:
            for _, _, sums in self._summed_uses(several):
                for name, g in sums.items():
                    if self.per_example:
                        result.values.setdefault(name, []).append(g)
                    else:
                        moments = fresh_moments(g)
                        result.values[name] = add_moments(result.values.get(name), moments)
        except local.LocalError as error:
            for name in several:
                result.values.pop(name, None)
                result.uncovered[name] = f"one of its uses: {error}"
            return
        for name, found in several.items():
            if self.per_example:
                result.values[name] = torch.cat(result.values[name])
            result.sources[name] = "+".join(sorted({r.source for r, _ in found}))


_UNSEEN = "the one-example forward pass did not see this call"


def _rebuild(leaves: list, spec) -> object:
    """The output from its leaves: itself where it was one tensor (``spec`` ``None``)."""
    return leaves[0] if spec is None else pytree.tree_unflatten(leaves, spec)


def _recording() -> bool:
    """Whether a module call is part of the batched forward pass: not a recomputation during
    the backward pass (activation checkpointing) nor a call without gradients."""
    return torch.is_grad_enabled() and torch._C._current_graph_task_id() == -1


def _tensors(args: tuple, kwargs: dict):
    """``(key, tensor)`` for the tensors among the positional and keyword inputs."""
    yield from ((i, x) for i, x in enumerate(args) if isinstance(x, Tensor))
    yield from ((k, x) for k, x in kwargs.items() if isinstance(x, Tensor))


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
