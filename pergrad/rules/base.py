"""What every per-layer rule shares: the call it reads, the registry, and closed-form helpers.

A rule turns one call of a layer on a batch, its inputs ``a`` and the gradient ``δ`` of
``Σ_b ℓ_b`` with respect to its output (both with the batch on dim 0), into the per-example
gradients ``g_b`` of the layer's parameters. It may also give their moments
``(Σ_b g_b, Σ_b g_b²)``, and each example's squared norm ``|g_b|²``, in closed forms that never
form all ``B`` gradients at once. ``g_b`` is linear in ``δ_b`` (a vector-Jacobian product), so
scaling ``δ_b`` by ``c_b`` scales ``g_b`` by ``c_b``: that is how per-example clipping reuses
the moments' closed forms.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor, nn

from pergrad.reduce import Moments


@dataclass
class Call:
    """One call of a layer on a batch of ``B`` examples.

    Attributes:
        args, kwargs: the inputs as the layer's ``forward`` received them; those in
            ``batched`` have the batch on dim 0 (inputs shared by the batch with 1 there are
            expanded to it); for a rule registered with ``own_layout``, they are as the layer
            received them.
        output_grad: ``δ``, the gradient of ``Σ_b ℓ_b`` with respect to the layer's (first)
            output, batch on dim 0 (``own_layout``: as the layer returned it).
        batched: the positions and keyword names of the inputs that carry the batch on
            dim 0 (a tuple of tensors among them, such as an LSTM cell's ``(h, c)``, each of
            its tensors): what :meth:`narrow` cuts.
        output_grads: ``own_layout`` or ``all_outputs``: ``δ`` of every floating-point tensor
            the layer returned, in the order ``torch.utils._pytree`` flattens its output,
            zeros where none arrived (``all_outputs``: each batched on dim 0 like the first).
        examples: ``own_layout``: ``examples(x, dim)``, for a tensor among the inputs, the
            example of each index along ``dim`` (``-1``: an index that holds no example's
            data); it raises where an index holds several.
        size: ``own_layout``: the number of examples ``B``.
        outputs: ``own_layout`` or ``all_outputs``: every floating-point tensor the layer
            returned, as ``output_grads`` lists their ``δ``.
        groups: the inputs (positions, keyword names) that hold several rows per example on
            dim 0, each example's together (an attention mask ``(B·heads, L, S)``), with
            their rows per example.
        precision: the dtype autocast ran the layer in, or ``None``: compare a rule's
            recomputation with the layer's outputs to its rounding
            (``pergrad.checks.agree(actual, expected, call.precision)``).
        regrouped: whether the rows reach the rule regrouped by example, batch first,
            where the model moved them (else as the layer received them: a sequence-first
            layer's ``(T, B, …)`` where ``B = 1`` and ``T = 1`` leave nothing to move).
    """

    args: tuple
    kwargs: dict
    output_grad: Tensor
    batched: frozenset[int | str] = field(default_factory=frozenset)
    output_grads: tuple[Tensor, ...] = ()
    examples: Callable[[Tensor, int], Tensor] | None = None
    size: int | None = None
    outputs: tuple[Tensor, ...] = ()
    groups: dict = field(default_factory=dict)
    precision: torch.dtype | None = None
    regrouped: bool = False

    @property
    def input(self) -> Tensor:
        """The first input: ``args[0]``, or the keyword ``input``."""
        return self.args[0] if self.args else self.kwargs["input"]

    @property
    def batch_size(self) -> int:
        return self.size if self.size is not None else len(self.output_grad)

    def narrow(self, start: int, stop: int) -> Call:
        """The same call restricted to examples ``start:stop``."""

        def rows(x, k: int = 1):  # an input, or the tensors in one (an LSTM cell's (h, c))
            if isinstance(x, (tuple, list)):
                return type(x)(rows(y) for y in x)
            return x[start * k : stop * k] if isinstance(x, Tensor) else x

        kwargs = {
            key: rows(x, self.groups.get(key, 1)) if key in self.batched else x
            for key, x in self.kwargs.items()
        }
        args = tuple(
            rows(x, self.groups.get(i, 1)) if i in self.batched else x
            for i, x in enumerate(self.args)
        )
        return replace(
            self,
            args=args,
            kwargs=kwargs,
            output_grad=self.output_grad[start:stop],
            output_grads=tuple(map(rows, self.output_grads)),
            outputs=tuple(map(rows, self.outputs)),
        )


GradsFn = Callable[[nn.Module, Call], "dict[str, Tensor]"]
"""``grads(layer, call) -> {name: (B, *param.shape)}``, names relative to the layer."""

MomentsFn = Callable[[nn.Module, Call], "dict[str, Moments] | None"]
"""``moments(layer, call) -> {name: (Σ_b g_b, Σ_b g_b²)}``, or ``None`` where forming the
per-example gradients in chunks is cheaper for this call."""

NormsFn = Callable[[nn.Module, Call], "dict[str, Tensor] | None"]
"""``norms(layer, call) -> {name: |g_b|² of shape (B,)}``, or ``None`` where forming the
per-example gradients in chunks is cheaper for this call."""

SupportsFn = Callable[[nn.Module], "str | None"]
"""``supports(layer) -> None`` if the rule applies to the layer as configured, else why not."""

FeaturesFn = Callable[[nn.Module], int]
"""``features(layer) -> k``: the layer treats every dimension of its output but the last ``k``
as positions, each computed from the same position of its inputs alone (a ``Linear``: 1), so a
call's positions may be regrouped into ``(B, positions, …)`` however the model ordered them."""


@dataclass(frozen=True)
class Rule:
    """The per-layer rule of one layer type; see :func:`register_rule`."""

    grads: GradsFn
    moments: MomentsFn | None = None
    supports: SupportsFn | None = None
    norms: NormsFn | None = None
    features: FeaturesFn | None = None
    own_layout: bool = False
    all_outputs: bool = False


RULES: dict[type[nn.Module] | str, Rule] = {}
"""The rule of each layer type, by the type or by its qualified name (``"package.module.Class"``,
for a type whose package pergrad does not import); exact type: a subclass may compute
something else."""


def register_rule(
    layer_type: type[nn.Module] | str,
    *,
    moments: MomentsFn | None = None,
    supports: SupportsFn | None = None,
    norms: NormsFn | None = None,
    features: FeaturesFn | None = None,
    own_layout: bool = False,
    all_outputs: bool = False,
) -> Callable[[GradsFn], GradsFn]:
    """Register the decorated ``grads(layer, call)`` as the rule of ``layer_type``.

    ``grads`` returns, for every parameter the layer owns (names as in
    ``layer.named_parameters()``), its per-example gradients ``(B, *shape)`` from
    ``call.args`` / ``call.kwargs`` (the layer's inputs) and ``call.output_grad`` (``δ``).
    ``moments``, optional, gives ``(Σ_b g_b, Σ_b g_b²)`` directly (a closed form such as
    ``(δ²)ᵀ(a²)``), or ``None`` for a call where it has none; ``norms``, optional, gives each
    example's ``|g_b|²`` (``|δ_b|²·|a_b|²``), which per-example clipping
    (``max_example_norm``) needs, or ``None`` likewise; ``supports`` says why a layer's
    configuration is outside the rule (``None``: inside); ``features``, optional, says how many
    trailing dimensions of the layer's output are features where every other dimension is a
    position the layer computes alone (``Linear``: 1): then a call whose rows the model moved
    between examples (flattened tokens, tokens routed to an expert) is regrouped by example
    for the rule; ``own_layout`` says the layer holds examples in a layout of its own
    (a recurrent layer's ``(T, B, …)`` sequences, packed sequences, ``(layers, B, H)`` states):
    the rule then reads the call as the layer received it, with the ``δ`` of every output and
    the example of each index of an input (:class:`Call`), and returns all ``B`` examples'
    gradients at once; ``all_outputs`` says the rule reads the ``δ`` of every output the layer
    returns (a recurrent cell's ``h`` and ``c``), not only of the first, each batched on dim 0
    (``call.output_grads``, ``call.outputs``). A rule covers exactly its type, not subclasses.
    ``layer_type`` may also be the type's qualified name, ``"package.module.Class"``, so that
    registering does not import the package. Check a new rule with
    :func:`pergrad.testing.check_rule`.

    Raises:
        TypeError: ``layer_type`` is neither an ``nn.Module`` subclass nor a qualified name,
            or ``moments``, ``supports``, ``norms`` or ``features`` is not a function.
        ValueError: ``layer_type`` already has a rule.

    Example:
        >>> @pergrad.register_rule(Scale)
        ... def scale(layer, call):  # Scale: y = x * layer.weight
        ...     return {"weight": (call.output_grad * call.input).flatten(1, -2).sum(1)}
    """
    named = isinstance(layer_type, str) and "." in layer_type
    if not (named or isinstance(layer_type, type) and issubclass(layer_type, nn.Module)):
        raise TypeError(
            f"layer_type must be an nn.Module subclass or a qualified name "
            f"'package.module.Class', got {layer_type!r}"
        )
    for name, fn in (
        ("moments", moments),
        ("supports", supports),
        ("norms", norms),
        ("features", features),
    ):
        if fn is not None and not callable(fn):
            raise TypeError(f"{name} must be a function or None, got {type(fn).__name__}")
    for name, flag in (("own_layout", own_layout), ("all_outputs", all_outputs)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be True or False, got {flag!r}")
    if layer_type in RULES:
        name = layer_type if named else layer_type.__name__
        raise ValueError(
            f"{name} already has a rule; unregister it first "
            f"(del pergrad.rules.RULES[{layer_type!r}])"
        )

    def decorator(grads: GradsFn) -> GradsFn:
        if not callable(grads):
            raise TypeError(f"register_rule decorates a function, got {type(grads).__name__}")
        RULES[layer_type] = Rule(grads, moments, supports, norms, features, own_layout, all_outputs)
        return grads

    return decorator


def rule_for(module: nn.Module) -> tuple[Rule | None, str | None]:
    """The rule for ``module`` as configured, or ``None`` and why (``None`` reason: no rule)."""
    kind = layer_type(module)
    rule = RULES.get(kind) or RULES.get(f"{kind.__module__}.{kind.__qualname__}")
    if rule is None:
        return None, None
    reason = rule.supports(module) if rule.supports is not None else None
    return (None, reason) if reason else (rule, None)


def layer_type(module: nn.Module) -> type:
    """The module's own class. FSDP2's ``fully_shard`` swaps it for a subclass that adds
    hooks and no computation (``FSDPLinear`` of ``Linear``): the class it subclasses."""
    kind = type(module)
    bases = kind.__bases__
    fsdp = len(bases) == 2 and bases[0].__name__ == "FSDPModule"
    return bases[1] if fsdp and kind.__name__ == f"FSDP{bases[1].__name__}" else kind


def positions(x: Tensor) -> Tensor:
    """``(B, …, d) -> (B, positions, d)``."""
    return x.reshape(len(x), -1, x.shape[-1])


def pair_moments(delta: Tensor, a: Tensor, grad_sum: Tensor) -> Tensor:
    """``Σ_b g_b²`` of ``g_b = δ_bᵀ a_b`` summed over positions, per group, for
    ``δ (G, B, P, o)`` and ``a (G, B, P, i)``, by the expansion
    ``Σ_b g_b² = Σ_{b,t,t'} (δ_bt ⊙ δ_bt')ᵀ (a_bt ⊙ a_bt')``: ``B·P²`` rows, never the ``B``
    gradients (for ``P = 1``, ``(δ²)ᵀ(a²)``). Returns ``(G, o, i)``.

    The terms with ``t ≠ t'`` may be negative, and where they nearly cancel the rounded sum
    can fall below zero. A sum of squares is at least the square of the sum over ``B``,
    ``Σ_b g_b² ≥ (Σ_b g_b)²/B``, so the result is clamped there, given ``grad_sum``
    ``= Σ_b g_b`` ``(G, o, i)`` (MATH.md, "Sums of squares never below the square of the
    mean")."""
    groups, batch, count = delta.shape[:3]
    rows = batch * count * count
    d = (delta.unsqueeze(3) * delta.unsqueeze(2)).reshape(groups, rows, -1)
    x = (a.unsqueeze(3) * a.unsqueeze(2)).reshape(groups, rows, -1)
    return torch.maximum(torch.bmm(d.mT, x), grad_sum.square().div_(batch))


MEMORY_WEIGHT = 8
"""Multiply-adds one number written and read again costs, for :func:`pairs_cheaper`: a
matrix product runs at many multiply-adds per number it touches, an element-wise square and
sum at a fraction of one. With 8 the expansion is chosen up to 5 positions; measured on one
CPU thread (B = 32 or 256, 64–576 wide), it is faster up to 6 and slower from 9 or 16."""


def gram_cheaper(count: int, rows: int, columns: int) -> bool:
    """Whether ``|g_b|² = Σ_{t,t'} (δ_bt·δ_bt')(a_bt·a_bt')`` (two Gram matrices over the
    ``count`` positions) beats forming ``g_b`` of shape ``(rows, columns)``, counted per example
    as :func:`pairs_cheaper` counts."""
    gram = count**2 * (rows + columns) + MEMORY_WEIGHT * 3 * count**2
    per_example = count * rows * columns + MEMORY_WEIGHT * 2 * rows * columns
    return gram < per_example


def pairs_cheaper(batch: int, count: int, rows: int, columns: int) -> bool:
    """Whether :func:`pair_moments` beats forming per-example gradients ``(rows, columns)``
    over ``count`` positions, counting multiply-adds plus numbers written and read (weighed
    as :data:`MEMORY_WEIGHT` multiply-adds each)."""
    per_example = batch * count * rows * columns + MEMORY_WEIGHT * 3 * batch * rows * columns
    pairs = batch * count**2 * rows * columns + MEMORY_WEIGHT * batch * count**2 * (rows + columns)
    return pairs < per_example
