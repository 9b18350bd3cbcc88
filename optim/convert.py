"""Conversions between per-example hyperparameters and ``torch.optim``'s, at a batch size.

A horizon of ``N⁰`` examples spans ``N = max(1, N⁰/B)`` steps of ``B`` examples, which a
PyTorch running average writes as ``β = 1 − 1/N``. The conversions hold once the running
averages are past their warm-up (PyTorch's bias corrections and ours differ before), and for
Adam from the first step with ``bias_correction="exponential"``.
"""

from __future__ import annotations

from collections.abc import Callable

from optim.base import _NUMBERS, check_number

_LIMITS: dict[str, tuple[Callable[[float], bool], str, str]] = {
    # name: (valid, its word in the message, what it must be), as optim.base._NUMBERS
    "batch_size": (lambda v: isinstance(v, int) and v >= 1, "batch_size", "an int >= 1"),
    "lr": _NUMBERS["lr"],
    "horizon": (lambda v: v >= 1, "horizon", ">= 1 (examples; inf: everything)"),
    "beta": (lambda v: 0 <= v < 1, "beta", "in [0, 1)"),
}


def _check(**values: float) -> None:
    """Raise ``ValueError`` for a value out of range or not a number, in the order given."""
    for key, value in values.items():
        check_number(key, value, *_LIMITS[key], not_a_number=ValueError)


def horizon_to_beta(horizon: float, batch_size: int) -> float:
    """``β = 1 − 1/N`` with ``N = max(1, N⁰/B)`` steps."""
    _check(batch_size=batch_size, horizon=horizon)
    return 1 - 1 / max(1.0, horizon / batch_size)


def beta_to_horizon(beta: float, batch_size: int) -> float:
    """``N⁰ = B / (1 − β)`` examples."""
    _check(batch_size=batch_size, beta=beta)
    return batch_size / (1 - beta)


def to_torch_sgd(lr: float, grad_horizon: float, batch_size: int) -> dict[str, float]:
    """``torch.optim.SGD`` arguments: ``momentum μ = 1 − 1/N_g`` and ``lr = (1 − μ)·B·η₀``
    (its buffer ``v = N_g·m``)."""
    _check(batch_size=batch_size, lr=lr)
    momentum = horizon_to_beta(grad_horizon, batch_size)
    return {"lr": (1 - momentum) * batch_size * lr, "momentum": momentum}


def from_torch_sgd(lr: float, momentum: float, batch_size: int) -> dict[str, float]:
    """``optim.SGD`` arguments for ``torch.optim.SGD(lr, momentum)`` at ``B``: the inverse
    of :func:`to_torch_sgd`."""
    _check(batch_size=batch_size, lr=lr)
    horizon = beta_to_horizon(momentum, batch_size)
    return {"lr": lr / ((1 - momentum) * batch_size), "grad_horizon": horizon}


def to_torch_adam(
    lr: float, grad_horizon: float, sq_horizon: float, batch_size: int
) -> dict[str, object]:
    """``torch.optim.Adam`` arguments: ``lr = B·η₀``, ``betas = (1 − 1/N_g, 1 − 1/N_s)``.

    ``torch.optim.Adam`` feeds ``ĝ²``: it matches ``optim.Adam(second_moment="batch")``."""
    _check(batch_size=batch_size, lr=lr)
    betas = (horizon_to_beta(grad_horizon, batch_size), horizon_to_beta(sq_horizon, batch_size))
    return {"lr": batch_size * lr, "betas": betas}


def from_torch_adam(lr: float, betas: tuple[float, float], batch_size: int) -> dict[str, float]:
    """``optim.Adam`` arguments for ``torch.optim.Adam(lr, betas)`` at ``B``."""
    _check(batch_size=batch_size, lr=lr)
    return {
        "lr": lr / batch_size,
        "grad_horizon": beta_to_horizon(betas[0], batch_size),
        "sq_horizon": beta_to_horizon(betas[1], batch_size),
    }


def to_torch_rmsprop(lr: float, sq_horizon: float, batch_size: int) -> dict[str, float]:
    """``torch.optim.RMSprop`` arguments (no momentum): ``lr = B·η₀``, ``alpha = 1 − 1/N_s``."""
    _check(batch_size=batch_size, lr=lr)
    return {"lr": batch_size * lr, "alpha": horizon_to_beta(sq_horizon, batch_size)}


def from_torch_rmsprop(lr: float, alpha: float, batch_size: int) -> dict[str, float]:
    """``optim.RMSprop`` arguments for ``torch.optim.RMSprop(lr, alpha)`` (no momentum)."""
    _check(batch_size=batch_size, lr=lr)
    return {"lr": lr / batch_size, "sq_horizon": beta_to_horizon(alpha, batch_size)}
