"""Statistics layer by layer, at about the cost of one backward pass.

One batched forward and backward of ``Σ_b ℓ_b`` gives ``Σ_b g_b`` for every parameter, as
autograd computes it. For the layers that :mod:`pergrad.rules` knows, a forward hook keeps the
layer's inputs and a hook on its output receives ``δ``, from which the rule forms ``Σ_b g_b²``
during the backward pass. A parameter is covered only where that is provably its whole
gradient:

- its layer has a rule for its configuration and ran exactly once;
- the layer's inputs carry the batch on dim 0: their dim 0 is ``B``, and on the first call a
  forward pass of one example shows that it follows the batch size (so a sequence-first
  layer whose length happens to equal ``B`` is not mistaken for a batch-first one);
- the parameter is used nowhere else: during the forward pass the layer sees an alias of it,
  and the alias's gradient must be the parameter's whole gradient (tied weights, or a weight
  a parent also uses directly, fail this).

Everything else is reported with the reason, for another mode to compute.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from pergrad import checks, rules


@dataclass
class LayerwiseSums:
    """``Σ_b g_b`` of every parameter, ``Σ_b g_b²`` of the covered ones, and the losses."""

    grad_sums: dict[str, Tensor]
    sq_sums: dict[str, Tensor]
    losses: Tensor
    layers: dict[str, str] = field(default_factory=dict)
    """The layer type whose rule gave each covered parameter's ``Σ_b g_b²``."""
    uncovered: dict[str, str] = field(default_factory=dict)
    """Why each other parameter is not covered."""


@dataclass
class _Layer:
    """A layer with a rule, the trainable parameters it owns, and what one forward pass saw."""

    module: nn.Module
    rule: rules.Rule
    params: dict[str, str]  # name relative to the layer -> name in the model
    calls: int = 0
    batched: bool = True
    sq_sums: dict[str, Tensor] | None = None


