"""pergrad: per-example gradients for any ``nn.Module``, and their sufficient statistics.

>>> engine = pergrad.PerExample(model, nn.CrossEntropyLoss(reduction="none"))
>>> loss = engine.backward(x, y)   # p.grad = mean_b g_b, p.grad_stats = (n, mean_b g_b²)
"""

from pergrad import losses, testing
from pergrad.checks import InputError
from pergrad.engine import PerExample
from pergrad.fallback import FallbackWarning
from pergrad.micro import MicroBatches
from pergrad.modes import ModeError
from pergrad.noise import NoiseScale, noise_scale
from pergrad.rules import Call, register_rule
from pergrad.stats import GradStats, clip_grad_norm_, grad_stats, zero_grad
from pergrad.verify import VerificationError

__all__ = [
    "Call",
    "FallbackWarning",
    "GradStats",
    "InputError",
    "MicroBatches",
    "ModeError",
    "NoiseScale",
    "PerExample",
    "VerificationError",
    "clip_grad_norm_",
    "grad_stats",
    "losses",
    "noise_scale",
    "register_rule",
    "testing",
    "zero_grad",
]

__version__ = "0.1.0"
