"""What every mode shares: its signature, and the error that says it cannot run a model."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from pergrad.inputs import Inputs

PerExampleResult = tuple[dict[str, Tensor], Tensor]
"""Per-example gradients (name -> ``(b, *param.shape)``) and per-example losses ``(b,)``."""


class Mode:
    """A way of computing per-example gradients of ``loss_fn(model(*inputs), target)``.

    Subclasses set ``name`` and implement ``__call__`` for one chunk of examples.
    """

    name: str
    runs_alone = False
    """Whether it runs each example alone (then :meth:`losses` gives what it computed, for
    :mod:`pergrad.alone` to compare with the batch)."""

    def __init__(self, model: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor]):
        self.model = model
        self.loss_fn = loss_fn

    def __call__(
        self, params: dict[str, nn.Parameter], inputs: Inputs, target: Tensor
    ) -> PerExampleResult:
        raise NotImplementedError

    def losses(self, inputs: Inputs, target: Tensor) -> Tensor:
        """The per-example losses as this mode computes them, without gradients (a mode that
        runs each example alone)."""
        raise NotImplementedError


class ModeError(RuntimeError):
    """A mode cannot compute per-example gradients for this model.

    ``reason`` names the layer where it failed and the first line of the underlying error.
    """

    def __init__(self, mode: str, reason: str):
        super().__init__(
            f"mode={mode!r} cannot run this model: {reason}. "
            f"Use mode='auto' to fall back to a mode that can."
        )
        self.mode = mode
        self.reason = reason

    @classmethod
    def wrap(cls, mode: str, model: nn.Module, error: BaseException) -> ModeError:
        """Describe ``error``, raised while ``mode`` ran ``model``, naming the innermost layer
        whose ``forward`` (or backward) was running when it was raised."""
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        layer = _innermost_layer(model, error)
        where = f"in layer {layer}: " if layer else ""
        return cls(mode, f"{where}{type(error).__name__}: {first_line}")


def _innermost_layer(model: nn.Module, error: BaseException) -> str | None:
    names = {id(module): name for name, module in model.named_modules()}
    found = None
    tb = error.__traceback__
    while tb is not None:
        frame_self = tb.tb_frame.f_locals.get("self")
        if id(frame_self) in names and isinstance(frame_self, nn.Module):
            name = names[id(frame_self)] or "<root>"
            found = f"'{name}' ({type(frame_self).__name__})"
        tb = tb.tb_next
    return found
