"""What the scripts' command lines share (the examples and ``benchmarks/``)."""

from __future__ import annotations

import argparse


class DefaultsWhereSet(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: …)`` only where an option has a value of its own: not for flags, nor
    where the help already says what an unset option means."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or isinstance(action.default, bool):
            return action.help or ""
        return super()._get_help_string(action)
