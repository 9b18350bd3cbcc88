"""Operations that draw random numbers: seeing them, and fixing their values.

A mode that runs each example alone (``func``, ``loop``) draws other random numbers than the
batch does, so the two can be compared only with every draw fixed (:mod:`pergrad.alone`).
"""

from __future__ import annotations

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


def _fill(value: Callable[[dict], float]):
    def fixed(func, args, kwargs, out):
        return out.fill_(value(_named(func, args, kwargs)))

    return fixed


def _like(name: str):
    def fixed(func, args, kwargs, out):
        return out.copy_(_named(func, args, kwargs)[name].expand_as(out))

    return fixed


def _normal(func, args, kwargs, out):
    mean = _named(func, args, kwargs).get("mean", 0.0)
    return out.copy_(mean.expand_as(out)) if isinstance(mean, Tensor) else out.fill_(mean)


_FIXED = {
    aten.bernoulli: _fill(lambda a: 1.0),
    aten.bernoulli_: _fill(lambda a: 1.0),
    aten.rand: _fill(lambda a: 0.5),
    aten.rand_like: _fill(lambda a: 0.5),
    aten.uniform_: _fill(lambda a: (a.get("from", 0.0) + a.get("to", 1.0)) / 2),
    aten.randn: _fill(lambda a: 0.0),
    aten.randn_like: _fill(lambda a: 0.0),
    aten.normal: _normal,
    aten.normal_: _normal,
    aten.randint: _fill(lambda a: a.get("low", 0) or 0),
    aten.randint_like: _fill(lambda a: a.get("low", 0) or 0),
    aten.random_: _fill(lambda a: a.get("from", 0) or 0),
    aten.randperm: lambda func, args, kwargs, out: out.copy_(torch.arange(len(out))),
    aten.multinomial: _fill(lambda a: 0),
    aten.exponential_: _fill(lambda a: 1.0 / a.get("lambd", 1.0)),
    aten.geometric_: _fill(lambda a: 1.0),
    aten.log_normal_: _fill(lambda a: float(torch.tensor(a.get("mean", 1.0)).exp())),
    aten.cauchy_: _fill(lambda a: a.get("median", 0.0)),
    aten.poisson: _like("self"),
}
"""For each operation that draws random numbers, what :class:`FixedRandom` writes instead."""


class FixedRandom(TorchDispatchMode):
    """Every random draw fixed, while entered, to a value independent of how many examples a
    call holds: a dropout or Bernoulli mask keeps everything, a uniform draw is its midpoint,
    a normal one its mean, an integer its lowest value, a permutation the identity. The model
    computes a deterministic function with every layer it has.

    Raises:
        InputError: the model draws random numbers with an operation not listed here.
    """

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not (may_draw(func) and draws(func, args, kwargs)):
            return func(*args, **kwargs)
        packet, named = func.overloadpacket, _named(func, args, kwargs)
        if packet is aten.native_dropout:  # (output, mask): everything kept
            x = args[0]
            return x.clone(), torch.ones_like(x, dtype=torch.bool)
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
        return fixed(func, args, kwargs, func(*args, **kwargs))


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
