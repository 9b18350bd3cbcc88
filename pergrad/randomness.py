"""Operations that draw random numbers: seeing them, and fixing their values.

A mode that runs each example alone (``func``, ``loop``) draws other random numbers than the
batch does, so the two can be compared only with every draw fixed (:mod:`pergrad.alone`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

from pergrad.checks import InputError

aten = torch.ops.aten


def may_draw(func) -> bool:
    """Whether the aten operation ``func`` may draw random numbers (found once per
    operation: PyTorch tags every one that can)."""
    return torch.Tag.nondeterministic_seeded in func.tags


def draws(func, args: tuple, kwargs: dict) -> bool:
    """Whether this call of an operation that :func:`may_draw` does draw random numbers: not
    a dropout of probability 0, or one outside training (an attention kernel's
    ``dropout_p=0``, ``native_dropout(x, p, train=False)``)."""
    named = _named(func, args, kwargs)
    if "dropout_p" in named:
        return named["dropout_p"] > 0
    if func.overloadpacket is aten.native_dropout:
        return named["p"] > 0 and named["train"] is not False
    return True


class Draws(TorchDispatchMode):
    """Notes the operations that draw random numbers while entered."""

    def __init__(self):
        super().__init__()
        self.found: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if may_draw(func) and draws(func, args, kwargs):
            self.found.append(str(func))
        return func(*args, **kwargs)


def _named(func, args: tuple, kwargs: dict) -> dict:
    """The operation's arguments by name, defaults filled in."""
    schema = func._schema.arguments
    found = {a.name: a.default_value for a in schema if a.has_default_value()}
    found.update(zip((a.name for a in schema), args))
    found.update(kwargs)
    return found


def _fill(low: Callable[[dict], float], high: Callable[[dict], float]):
    """Fill the draw with ``low(arguments)`` or ``high(arguments)``, by the end."""

    def fixed(end: str, named: dict, out: Tensor) -> Tensor:
        return out.fill_((low if end == "low" else high)(named))

    return fixed


def _normal(end: str, named: dict, out: Tensor) -> Tensor:
    mean, std = named.get("mean", 0.0), named.get("std", 1.0)
    value = mean - std if end == "low" else mean + std
    return out.copy_(torch.as_tensor(value, dtype=out.dtype, device=out.device).expand_as(out))


def _poisson(end: str, named: dict, out: Tensor) -> Tensor:
    return out.zero_() if end == "low" else out.copy_(named["self"])


def _randperm(end: str, named: dict, out: Tensor) -> Tensor:
    order = torch.arange(len(out), device=out.device)
    return out.copy_(order if end == "low" else order.flip(0))


def _highest_below_one(named: dict) -> float:
    one = torch.ones((), dtype=torch.float32)
    return float(torch.nextafter(one, torch.zeros(())))


_FIXED = {
    aten.bernoulli: _fill(lambda a: 0.0, lambda a: 1.0),
    aten.bernoulli_: _fill(lambda a: 0.0, lambda a: 1.0),
    aten.rand: _fill(lambda a: 0.0, _highest_below_one),
    aten.rand_like: _fill(lambda a: 0.0, _highest_below_one),
    aten.uniform_: _fill(lambda a: a.get("from", 0.0), lambda a: a.get("to", 1.0)),
    aten.randn: _fill(lambda a: -1.0, lambda a: 1.0),
    aten.randn_like: _fill(lambda a: -1.0, lambda a: 1.0),
    aten.normal: _normal,
    aten.normal_: _normal,
    aten.randint: _fill(lambda a: a.get("low") or 0, lambda a: a["high"] - 1),
    aten.randint_like: _fill(lambda a: a.get("low") or 0, lambda a: a["high"] - 1),
    aten.random_: _fill(
        lambda a: a.get("from") or 0,
        lambda a: a["to"] - 1 if a.get("to") is not None else a.get("from") or 0,
    ),
    aten.randperm: _randperm,
    aten.multinomial: _fill(lambda a: 0, lambda a: a["self"].shape[-1] - 1),
    aten.exponential_: _fill(lambda a: 0.0, lambda a: 2.0 / a.get("lambd", 1.0)),
    aten.geometric_: _fill(lambda a: 1.0, lambda a: max(1.0, round(1 / a["p"]))),
    aten.log_normal_: _fill(
        lambda a: math.exp(a.get("mean", 1.0) - a.get("std", 2.0)),
        lambda a: math.exp(a.get("mean", 1.0) + a.get("std", 2.0)),
    ),
    aten.cauchy_: _fill(
        lambda a: a.get("median", 0.0) - a.get("sigma", 1.0),
        lambda a: a.get("median", 0.0) + a.get("sigma", 1.0),
    ),
    aten.poisson: _poisson,
}
"""For each operation that draws random numbers, what :class:`FixedRandom` writes instead, at
either end of what it draws."""

ENDS = ("low", "high")
"""The two fixings a comparison runs under: each draw at one end of its range, then at the
other (a mask that drops everything, then keeps everything)."""


class FixedRandom(TorchDispatchMode):
    """Every random draw fixed, while entered, to a value that does not depend on how many
    examples a call holds, at one ``end`` of what it draws: ``"low"`` drops every element of a
    dropout or Bernoulli mask, takes a uniform draw's lower bound, a normal one's mean less a
    standard deviation, an integer's lowest value, the identity permutation; ``"high"`` keeps
    every element, takes the upper bound, the mean plus a deviation, the highest integer, the
    reversed permutation. The model computes a deterministic function with every layer and
    every path it has; between the two, a path that a draw opens or closes is taken once each
    way, and a draw that decides which examples combine (a permutation) moves them.

    Raises:
        InputError: the model draws random numbers with an operation not listed here.
    """

    def __init__(self, end: str = "high"):
        super().__init__()
        self.end = end

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not (may_draw(func) and draws(func, args, kwargs)):
            return func(*args, **kwargs)
        packet, named = func.overloadpacket, _named(func, args, kwargs)
        if packet is aten.native_dropout:  # (output, mask), as its backward pass reads them
            x, keep = args[0], self.end == "high"
            mask = torch.full_like(x, keep, dtype=torch.bool)
            return (x / (1 - named["p"]) if keep else torch.zeros_like(x)), mask
        if "dropout_p" in named:  # attention kernels: nothing dropped
            return func(**{**named, "dropout_p": 0.0})
        if packet in (aten.rrelu_with_noise, aten.rrelu_with_noise_):  # the mean slope
            return func(**{**named, "training": False})
        fixed = _FIXED.get(packet)
        if fixed is None:
            raise InputError(
                f"the model draws random numbers with {func}, and pergrad could not follow "
                f"which example each value of it comes from, so it cannot compare each "
                f"example's loss computed alone with its loss in the batch. Draw them with "
                f"dropout, bernoulli, rand or randn, or put the random layers in eval mode."
            )
        return fixed(self.end, named, func(*args, **kwargs))


class RandomState:
    """The random number generators' state when made, so that a pass can draw the same
    random numbers (dropout masks) as another: :meth:`rewind` before each, inside
    :meth:`replays`, which leaves the generators as the pass replayed left them."""

    def __init__(self):
        self.cpu = torch.random.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None

    def rewind(self) -> None:
        torch.random.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)

    @contextmanager
    def replays(self) -> Iterator[None]:
        after = RandomState()
        try:
            yield
        finally:
            after.rewind()
