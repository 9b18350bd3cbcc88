"""Per-layer rules: per-example gradients of a layer's parameters from its inputs and output
gradients, one file per layer family, each registering its layer types.

Add a rule for your own layer with :func:`register_rule`; check it with
:func:`pergrad.testing.check_rule`.
"""

from pergrad.reduce import CHUNK_ELEMENTS, Moments
from pergrad.rules import (  # noqa: F401
    attention,
    bilinear,
    cell,
    conv,
    embedding,
    gpt2_conv1d,
    linear,
    norm,
    prelu,
    recurrent,
)
from pergrad.rules.base import RULES, Call, Rule, register_rule, rule_for

__all__ = ["CHUNK_ELEMENTS", "RULES", "Call", "Moments", "Rule", "register_rule", "rule_for"]