class Layerwise:
    """Computes :class:`LayerwiseSums` for ``loss_fn(model(*inputs), target)``."""

    def __init__(self, model: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor]):
        self.model = model
        self.loss_fn = loss_fn
        self._unbatched: set[nn.Module] | None = None  # found by the one-example probe

    def __call__(
        self, params: dict[str, nn.Parameter], inputs: tuple[Tensor, ...], target: Tensor
    ) -> LayerwiseSums:
        layers = self._layers(params)
        size = len(target)
        if self._unbatched is None and size > 1:
            self._unbatched = self._probe(layers, inputs)
        aliases: dict[str, list[Tensor]] = defaultdict(list)
        handles = []
        for layer in layers:
            handles.append(
                layer.module.register_forward_pre_hook(self._alias_hook(layer, params, aliases))
            )
            handles.append(
                layer.module.register_forward_hook(
                    self._record_hook(layer, params, size), with_kwargs=True
                )
            )
        try:
            output = self.model(*inputs)
            losses = checks.per_example_loss(self.loss_fn(output, target), size)
            alias_list = [(name, a) for name, group in aliases.items() for a in group]
            grads = torch.autograd.grad(
                losses.sum(),
                [*params.values(), *(a for _, a in alias_list)],
                allow_unused=True,
            )
        finally:
            for handle in handles:
                handle.remove()
            for layer in layers:
                _set_params(layer, params)
        totals = dict(zip(params, grads[: len(params)]))
        alias_grads = defaultdict(list)
        for (name, _), g in zip(alias_list, grads[len(params) :]):
            alias_grads[name].append(g)
        return self._collect(params, layers, totals, alias_grads, losses.detach(), self.model)

    def _layers(self, params: dict[str, nn.Parameter]) -> list[_Layer]:
        trainable = {id(p): name for name, p in params.items()}
        layers = []
        for module in self.model.modules():
            rule = rules.covers(module)
            owned = {
                local: trainable[id(p)]
                for local, p in module.named_parameters(remove_duplicate=False)
                if id(p) in trainable
            }
            if rule is not None and owned:
                layers.append(_Layer(module, rule, owned))
        return layers

    def _alias_hook(self, layer: _Layer, params: dict[str, nn.Parameter], aliases):
        """Before the layer runs, give it a fresh alias of each of its trainable parameters."""

        def hook(module: nn.Module, args: tuple) -> None:
            fresh = {name: params[name].view_as(params[name]) for name in layer.params.values()}
            for name, alias in fresh.items():
                aliases[name].append(alias)
            _set_params(layer, fresh)

        return hook

    def _record_hook(self, layer: _Layer, params: dict[str, nn.Parameter], size: int):
        """After the layer runs, put its parameters back and hook its output's gradient."""

        def hook(module: nn.Module, args: tuple, kwargs: dict, output) -> None:
            _set_params(layer, params)
            layer.calls += 1
            unbatched = self._unbatched or set()
            layer.batched &= _batch_first(args, kwargs, size) and module not in unbatched
            out = output[0] if isinstance(output, tuple) else output
            if layer.calls == 1 and isinstance(out, Tensor) and out.requires_grad:

                def on_grad(delta: Tensor) -> None:
                    if layer.calls == 1 and layer.batched:
                        with torch.no_grad():
                            layer.sq_sums = layer.rule(module, args, kwargs, delta)

                out.register_hook(on_grad)

        return hook

    def _probe(self, layers: list[_Layer], inputs: tuple[Tensor, ...]) -> set[nn.Module]:
        """Run one example and return the layers whose input's dim 0 did not become 1."""
        unbatched: set[nn.Module] = set()

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if not _batch_first(args, kwargs, 1):
                unbatched.add(module)

        handles = [
            layer.module.register_forward_pre_hook(hook, with_kwargs=True) for layer in layers
        ]
        devices = [x.device for x in inputs if x.device.type == "cuda"]
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=devices):
                self.model(*(x[:1] for x in inputs))
        except Exception:  # the model cannot run one example: trust no layer
            return {layer.module for layer in layers}
        finally:
            for handle in handles:
                handle.remove()
        return unbatched

    @staticmethod
    def _collect(params, layers, totals, alias_grads, losses, model) -> LayerwiseSums:
        result = LayerwiseSums({}, {}, losses)
        for name, p in params.items():
            total = totals[name]
            result.grad_sums[name] = torch.zeros_like(p) if total is None else total
            if total is None:  # unused: every example's gradient is zero
                result.sq_sums[name] = torch.zeros_like(p)
                result.layers[name] = "unused"
        owners = defaultdict(list)
        for layer in layers:
            for name in layer.params.values():
                owners[name].append(layer)
        for name, total in totals.items():
            if total is None:
                continue
            found = owners.get(name)
            kind = type(found[0].module).__name__ if found else None
            if not found:
                owner = type(model.get_submodule(name.rpartition(".")[0])).__name__
                result.uncovered[name] = f"no per-layer rule for {owner}"
            elif len(found) > 1:
                result.uncovered[name] = "shared by several layers (tied weights)"
            elif found[0].calls > 1:
                result.uncovered[name] = f"its {kind} layer runs more than once per forward pass"
            elif not found[0].batched:
                result.uncovered[name] = (
                    f"its {kind} layer's input does not carry the batch on dim 0"
                )
            elif not _whole(total, alias_grads[name]):
                result.uncovered[name] = "used outside its layer as well"
            elif found[0].sq_sums is None:
                result.uncovered[name] = f"its {kind} layer's output gradient was not seen"
            else:
                local = next(k for k, v in found[0].params.items() if v == name)
                result.sq_sums[name] = found[0].sq_sums[local]
                result.layers[name] = kind
        return result


_BATCHED_KEYWORDS = ("input", "query", "key", "value")


def _batch_first(args: tuple, kwargs: dict, size: int) -> bool:
    """Whether every positional tensor argument, and every keyword one in
    :data:`_BATCHED_KEYWORDS`, has ``size`` on dim 0."""
    given = [*args, *(kwargs.get(key) for key in _BATCHED_KEYWORDS)]
    return all(x.dim() > 0 and x.shape[0] == size for x in given if isinstance(x, Tensor))


def _set_params(layer: _Layer, tensors: dict[str, Tensor]) -> None:
    """Make the layer's parameters (by model name) the given tensors."""
    for local, name in layer.params.items():
        owner_name, _, leaf = local.rpartition(".")
        layer.module.get_submodule(owner_name)._parameters[leaf] = tensors[name]


def _whole(total: Tensor, alias_grads: list[Tensor | None]) -> bool:
    """Whether the layer's alias received the parameter's whole gradient."""
    if len(alias_grads) != 1 or alias_grads[0] is None:
        return False
    (part,) = alias_grads
    same_memory = part.data_ptr() == total.data_ptr() and part.stride() == total.stride()
    return same_memory or torch.equal(part, total)
