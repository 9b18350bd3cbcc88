"""Statistics layer by layer, at about the cost of one backward pass.

One batched forward and backward pass of ``Σ_b ℓ_b``. Each layer that :mod:`pergrad.rules`
knows runs on detached views of its parameters (no copy of the data), so autograd does not
form their batch gradients; a forward hook keeps the layer's inputs, and a hook on its output
receives ``δ``, from which the rule forms, during the backward pass, either ``Σ_b g_b`` and
``Σ_b g_b²`` or the per-example gradients themselves. A parameter is covered only where that
is provably its whole gradient:

- its layer has a rule for its configuration and ran exactly once;
- the layer's inputs carry the batch on dim 0: their dim 0 is ``B``, and on the first call a
  forward pass of one example shows that it follows the batch size (so a sequence-first
  layer whose length happens to equal ``B`` is not mistaken for a batch-first one). That
  probe runs without gradients and with the random state restored, but a model whose forward
  pass changes its own state (a call counter, say) sees one call more;
- the parameter is used nowhere else: autograd, asked for its gradient, finds no other use
  (tied weights, or a weight that a parent also uses directly, fail this).

Every other parameter is reported with the reason, for a per-example mode to compute.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from pergrad import checks, rules


@dataclass
class LayerwiseResult:
    """For each covered parameter, its per-example gradients ``(B, *shape)`` or their moments
    ``(Σ_b g_b, Σ_b g_b²)``; and the per-example losses."""

    values: dict[str, Tensor | rules.Moments]
    losses: Tensor
    layers: dict[str, str] = field(default_factory=dict)
    """The layer type whose rule gave each covered parameter's values (``"unused"``: zero)."""
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
    values: dict[str, Tensor | rules.Moments] | None = None


class Layerwise:
    """Computes a :class:`LayerwiseResult` for ``loss_fn(model(*inputs), target)``."""

    def __init__(self, model: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor]):
        self.model = model
        self.loss_fn = loss_fn
        self._unbatched: set[nn.Module] | None = None  # found by the one-example probe

    def __call__(
        self,
        params: dict[str, nn.Parameter],
        inputs: tuple[Tensor, ...],
        target: Tensor,
        per_example: bool = False,
    ) -> LayerwiseResult:
        """Per-example gradients of the covered parameters if ``per_example``, else their
        moments."""
        layers = self._layers(params)
        size = len(target)
        if self._unbatched is None and size > 1:
            self._unbatched = self._probe(layers, inputs)
        anchors: list[Tensor] = []
        handles = []
        for layer in layers:
            detached = {name: params[name].detach() for name in layer.params.values()}
            handles.append(
                layer.module.register_forward_pre_hook(
                    lambda *_, layer=layer, detached=detached: _set(layer, detached)
                )
            )
            handles.append(
                layer.module.register_forward_hook(
                    self._record_hook(layer, params, size, anchors, per_example),
                    with_kwargs=True,
                )
            )
        try:
            output = self.model(*inputs)
            losses = checks.per_example_loss(self.loss_fn(output, target), size)
            grads = torch.autograd.grad(
                losses.sum(), [*params.values(), *anchors], allow_unused=True
            )
        finally:
            for handle in handles:
                handle.remove()
            for layer in layers:
                _set(layer, params)
        others = dict(zip(params, grads))
        return _collect(self.model, params, layers, others, losses.detach(), per_example)

    def _layers(self, params: dict[str, nn.Parameter]) -> list[_Layer]:
        trainable = {id(p): name for name, p in params.items()}
        layers = []
        for module in self.model.modules():
            rule = rules.rule_for(module)
            if rule is None:
                continue
            owned = {
                local: trainable[id(p)]
                for local, p in module.named_parameters(remove_duplicate=False)
                if id(p) in trainable
            }
            if owned:
                layers.append(_Layer(module, rule, owned))
        return layers

    def _record_hook(
        self, layer: _Layer, params, size: int, anchors: list[Tensor], per_example: bool
    ):
        """After the layer runs: put its parameters back, and make its output's gradient flow
        to a scalar ``anchor`` that autograd is asked for, with a hook that applies the rule."""

        def hook(module: nn.Module, args: tuple, kwargs: dict, output):
            _set(layer, params)
            layer.calls += 1
            unbatched = self._unbatched or set()
            layer.batched &= _batch_first(args, kwargs, size) and module not in unbatched
            out = output[0] if isinstance(output, tuple) else output
            anchor = torch.zeros((), dtype=out.dtype, device=out.device, requires_grad=True)
            anchors.append(anchor)
            out = out + anchor  # δ reaches the output even where nothing before needs it

            def on_grad(delta: Tensor) -> None:
                if layer.calls == 1 and layer.batched:
                    with torch.no_grad():
                        layer.values = layer.rule(module, args, kwargs, delta, per_example)

            out.register_hook(on_grad)
            return (out, *output[1:]) if isinstance(output, tuple) else out

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


def _collect(
    model: nn.Module,
    params: dict[str, nn.Parameter],
    layers: list[_Layer],
    others: dict[str, Tensor | None],
    losses: Tensor,
    per_example: bool,
) -> LayerwiseResult:
    """Sort parameters into covered and uncovered. ``others[name]`` is the gradient autograd
    found outside the rule layers (``None``: no other use)."""
    result = LayerwiseResult({}, losses)
    owners = defaultdict(list)
    for layer in layers:
        for name in layer.params.values():
            owners[name].append(layer)
    for name, p in params.items():
        found = owners.get(name, [])
        layer = found[0] if found else None
        kind = type(layer.module).__name__ if layer else ""
        reason = None
        if layer is None:
            owner = type(model.get_submodule(name.rpartition(".")[0])).__name__
            reason = None if others[name] is None else f"no per-layer rule for {owner}"
        elif len(found) > 1:
            reason = "shared by several layers (tied weights)"
        elif others[name] is not None:
            reason = "used outside its layer as well"
        elif layer.calls > 1:
            reason = f"its {kind} layer runs more than once per forward pass"
        elif layer.calls == 1 and not layer.batched:
            reason = f"its {kind} layer's input does not carry the batch on dim 0"
        if reason is not None:
            result.uncovered[name] = reason
        elif layer is None or layer.values is None:
            # never used, or its layer's output never reached the loss: every g_b is zero
            if per_example:
                result.values[name] = p.new_zeros(len(losses), *p.shape)
            else:
                result.values[name] = (torch.zeros_like(p), torch.zeros_like(p))
            result.layers[name] = "unused"
        else:
            local = next(k for k, v in layer.params.items() if v == name)
            result.values[name] = layer.values[local]
            result.layers[name] = kind
    return result


_BATCHED_KEYWORDS = ("input", "query", "key", "value")


def _batch_first(args: tuple, kwargs: dict, size: int) -> bool:
    """Whether every positional tensor argument, and every keyword one in
    :data:`_BATCHED_KEYWORDS`, has ``size`` on dim 0."""
    given = [*args, *(kwargs.get(key) for key in _BATCHED_KEYWORDS)]
    return all(x.dim() > 0 and x.shape[0] == size for x in given if isinstance(x, Tensor))


def _set(layer: _Layer, tensors: dict[str, Tensor]) -> None:
    """Make the layer's parameters (by model name) the given tensors."""
    for local, name in layer.params.items():
        owner_name, _, leaf = local.rpartition(".")
        layer.module.get_submodule(owner_name)._parameters[leaf] = tensors[name]
