"""``PerExample``: per-example gradients and their statistics for any ``nn.Module``."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

from pergrad import checks, distributed, stats
from pergrad.layerwise import Layerwise
from pergrad.modes import (
    MODES,
    FuncMode,
    HooksMode,
    LoopMode,
    Mode,
    ModeError,
    PerExampleResult,
    agree,
)

LossFn = Callable[[Tensor, Tensor], Tensor]
Inputs = Tensor | Sequence[Tensor]

VERIFIED_EXAMPLES = 2
"""How many examples ``"auto"`` checks against one backward each before trusting ``"hooks"``."""


class FallbackWarning(UserWarning):
    """``mode="auto"`` could not use its fastest mode and says which layer forced the fallback."""


class PerExample:
    """Per-example gradients ``g_b = ∇_Φ loss_fn(model(x_b), y_b)`` of a model's parameters.

    The model is wrapped, not copied: its own parameters receive ``.grad`` and the statistics.

    Args:
        model: any ``nn.Module``. Its trainable parameters (``requires_grad=True``) get
            per-example gradients; a tied parameter appears once, under its first name.
        loss_fn: ``loss_fn(output, target) -> Tensor`` of shape ``(B,)``, one loss per example,
            e.g. ``nn.CrossEntropyLoss(reduction="none")``.
        mode: ``"func"`` (``torch.func`` ``vmap(grad)``), ``"hooks"`` (Opacus hooks), ``"loop"``
            (one backward per example), or ``"auto"``. With ``"auto"``, :meth:`backward` and
            :meth:`grads` work layer by layer from one batched backward pass
            (:mod:`pergrad.layerwise`); any parameter no per-layer rule covers gets its
            per-example gradients from the first of the three modes that runs the model and,
            for ``"hooks"``, agrees with ``"loop"`` on the first examples. Choices are made on
            the first call, announced once by a :class:`FallbackWarning` where they are not the
            fastest, and kept.
        chunk_size: at most this many examples' gradients exist at once; ``None`` for the
            whole batch. Results do not depend on it.
        process_group: a ``torch.distributed`` process group (``torch.distributed.group.WORLD``
            for all ranks). :meth:`backward` then sums the statistics over the group, so
            every rank holds those of the global batch, its share of which may be uneven or
            empty. Every rank must call :meth:`backward` alike; the first call checks that the
            ranks start from the same parameters.

    Example:
        >>> engine = PerExample(model, nn.CrossEntropyLoss(reduction="none"))
        >>> grads = engine.grads(x, y)        # {name: (B, *param.shape)}
        >>> loss = engine.backward(x, y)      # p.grad = mean, p.grad_stats = (n, mean of squares)
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        *,
        mode: str = "auto",
        chunk_size: int | None = None,
        process_group: object | None = None,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        if mode != "auto" and mode not in MODES:
            raise ValueError(f"Invalid mode: {mode!r}; choose 'auto' or one of {sorted(MODES)}")
        if chunk_size is not None and (isinstance(chunk_size, bool) or chunk_size < 1):
            raise ValueError(f"Invalid chunk_size: {chunk_size!r}; use None or an int >= 1")
        if process_group is not None:
            distributed.check_initialized(process_group)
        self.model = model
        self.process_group = process_group
        self._ranks_checked = False
        self.loss_fn = loss_fn
        self.chunk_size = chunk_size
        self._requested = mode
        self._mode: Mode | None = None if mode == "auto" else MODES[mode](model, loss_fn)
        self._layerwise = Layerwise(model, loss_fn) if mode == "auto" else None
        self._warned_uncovered = False
        self.last_losses: Tensor | None = None
        """Per-example losses ``(B,)`` of the last call, detached."""
        self.sources: dict[str, str] = {}
        """Where each parameter's statistics came from in the last :meth:`backward`: the layer
        type whose per-layer rule computed them (``"Linear"``, ...), or the mode that formed its
        per-example gradients (``"func"``, ...)."""

    @property
    def mode(self) -> str:
        """The per-example mode in use (with ``"auto"``, for what per-layer rules do not
        cover): ``"auto"`` until the first call has chosen one."""
        return self._requested if self._mode is None else self._mode.name

    def grads(self, inputs: Inputs, target: Tensor) -> dict[str, Tensor]:
        """Per-example gradients, ``{name: Tensor of shape (B, *param.shape)}``.

        Leaves ``.grad`` and the statistics untouched.

        Raises:
            TypeError, ValueError: bad inputs, loss or model; the message says what to do.
            FloatingPointError: some per-example gradient is NaN or infinite.
        """
        params, chunks = self._prepare(inputs, target)
        results = [self._chunk(params, x, y, per_example=True) for x, y in chunks]
        if len(results) == 1:
            values, self.last_losses = results[0]
            grads = {name: values[name] for name in params}  # in the model's order
        else:
            grads = {name: torch.cat([g[name] for g, _ in results]) for name in params}
            self.last_losses = torch.cat([losses for _, losses in results])
        checks.finite(grads, "per-example gradients")
        return grads

    def backward(self, inputs: Inputs, target: Tensor) -> Tensor:
        """Accumulate ``ĝ = mean_b g_b`` into ``p.grad`` and ``(n, mean_b g_b²)`` into
        ``p.grad_stats`` for every trainable parameter, chunk by chunk, and return the mean loss.

        Calling it again before the statistics are cleared accumulates: two halves of a batch
        leave what the whole batch would. Clear with ``optimizer.zero_grad()`` of an ``optim``
        optimizer or :meth:`zero_grad`.

        Raises:
            TypeError, ValueError: bad inputs, loss or model; the message says what to do.
            FloatingPointError: a gradient statistic is NaN or infinite; nothing is accumulated.
        """
        grouped = self.process_group is not None
        params, chunks = self._prepare(inputs, target, allow_empty=grouped)
        if grouped and not self._ranks_checked:
            distributed.check_same_parameters(params, self.process_group)
            self._ranks_checked = True
        grad_sums: dict[str, Tensor] = {}
        sq_sums: dict[str, Tensor] = {}
        first = next(iter(params.values()))
        losses = [torch.zeros(0, dtype=first.dtype, device=first.device)]  # for an empty share
        for x, y in chunks:
            chunk_moments, chunk_losses = self._chunk(params, x, y, per_example=False)
            for name, (grad_sum, sq_sum) in chunk_moments.items():
                if name in grad_sums:  # later chunks add into the first chunk's fresh tensors
                    grad_sums[name] += grad_sum
                    sq_sums[name] += sq_sum
                else:
                    grad_sums[name], sq_sums[name] = grad_sum, sq_sum
            losses.append(chunk_losses)
        for name, p in params.items():  # an empty share of a data-parallel batch: zeros
            if name not in grad_sums:
                grad_sums[name], sq_sums[name] = torch.zeros_like(p), torch.zeros_like(p)
        self.last_losses = torch.cat(losses)
        count, mean_loss = len(self.last_losses), self.last_losses.mean()
        if grouped:
            count, loss_sum = distributed.all_reduce_sums(
                self.process_group, count, self.last_losses.sum(), grad_sums, sq_sums
            )
            if count == 0:
                raise checks.InputError("the batch is empty on every rank: pass examples")
            mean_loss = loss_sum / count
        checks.finite(sq_sums, "sum of squared per-example gradients")
        stats.accumulate(params, count, grad_sums, sq_sums)
        return mean_loss

    def zero_grad(self) -> None:
        """Clear ``.grad`` and the per-example statistics of every parameter of the model."""
        stats.zero_grad(self.model.parameters())

    def _prepare(
        self, inputs: Inputs, target: Tensor, allow_empty: bool = False
    ) -> tuple[dict[str, nn.Parameter], Iterator[tuple[tuple[Tensor, ...], Tensor]]]:
        inputs, size = checks.batch(inputs, target, allow_empty)
        checks.no_batch_mixing(self.model)
        params = checks.trainable(self.model)
        step = self.chunk_size or max(size, 1)
        chunks = (
            (tuple(x[start : start + step] for x in inputs), target[start : start + step])
            for start in range(0, size, step)
        )
        return params, chunks

    def _chunk(
        self,
        params: dict[str, nn.Parameter],
        inputs: tuple[Tensor, ...],
        target: Tensor,
        per_example: bool,
    ) -> tuple[dict[str, Tensor | tuple[Tensor, Tensor]], Tensor]:
        """For one chunk, each parameter's per-example gradients if ``per_example``, else their
        moments ``(Σ_b g_b, Σ_b g_b²)``, and the losses: per-layer rules where they cover a
        parameter (in ``"auto"``), a per-example mode for the rest."""
        if self._layerwise is None:
            grads, losses = self._per_example(params, inputs, target)
            self.sources = dict.fromkeys(params, self.mode)
            return (grads if per_example else stats.moments(grads)), losses
        if self._mode is None:  # choose the per-example mode now, on a couple of examples
            few = slice(0, VERIFIED_EXAMPLES)
            self._per_example(params, tuple(x[few] for x in inputs), target[few])
        with torch.enable_grad():
            result = self._layerwise(params, inputs, target, per_example)
        rest = {name: params[name] for name in result.uncovered}
        if rest:
            grads, _ = self._per_example(rest, inputs, target)
            result.values.update(grads if per_example else stats.moments(grads))
            self._warn_uncovered(result.uncovered)
        self.sources = {**result.layers, **dict.fromkeys(rest, self.mode)}
        return result.values, result.losses

    def _warn_uncovered(self, uncovered: dict[str, str]) -> None:
        if self._warned_uncovered:
            return
        self._warned_uncovered = True
        listed = "; ".join(f"'{name}': {reason}" for name, reason in uncovered.items())
        warnings.warn(
            f"pergrad: no per-layer rule covers {listed}. Their per-example gradients come "
            f"from mode={self.mode!r}.",
            FallbackWarning,
            stacklevel=4,
        )

    def _per_example(
        self, params: dict[str, nn.Parameter], inputs: tuple[Tensor, ...], target: Tensor
    ) -> PerExampleResult:
        with torch.enable_grad():
            if self._mode is None:
                return self._choose_mode(params, inputs, target)
            return self._mode(params, inputs, target)

    def _choose_mode(
        self, params: dict[str, nn.Parameter], inputs: tuple[Tensor, ...], target: Tensor
    ) -> PerExampleResult:
        """Run the first mode that can, remember it, and warn if it is not the fastest."""
        reasons = []
        for mode in (FuncMode(self.model, self.loss_fn), HooksMode(self.model, self.loss_fn)):
            try:
                result = mode(params, inputs, target)
                if mode.name == "hooks":
                    _agree_with_loop(self.model, self.loss_fn, params, inputs, target, result)
            except ModeError as error:
                reasons.append(f"mode={error.mode!r} failed: {error.reason}")
                continue
            return self._adopt(mode, reasons, result)
        mode = LoopMode(self.model, self.loss_fn)
        return self._adopt(mode, reasons, mode(params, inputs, target))

    def _adopt(self, mode: Mode, reasons: list[str], result: PerExampleResult) -> PerExampleResult:
        self._mode = mode
        if reasons:
            slow = " (one backward per example: correct, slow)" if mode.name == "loop" else ""
            warnings.warn(
                f"pergrad: {'; '.join(reasons)}. Using mode={mode.name!r}{slow}.",
                FallbackWarning,
                stacklevel=5,
            )
        return result


def _agree_with_loop(
    model: nn.Module,
    loss_fn: LossFn,
    params: dict[str, nn.Parameter],
    inputs: tuple[Tensor, ...],
    target: Tensor,
    result: PerExampleResult,
) -> None:
    """Raise ``ModeError`` unless ``result`` matches one backward per example on the first
    :data:`VERIFIED_EXAMPLES` examples (a model with random layers fails this, and falls back)."""
    k = min(VERIFIED_EXAMPLES, len(target))
    reference, _ = LoopMode(model, loss_fn)(params, tuple(x[:k] for x in inputs), target[:k])
    for name, g in reference.items():
        if not agree(result[0][name][:k], g):
            raise ModeError(
                "hooks",
                f"on '{name}': its per-example gradients differ from one backward per example "
                f"(a layer Opacus gets wrong, or a random layer such as Dropout)",
            )
