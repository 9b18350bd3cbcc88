"""The warning pergrad gives where it computes something more slowly than it could, once per
decision, attributed to the user's line."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path


class FallbackWarning(UserWarning):
    """``mode="auto"`` could not use its fastest mode and says which layer forced the fallback."""


def warn(message: str) -> None:
    """Warn with :class:`FallbackWarning`, attributed to the first caller outside pergrad."""
    package = str(Path(__file__).resolve().parent)
    frame, level = sys._getframe(1), 2  # stacklevel 2: the caller of warn
    while frame is not None and str(Path(frame.f_code.co_filename).resolve()).startswith(package):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, FallbackWarning, stacklevel=level)
