"""The ways of computing per-example gradients, one module each, fastest first."""

from pergrad.modes.base import Mode, ModeError, PerExampleResult
from pergrad.modes.func import FuncMode
from pergrad.modes.hooks import HooksMode
from pergrad.modes.loop import LoopMode

MODES: dict[str, type[Mode]] = {mode.name: mode for mode in (FuncMode, HooksMode, LoopMode)}
"""Every mode by name, in the order ``"auto"`` tries them."""

__all__ = [
    "MODES",
    "FuncMode",
    "HooksMode",
    "LoopMode",
    "Mode",
    "ModeError",
    "PerExampleResult",
]
