"""What the optimizers share: validation, reading pergrad's statistics, and ``zero_grad``."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

import pergrad
import pergrad.noise
from optim import functional as F

SECOND_MOMENTS = ("example", "batch")
BATCH_SCALINGS = ("linear", "gain", "sqrt")
BIAS_CORRECTIONS = ("uniform", "exponential")
MASSES = {"grad_mass": "grad_horizon", "sq_mass": "sq_horizon"}
"""State of the exponential bias correction: the share of each average's weight its data
hold, and the horizon it follows."""


class PerExampleOptimizer(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` whose hyperparameters are per example and whose every step
    reads its batch size, ``ĝ`` and ``q = mean_b g_b²`` from the statistics ``pergrad`` left.

    Subclasses implement :meth:`_init_state` (a parameter's zero state) and
    :meth:`_update_group` (one step of parameters that share its scalars), and may override
    :meth:`_state_keys`, :meth:`_metric` and :meth:`_legacy_keys`.
    """

    def __init__(self, params, defaults: dict[str, Any]):
        _validate(defaults)
        super().__init__(params, defaults)
        self.gains: list[float] = []
        """The gain ratio of every ``batch_scaling="gain"`` group's every step, in order."""

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("gains", [])
        for group in self.param_groups:
            group.setdefault("batch_scaling", "linear")
            group.setdefault("gain_horizon", 1000)
            group.setdefault("foreach", None)
            group.setdefault("bias_correction", "uniform")
            for p in group["params"]:  # states saved before the exponential rule
                saved = self.state.get(p, {})
                for key, horizon in MASSES.items():
                    if "seen" in saved and horizon in group:  # uniform: data alone, once any
                        saved.setdefault(key, 1.0 if saved["seen"] else 0.0)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """As ``torch.optim``'s, and the group's state is made at once (zeros), so that a
        fresh optimizer has the state a checkpoint loads into (``torch.distributed.checkpoint``
        loads in place)."""
        _validate({**self.defaults, **param_group})
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        for p in group["params"]:
            state = self.state[p]
            if not state:
                self._init_state(p, state, group)
                if group["batch_scaling"] == "gain":
                    zero = torch.zeros((), dtype=torch.float64, device=p.device)
                    state.update(gain_seen=0, noise=zero, signal=zero.clone())

    def state_dict(self) -> dict[str, Any]:
        """As ``torch.optim.Optimizer.state_dict``, with the gain history (:attr:`gains`), so
        that a run resumed from it continues bit for bit."""
        return {**super().state_dict(), "gains": list(self.gains)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As ``torch.optim.Optimizer.load_state_dict``, refusing a state that is not this
        optimizer's (``torch.optim.Adam``'s, or another of ours) before anything is loaded.

        Keys that schedulers and trainers add to a group (``initial_lr``, ``differentiable``,
        ...) are kept, as ``torch.optim`` keeps them; a hyperparameter of another optimizer is
        not.

        Raises:
            ValueError: naming the hyperparameters or state buffers that are missing or foreign.
        """
        kind = type(self).__name__
        newer = {
            "batch_scaling",
            "gain_horizon",
            "foreach",
            "second_moment_batch",
            "bias_correction",
        }
        required = (set(self.defaults) & HYPERPARAMETERS) - newer  # not what others add
        own = set(self.defaults) | self._legacy_keys()
        for i, group in enumerate(state_dict.get("param_groups", [])):
            missing = sorted(required - set(group))
            foreign = sorted((set(group) & HYPERPARAMETERS) - own)
            if missing or foreign:
                what = f"lacks {', '.join(missing)}" if missing else f"has {', '.join(foreign)}"
                raise ValueError(
                    f"this state_dict is not an optim.{kind}'s: its param_groups[{i}] {what}. "
                    f"Load a state saved by optim.{kind}.state_dict()."
                )
        for group in state_dict.get("param_groups", []):
            _validate({**self.defaults, **group})
        buffers = self._state_keys()
        saved = [i for group in state_dict.get("param_groups", []) for i in group["params"]]
        params = dict(zip(saved, (p for group in self.param_groups for p in group["params"])))
        for key, state in state_dict.get("state", {}).items():
            missing = sorted(buffers - set(state))
            if missing:
                raise ValueError(
                    f"this state_dict is not an optim.{kind}'s: the state of parameter {key} "
                    f"lacks {', '.join(missing)}. Load a state saved by optim.{kind}.state_dict()."
                )
            p = params.get(key)
            for name, value in state.items():
                if (
                    p is not None
                    and isinstance(value, Tensor)
                    and value.dim()
                    and value.shape != p.shape
                ):
                    raise ValueError(
                        f"this state_dict belongs to other parameters: its {name} of parameter "
                        f"{key} has shape {tuple(value.shape)}, the parameter "
                        f"{tuple(p.shape)}. Load it into an optimizer over the same model."
                    )
        gains = state_dict.get("gains", [])
        super().load_state_dict({k: v for k, v in state_dict.items() if k != "gains"})
        self.gains = list(gains)
        for key, state in state_dict.get("state", {}).items():  # torch cast them to p's dtype
            if (p := params.get(key)) is not None:
                for name in ("noise", "signal"):
                    if name in state:
                        value = torch.as_tensor(state[name], dtype=torch.float64)
                        self.state[p][name] = value.to(p.device)

    def _state_keys(self) -> set[str]:
        """The buffers every parameter's state holds."""
        return {"seen", "exp_avg"}

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear ``p.grad`` and the per-example statistics of every parameter.

        Both are always removed (``set_to_none`` is accepted for compatibility): a zeroed
        ``.grad`` would carry no statistics for the next ``pergrad`` backward.
        """
        pergrad.zero_grad(p for group in self.param_groups for p in group["params"])

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """Take one step with the batch whose statistics ``pergrad`` accumulated.

        Parameters without ``.grad`` are skipped, as in PyTorch.

        Raises:
            MissingStatisticsError: a parameter has a ``.grad`` but no per-example statistics
                (both a ``pergrad.InputError`` and a ``RuntimeError``).
            RuntimeError: a ``batch_scaling="gain"`` group holds statistics of different batch
                sizes, or ``second_moment_batch ≠ 1`` meets a batch of one example.
            pergrad.InputError: a ``.grad`` changed after pergrad computed it.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_statistics()
        for group in self.param_groups:
            active = [p for p in group["params"] if p.grad is not None]
            for p in active:
                state = self.state[p]
                if not state:
                    self._init_state(p, state, group)
                state["seen"] += pergrad.grad_stats(p).count
            gain = self._gain(active, group) if group["batch_scaling"] == "gain" else None
            buckets: dict[tuple[int, AverageWeights], list[Tensor]] = {}
            for p in active:  # parameters whose scalars agree step together (one, as a rule)
                count = pergrad.grad_stats(p).count
                key = (count, self._weights(self.state[p], count, group))
                buckets.setdefault(key, []).append(p)
            for (count, weights), params in buckets.items():
                step_scale = count if gain is None else gain
                if group["batch_scaling"] == "sqrt":
                    step_scale = math.sqrt(count)
                self._update_group(params, group, step_scale, weights)
            for p in active:
                self._advance_masses(self.state[p], pergrad.grad_stats(p).count, group)
        return loss

    def _weights(self, state: dict[str, Any], count: int, group: dict[str, Any]) -> AverageWeights:
        """This step's weights in the running averages of a parameter whose ``state["seen"]``
        already counts the step's ``count`` examples (MATH.md, ``bias_correction``)."""
        seen, horizons = state["seen"], (group["grad_horizon"], group.get("sq_horizon", math.inf))
        if group["bias_correction"] != "exponential":
            return AverageWeights(*(F.average_weight(count, seen, n) for n in horizons))
        return AverageWeights(
            *(
                F.exponential_weight(count, state.get(key, 0.0), seen, n)
                for key, n in zip(MASSES, horizons)
            )
        )

    def _advance_masses(self, state: dict[str, Any], count: int, group: dict[str, Any]) -> None:
        """Record the share of each average's weight its data hold after this step: ``1``
        under the uniform rule (its averages are exact means from the first step)."""
        exponential = group["bias_correction"] == "exponential"
        for key, horizon in MASSES.items():
            if horizon in group:
                mass = state.get(key, 0.0)
                state[key] = F.data_mass(count, mass, group[horizon]) if exponential else 1.0

    def _check_statistics(self) -> None:
        """Raise, before any parameter or state changes, unless every ``.grad`` comes with the
        statistics pergrad computed for it and each gain-scaled group has one batch size."""
        owned = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        missing = [p for p in owned if pergrad.grad_stats(p) is None]
        if missing:
            raise MissingStatisticsError(
                f"a parameter of shape {tuple(missing[0].shape)} has a .grad but no per-example "
                f"statistics, so {type(self).__name__} cannot know the batch size or "
                f"mean_b g_b². Compute gradients with "
                f"pergrad.PerExample(model, loss_fn).backward(inputs, target) instead "
                f"of loss.backward(). No parameter was changed."
            )
        pergrad.stats.check_unchanged(
            {f"#{i} (shape {tuple(p.shape)})": p for i, p in enumerate(owned)}
        )
        for group in self.param_groups:
            counts = {pergrad.grad_stats(p).count for p in group["params"] if p.grad is not None}
            if group["batch_scaling"] == "gain" and len(counts) > 1:
                raise RuntimeError(
                    f"batch_scaling='gain' needs one batch size per parameter group; the "
                    f"statistics cover {sorted(counts)} examples. No parameter was changed."
                )
            if group.get("second_moment_batch", 1) != 1 and 1 in counts:
                raise RuntimeError(
                    f"second_moment_batch={group['second_moment_batch']!r} separates the mean "
                    f"gradient from its spread, which one example cannot show: use batches "
                    f"of at least 2 examples, or second_moment_batch=1. No parameter was "
                    f"changed."
                )

    def _gain(self, params: list[Tensor], group: dict[str, Any]) -> float:
        """The smoothed gain ratio ``r = B(σ² + |G|²) / (σ² + B|G|²)`` of the group (MATH.md),
        in the metric the optimizer steps in; it takes the place of ``B`` in the step."""
        if not params:
            return 1.0
        batch = pergrad.grad_stats(params[0]).count  # one per group, checked before any change
        device = params[0].device
        noise = signal = torch.zeros((), dtype=torch.float64, device=device)
        for p in params:  # on the device throughout: one value reaches the host, the gain
            state, stats = self.state[p], pergrad.grad_stats(p)
            state.setdefault("gain_seen", 0)  # examples in steps of B ≥ 2
            for key in ("noise", "signal"):  # smoothed σ², |G|² (floats in older states)
                state[key] = torch.as_tensor(state.get(key, 0.0), dtype=torch.float64).to(p.device)
            if batch > 1:  # one example has no spread: the estimates stay as they were
                state["gain_seen"] += batch
                s, m = pergrad.noise.sums(
                    p.grad, stats.sq_mean, self._metric(p, stats, state, group)
                )
                noise_now, signal_now = pergrad.noise.estimates(batch, s, m)
                weight = F.average_weight(batch, state["gain_seen"], group["gain_horizon"])
                state["noise"] = state["noise"] + weight * (noise_now - state["noise"])
                state["signal"] = state["signal"] + weight * (signal_now - state["signal"])
            noise = noise + state["noise"].to(device)
            signal = signal + state["signal"].to(device)
        gain = float(F.gain_ratio(batch, noise, signal))
        self.gains.append(gain)
        return gain

    def _metric(
        self, p: Tensor, stats: pergrad.GradStats, state: dict[str, Any], group: dict[str, Any]
    ) -> Tensor | None:
        """The weight of each coordinate in the metric of the step (``None``: all 1)."""
        return None

    def metric_of(self, p: Tensor, group: dict[str, Any]) -> Tensor | None:
        """The weight of each coordinate of ``p`` (of ``group``) in the optimizer's metric,
        with the averages as the last step left them: ``1/(√s + ε)`` for Adam and RMSprop,
        ``None`` (all 1) for SGD or before any step."""
        return None

    def _init_state(self, p: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        raise NotImplementedError

    def _update_group(
        self,
        params: list[Tensor],
        group: dict[str, Any],
        step_scale: float,
        weights: AverageWeights,
    ) -> None:
        """One step of ``params``, which share the step's scalars: ``step_scale`` is the factor
        the step is multiplied by, ``B`` (or the gain ratio or ``√B`` in its place)."""
        raise NotImplementedError

    def _foreach(self, params: list[Tensor], group: dict[str, Any]) -> bool:
        """``foreach`` as the group says; by default on CUDA, as ``torch.optim`` does."""
        if group["foreach"] is not None:
            return group["foreach"]
        return all(p.is_cuda for p in params)

    def _legacy_keys(self) -> set[str]:
        """Hyperparameters an older version kept, accepted at load and dropped."""
        return set()


class MissingStatisticsError(pergrad.InputError, RuntimeError):
    """A parameter has a ``.grad`` but no per-example statistics: ``pergrad.InputError``, as
    pergrad raises for the same fault, and ``RuntimeError``, as ``optim`` raised before."""


@dataclass(frozen=True)
class AverageWeights:
    """The weights of this step in the running averages (``w = min(1, B / min(n, N⁰))``, or
    the exponential rule's): of the first moment (``grad_horizon``) and of the second
    (``sq_horizon``; SGD has none)."""

    grad: float
    sq: float


_NUMBERS: dict[str, tuple[Callable[[float], bool], str, str]] = {
    # name: (valid, torch.optim's word for it, what it must be)
    "lr": (lambda v: 0 <= v < math.inf, "learning rate", "a finite number >= 0"),
    "grad_horizon": (lambda v: v >= 1, "grad_horizon", ">= 1 (examples; inf: everything)"),
    "sq_horizon": (lambda v: v >= 1, "sq_horizon", ">= 1 (examples; inf: everything)"),
    "gain_horizon": (lambda v: v >= 1, "gain_horizon", ">= 1 (examples; inf: everything)"),
    "eps": (lambda v: 0 < v < math.inf, "epsilon value", "a finite number > 0"),
    "weight_decay": (lambda v: 0 <= v < math.inf, "weight_decay value", "a finite number >= 0"),
    "power": (lambda v: 0 < v < math.inf, "power", "a finite number > 0"),
    "second_moment_batch": (
        lambda v: v >= 1,
        "second_moment_batch",
        ">= 1 (examples; inf: the mean gradient's square alone)",
    ),
}
_CHOICES: dict[str, tuple] = {
    "second_moment": SECOND_MOMENTS,
    "batch_scaling": BATCH_SCALINGS,
    "bias_correction": BIAS_CORRECTIONS,
    "centered": (False, True),
    "foreach": (None, False, True),
}
TORCH_NAMES = {
    "betas": "grad_horizon and sq_horizon, in examples: optim.convert.from_torch_adam(lr, betas, "
    "batch_size) gives them",
    "momentum": "grad_horizon, in examples: optim.convert.from_torch_sgd(lr, momentum, "
    "batch_size) gives it",
    "alpha": "sq_horizon, in examples: optim.convert.from_torch_rmsprop(lr, alpha, batch_size) "
    "gives it",
}
"""``torch.optim`` arguments users reach for, and what takes their place here."""

HYPERPARAMETERS = (
    set(_NUMBERS) | set(_CHOICES) | set(TORCH_NAMES) | {"amsgrad", "nesterov", "dampening"}
)
"""The hyperparameters of ``optim``'s and ``torch.optim``'s optimizers: in a saved group, any
that this optimizer does not have marks another optimizer's state."""


def check_number(
    key: str,
    value: Any,
    valid: Callable[[float], bool],
    word: str,
    must: str,
    *,
    not_a_number: type[Exception] = TypeError,
) -> None:
    """Raise ``ValueError`` unless ``value`` is a number for which ``valid`` holds (NaN never
    does), worded as ``torch.optim`` does and saying what it must be, and ``not_a_number`` for
    something else given (``lr="0.001"``, ``True``).

    ``_NUMBERS[key]`` gives ``valid, word, must`` for a hyperparameter.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise not_a_number(
            f"Invalid {word}: {value!r} is a {type(value).__name__}; {key} must be a number"
        )
    if math.isnan(value) or not valid(value):
        raise ValueError(f"Invalid {word}: {value!r}; {key} must be {must}")


def _validate(options: dict[str, Any]) -> None:
    """Raise ``ValueError`` for a hyperparameter out of range, worded as ``torch.optim`` does
    and saying what it must be, and ``TypeError`` for a number given as something else
    (``lr="0.001"``)."""
    for key, spec in _NUMBERS.items():
        if key in options:
            check_number(key, options[key], *spec)
    for key, allowed in _CHOICES.items():
        if key in options and not any(
            type(options[key]) is type(a) and options[key] == a for a in allowed
        ):
            raise ValueError(
                f"Invalid {key}: {options[key]!r}; choose one of {', '.join(map(repr, allowed))}"
            )
    if options.get("second_moment_batch", 1) != 1 and options.get("centered"):
        raise ValueError(
            f"Invalid second_moment_batch: {options['second_moment_batch']!r} with "
            f"centered=True: s − a² of an estimate at another batch size is not a variance "
            f"and can vanish; use one or the other"
        )
    if options.get("second_moment_batch", 1) != 1 and options.get("second_moment") == "batch":
        raise ValueError(
            f"Invalid second_moment_batch: {options['second_moment_batch']!r} needs "
            f"second_moment='example' (it is built from the per-example statistics); with "
            f"second_moment='batch' leave it at 1"
        )


def refuse_torch_names(kind: str, extra: dict[str, Any]) -> None:
    """Raise for keyword arguments an optimizer does not take, saying what takes the place of
    ``torch.optim``'s (``betas``, ``momentum``, ``alpha``).

    Raises:
        TypeError: naming each argument.
    """
    if not extra:
        return
    hints = [f"{name} (use {TORCH_NAMES[name]})" for name in extra if name in TORCH_NAMES]
    others = [name for name in extra if name not in TORCH_NAMES]
    what = "; ".join(hints + ([f"{', '.join(others)}"] if others else []))
    raise TypeError(
        f"optim.{kind} got unexpected keyword argument(s): {what}. Its hyperparameters are per "
        f"example (docs/MATH.md); see help(optim.{kind})."
    )
