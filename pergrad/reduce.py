"""Every reduction of per-example gradients, and the quantity a computation is asked for.

Per-example gradients ``g_b`` (``(B, *shape)`` per parameter) reduce to their moments
``(Σ_b g_b, Σ_b g_b²)``, or to each example's squared norm ``|g_b|²``; clipping scales each
``g_b`` by ``c_b = min(1, C / ‖g_b‖)`` first. Formed a few examples at a time, never more than
about :data:`CHUNK_ELEMENTS` numbers are held at once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor


class Moments(NamedTuple):
    """The sums of one parameter's per-example gradients ``g_b`` (clipped: ``c_b·g_b``) over
    a set of examples."""

    grad_sum: Tensor
    """``Σ_b g_b``, shaped as the parameter."""
    sq_sum: Tensor
    """``Σ_b g_b²``, elementwise, shaped as the parameter."""


Values = dict[str, "Tensor | Moments"]
"""Per parameter: per-example gradients ``(B, *shape)``, their :class:`Moments`, or ``|g_b|²``
``(B,)``, as a :class:`Quantity` asks."""

GradsFn = Callable[[int, int], dict[str, Tensor]]
"""``grads(start, stop)``: the per-example gradients of examples ``start:stop``."""

CHUNK_ELEMENTS = 1 << 24
"""Per-example gradients are formed at most about this many numbers at a time."""

REDUCE_ELEMENTS = 1 << 20
"""Where per-example gradients are reduced as they are formed, about this many numbers at a
time: few enough to stay in the processor's cache and reuse memory, which on one CPU made the
reduction of a sequence ``Linear`` 4 times faster than forming 16 M at once."""


@dataclass(frozen=True)
class Quantity:
    """What a computation gives for each parameter.

    Attributes:
        kind: ``"grads"``, the per-example gradients ``(B, *shape)``; ``"moments"``,
            ``(Σ_b c_b g_b, Σ_b c_b² g_b²)``; ``"norms"``, ``|g_b|²`` ``(B,)``, whose sum over
            the parameters clipping needs.
        max_norm: for moments, ``C`` of ``c_b = min(1, C / ‖g_b‖)`` (``‖·‖`` over every
            parameter); ``None``: ``c_b = 1``.
    """

    kind: str
    max_norm: float | None = None

    @property
    def per_example(self) -> bool:
        return self.kind == "grads"

    def of(self, grads: dict[str, Tensor], scale: Tensor | None = None) -> Values:
        """The quantity of whole per-example gradients; ``scale``: the factors ``c_b`` of
        moments."""
        if self.per_example:
            return grads
        if self.kind == "norms":
            return {name: sq_norms_of(g) for name, g in grads.items()}
        return moments(grads, scale)

    def zeros(self, like: Tensor, size: int) -> Tensor | Moments:
        """The quantity of ``size`` zero gradients shaped as ``like``."""
        if self.per_example:
            return like.new_zeros(size, *like.shape)
        if self.kind == "norms":
            return like.new_zeros(size)
        return Moments(torch.zeros_like(like), torch.zeros_like(like))

    def in_chunks(self, grads: GradsFn, size: int, numel: int) -> Values:
        """The quantity of the per-example gradients ``grads(start, stop)`` of ``size``
        examples (``numel`` numbers each), formed a few examples at a time."""
        if self.per_example:
            return grads(0, size)
        limit = CHUNK_ELEMENTS if self.kind == "moments" else REDUCE_ELEMENTS
        return self.joined(grads(i, j) for i, j in chunks(size, numel, limit))

    def joined(self, parts: Iterable[dict[str, Tensor]], in_place: bool = False) -> Values:
        """The quantity of per-example gradients given a few examples at a time, in order;
        ``in_place``: each part's tensors are held by nothing else, so moments may square them
        in place."""
        found: dict[str, list] = {}
        total: dict[str, Moments] = {}
        for part in parts:
            for name, g in part.items():
                if self.kind == "moments":
                    more = moments_in_place(g) if in_place else moments_of(g)
                    total[name] = add_moments(total.get(name), more)
                else:
                    found.setdefault(name, []).append(g if self.per_example else sq_norms_of(g))
        if self.kind == "moments":
            return total
        return {name: torch.cat(got) if len(got) > 1 else got[0] for name, got in found.items()}


GRADS = Quantity("grads")
NORMS = Quantity("norms")


def chunks(size: int, numel: int, limit: int = CHUNK_ELEMENTS) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` of consecutive example ranges of at most ``limit`` numbers each."""
    width = max(1, limit // max(1, numel))
    for start in range(0, size, width):
        yield start, min(size, start + width)


HALF = (torch.float16, torch.bfloat16)


def _summable(grads: Tensor) -> Tensor:
    """Per-example gradients in a precision to sum them in: half precision in float32."""
    return grads.float() if grads.dtype in HALF else grads


def moments_of(grads: Tensor, scale: Tensor | None = None) -> Moments:
    """``(Σ_b g_b, Σ_b g_b²)`` of per-example gradients ``(B, *shape)``; with ``scale``
    (``(B,)``), those of ``c_b·g_b``: ``(Σ_b c_b g_b, Σ_b c_b² g_b²)``; half precision summed
    in float32."""
    grads = _summable(grads)
    if scale is None:
        return Moments(grads.sum(0), grads.square().sum(0))
    return Moments(
        torch.tensordot(scale.to(grads.dtype), grads, dims=1),
        torch.tensordot(scale.square().to(grads.dtype), grads.square(), dims=1),
    )


@torch.no_grad()
def moments(grads: dict[str, Tensor], scale: Tensor | None = None) -> dict[str, Moments]:
    """:func:`moments_of` of every parameter's per-example gradients."""
    return {name: moments_of(g, scale) for name, g in grads.items()}


def moments_in_place(grads: Tensor) -> Moments:
    """:func:`moments_of` for per-example gradients nothing else holds: it squares ``grads``
    in place."""
    grads = _summable(grads)
    grad_sum = grads.sum(0)
    return Moments(grad_sum, grads.square_().sum(0))


def chunked_moments_in_place(grads: Iterator[Tensor]) -> Moments:
    """``(Σ_b g_b, Σ_b g_b²)`` of per-example gradients given a chunk at a time, each chunk a
    tensor nothing else holds (:func:`moments_in_place` squares it)."""
    total = None
    for g in grads:
        part = moments_in_place(g)
        if total is None:
            total = part
        else:
            total.grad_sum.add_(part.grad_sum)
            total.sq_sum.add_(part.sq_sum)
    return total


def add_moments(total: Moments | None, more: Moments) -> Moments:
    """The moments of two sets of examples together (``total`` may be ``None``: none yet)."""
    if total is None:
        return more
    return Moments(total.grad_sum + more.grad_sum, total.sq_sum + more.sq_sum)


def sq_norms_of(grads: Tensor) -> Tensor:
    """``|g_b|²`` of per-example gradients ``(B, *shape)``: ``(B,)``."""
    return _summable(grads).flatten(1).square().sum(1)


@torch.no_grad()
def sq_norms(grads: dict[str, Tensor]) -> Tensor | float:
    """``‖g_b‖²`` over all parameters in ``grads``, in float64: ``(B,)`` (0 for none)."""
    return sum(sq_norms_of(g).double() for g in grads.values())


def clip_factors(sq_norms: Tensor, max_norm: float) -> Tensor:
    """``c_b = min(1, max_norm / ‖g_b‖)``: the factor that clips example ``b``'s gradient to
    norm ``max_norm`` (1 for a zero gradient)."""
    norms = sq_norms.sqrt().clamp(min=torch.finfo(torch.float64).tiny)
    return (max_norm / norms).clamp(max=1.0)


def clipped(
    quantity: Quantity, sq_norms: Callable[[], Tensor], values: Callable[[Tensor | None], Values]
) -> Values:
    """``values(scale)``, where clipping takes two steps: ``‖g_b‖²`` over every parameter
    (``sq_norms()``), then the moments of ``c_b·g_b`` for ``c_b = min(1, C / ‖g_b‖)``."""
    if quantity.max_norm is None:
        return values(None)
    scale = clip_factors(sq_norms(), quantity.max_norm)
    return values(scale)
