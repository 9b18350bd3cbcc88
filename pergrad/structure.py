"""What a model's structure determines, computed once per engine: its trainable parameters
and their names, the layers that would mix examples, and the modules the per-layer path hooks
(with the rule that applies to each as configured).

Every call revalidates it: a fingerprint of the module tree — each module, its parameters,
their ``requires_grad``, its ``training`` flag — must be the one it was built from, else it is
built again; the rules are looked up again (a layer's configuration can change between calls)
and the layers that would mix examples checked again. The model carries nothing of pergrad
between calls.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from pergrad import checks
from pergrad.rules.base import Rule, layer_type, rule_for
from pergrad.uses import OpUse
from pergrad.wrappers import is_compiled


@dataclass
class Hooked:
    """A module whose parameters the per-layer path computes, and how."""

    module: nn.Module
    rule: Rule | None
    params: dict[str, str]  # name relative to the module -> name in the model
    outside_rule: str | None  # why its type's rule does not apply to its configuration

    def __post_init__(self) -> None:
        self.slots = [self._slot(name) for name in self.params]

    def _slot(self, name: str) -> tuple[dict, str]:
        submodule_name, _, leaf = name.rpartition(".")
        return self.module.get_submodule(submodule_name)._parameters, leaf

    def swap(self, tensors: dict[str, Tensor]) -> None:
        """Make the module's parameters ``tensors`` (by their names in the model)."""
        for (parameters, leaf), name in zip(self.slots, self.params.values()):
            parameters[leaf] = tensors[name]

    @property
    def kind(self) -> str:
        if isinstance(self.module, OpUse):
            return f"{self.module.name} (op)"
        return layer_type(self.module).__name__

    @property
    def numel(self) -> int:
        """The numbers in one example's gradients of the parameters it covers."""
        return sum(parameters[leaf].numel() for parameters, leaf in self.slots)

    @property
    def label(self) -> str:
        """The layer type, and why its rule does not apply, for messages."""
        return self.kind + (f" ({self.outside_rule})" if self.outside_rule else "")


class Structure:
    """The structure of ``model`` as it is now; :meth:`current` revalidates it."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.modules = list(model.modules())
        self.key = _fingerprint(self.modules)
        self.params = checks.trainable(model)
        self.mixing_candidates = [
            (name, m) for name, m in model.named_modules() if checks.may_mix(m)
        ]
        """``(name, module)`` of the layers that mix examples in some configurations."""
        self.compiled = any(map(is_compiled, self.modules))
        """Whether some submodule is compiled by ``torch.compile``: pergrad then runs the
        model with compiled code run eagerly, so that its hooks are not traced."""
        self._rules: list | None = None
        self._hooked: list[Hooked] = []

    def current(self) -> Structure:
        """This structure if the model still has it, else the model's new one."""
        return self if _fingerprint(self.modules) == self.key else Structure(self.model)

    def check(self) -> None:
        """Refuse layers that mix examples, as they are configured now.

        Raises:
            InputError: see :func:`pergrad.checks.no_batch_mixing`.
        """
        checks.no_batch_mixing(self.mixing_candidates)

    @property
    def hooked(self) -> list[Hooked]:
        """Every module that owns trainable parameters: one with a rule for all its
        parameters (and its submodules'), any other for those it owns directly."""
        rules = [rule_for(module) for module in self.modules]
        if rules != self._rules:
            self._rules, self._hooked = rules, self._find_hooked(rules)
        return self._hooked

    def _find_hooked(self, rules: list) -> list[Hooked]:
        trainable = {id(p): name for name, p in self.params.items()}
        found: list[Hooked] = []
        seen: set[int] = set()
        for module, (rule, why) in zip(self.modules, rules):
            if id(module) in seen:
                continue
            if rule is not None:
                owned = {
                    name: trainable[id(p)]
                    for name, p in module.named_parameters(remove_duplicate=False)
                    if id(p) in trainable
                }
                seen.update(id(m) for m in module.modules())  # its rule covers them
                if owned:
                    found.append(Hooked(module, rule, owned, None))
                continue
            direct = {
                name: trainable[id(p)]
                for name, p in module._parameters.items()
                if p is not None and id(p) in trainable
            }
            if direct and not _holds_layers(module, trainable):
                found.append(Hooked(module, None, direct, why))
        return found


def _holds_layers(module: nn.Module, trainable: dict[int, str]) -> bool:
    """Whether a module's submodules own trainable parameters: replaying it would replay
    them too, so its own parameters are taken at their uses (:mod:`pergrad.uses`)."""
    return any(id(p) in trainable for child in module.children() for p in child.parameters())


def _fingerprint(modules: list[nn.Module]) -> tuple:
    """Each module's children, training flag and parameters with their ``requires_grad``, by
    identity (the structure holds every one of them, so no identity is reused meanwhile).
    A module added, removed or replaced anywhere changes its parent's children, so the
    modules the structure was built from are enough to see any change of the tree."""
    return tuple(
        (
            tuple(map(id, module._modules.values())),
            module.training,
            tuple(map(id, module._parameters.values())),
            tuple(p is not None and p.requires_grad for p in module._parameters.values()),
        )
        for module in modules
    )
