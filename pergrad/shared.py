"""Outputs shared by the whole batch, such as position embeddings.

A layer whose inputs do not carry the batch (``position_ids`` of shape ``(1, T)`` or ``(T,)``)
gives one output ``u`` for every example, which the model then broadcasts into batched
tensors: ``x + u`` with ``x`` of shape ``(B, T, d)``. Autograd sums the gradient reaching
``u`` over the batch, so no example's own gradient is left. While :class:`Broadcasts` is
active, every element-wise operation of ``u`` with a batched tensor is computed with ``u``
expanded to the batch on dim 0 first: the result is the same, and each example's row of the
expansion receives that example's gradient ``δ_b``.

Rearranging ``u`` first (``permute``, ``unsqueeze``, ``view``: T5's relative attention bias)
is followed, each example's gradient taken back through the rearrangement; ``torch.where``
with a batched mask counts as element-wise. Any other use of ``u`` (indexing it, a matrix
product, a use no operation reports) is recorded, and the layer is then refused; after the
backward pass, the per-example gradients must also add up to the gradient autograd gave ``u``
itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

from pergrad import provenance
from pergrad.checks import agree
from pergrad.local import LocalError

ELEMENTWISE = frozenset(
    f"{prefix}{name}{suffix}"
    for name in ("add", "sub", "mul", "div", "true_divide")
    for prefix, suffix in (("", ""), ("", "_"), ("__", "__"), ("__r", "__"), ("__i", "__"))
) | {"__truediv__", "__rtruediv__", "__itruediv__"}
"""Names of the element-wise operations through which a shared output may meet the batch."""

SAME_VALUES = frozenset({"to", "type_as", "contiguous", "float", "double", "half", "bfloat16"})
"""Operations whose result holds the same values, tracked like the tensor itself."""

REARRANGED = frozenset(
    {"permute", "transpose", "unsqueeze", "squeeze", "view", "reshape", "flatten", "movedim"}
)
"""Operations that rearrange a shared output's values without computing with them: the result
is followed too, and each example's gradient of it is taken back through the rearrangement."""


@dataclass
class SharedOutput:
    """A layer output shared by the batch, and what the forward and backward passes did to it."""

    tensor: Tensor
    example_grads: list[Tensor] = field(default_factory=list)
    total_grad: Tensor | None = None
    misuse: str | None = None
    _per_example: Tensor | None = None

    def release(self) -> None:
        """Drop the tensors (the hooks that hold this object sit on their autograd graph)."""
        self.tensor, self.example_grads, self.total_grad = None, [], None
        self._per_example = None

    def per_example_grad(self, batch_size: int) -> Tensor:
        """``δ_b`` for every example, ``(B, *u.shape)``.

        Raises:
            LocalError: ``u`` was used otherwise than broadcast into the batch.
        """
        if self._per_example is not None:
            return self._per_example
        shape = (batch_size, *self.tensor.shape)
        grads = sum(self.example_grads, self.tensor.new_zeros(shape))
        if self.misuse is None and self.total_grad is not None:
            if not agree(grads.sum(0), self.total_grad):
                self.misuse = "a use that is not broadcast into the batch"
        if self.misuse is not None:
            raise LocalError(
                f"its output, shared by the whole batch, reaches the loss through {self.misuse}"
            )
        self._per_example = grads  # formed after the backward pass: every use has arrived
        return grads


class Broadcasts(TorchFunctionMode):
    """Expands shared outputs to the batch where they meet batched tensors (see module doc)."""

    def __init__(self, batch_size: int, tracker: provenance.Provenance):
        super().__init__()
        self.batch_size = batch_size
        self.tracker = tracker
        self._tracked: dict[int, tuple[Tensor, SharedOutput, object]] = {}  # and back-map
        self._active = False

    def enter(self) -> None:
        """Start watching every operation (once; only the first shared output needs it)."""
        if not self._active:
            self.__enter__()
            self._active = True

    def leave(self) -> None:
        """Stop watching, if watching; forget the tracked tensors."""
        if self._active:
            self.__exit__(None, None, None)
            self._active = False
        self._tracked.clear()

    def track(self, output: Tensor) -> SharedOutput:
        """Follow ``output`` through the rest of the forward pass. It must have an autograd node
        of its own, whose pre-hook sees its gradient as autograd sends it on: after any hook
        the model puts on ``output``, which the per-example gradients must then add up to."""
        shared = SharedOutput(output)
        output.grad_fn.register_prehook(lambda grads: setattr(shared, "total_grad", grads[0]))
        self._tracked[id(output)] = (output, shared, None)
        return shared

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self._tracked:
            return func(*args, **kwargs)
        hits = [i for i, a in enumerate(args) if self._is_tracked(a)]
        nested = [
            a
            for a in (*args, *kwargs.values())
            if isinstance(a, (list, tuple)) and any(self._is_tracked(t) for t in a)
        ]
        in_kwargs = [v for v in kwargs.values() if self._is_tracked(v)]
        if not hits and not nested and not in_kwargs:
            return func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        if len(hits) == 1 and not nested and not in_kwargs:
            index = hits[0]
            tensor, shared, back = self._tracked[id(args[index])]
            other = args[1 - index] if len(args) == 2 else None
            if name in ELEMENTWISE and other is not None and not (index == 0 and _inplace(name)):
                batched = isinstance(other, Tensor) and other.dim() > 0
                expanded = self._expand(tensor, other.shape, shared, back) if batched else None
                if expanded is not None:
                    args = (expanded, args[1]) if index == 0 else (args[0], expanded)
                    return self._attributed(func(*args, **kwargs), shared)
            elif name == "where" and len(args) == 3 and index in (1, 2):  # where(c, u, x)
                others = [a for a in args if isinstance(a, Tensor) and a is not args[index]]
                try:  # the shape of what u meets: everything broadcast together
                    shape = torch.broadcast_shapes(
                        *(a.shape for a in args if isinstance(a, Tensor))
                    )
                except RuntimeError:
                    shape = None
                batched = shape is not None and any(
                    a.dim() == len(shape) and len(a) == self.batch_size for a in others
                )
                expanded = self._expand(tensor, shape, shared, back) if batched else None
                if expanded is not None:
                    args = tuple(expanded if i == index else a for i, a in enumerate(args))
                    return self._attributed(func(*args, **kwargs), shared)
            elif name in SAME_VALUES and index == 0:
                result = func(*args, **kwargs)
                if isinstance(result, Tensor) and result.shape == tensor.shape:
                    self._tracked.setdefault(id(result), (result, shared, back))
                else:
                    shared.misuse = name
                return result
            elif name in REARRANGED and index == 0:
                result = func(*args, **kwargs)
                if isinstance(result, Tensor):
                    self._tracked.setdefault(
                        id(result), (result, shared, _back(func, args, kwargs, tensor, back))
                    )
                return result
        result = func(*args, **kwargs)
        if any(isinstance(x, Tensor) for x in _flat(result)):
            for a in (*[args[i] for i in hits], *in_kwargs, *(t for n in nested for t in n)):
                if self._is_tracked(a):
                    self._tracked[id(a)][1].misuse = f"{name or func!r}"
        return result

    def _attributed(self, result: Tensor, shared: SharedOutput) -> Tensor:
        """Row ``b`` of the expansion receives the gradient of row ``b`` of ``result``: example
        ``b``'s alone if every later use keeps that row example ``b``'s. The row is tagged so
        from here on (elements that come from no example too), so the losses' check sees any
        use that moves it to another example; a result whose rows are not the batch in order
        is a misuse."""
        with self.tracker.paused():
            tag = self.tracker.tag(result)
            shape = tuple(result.shape)
            if provenance.in_order(tag, shape, self.batch_size) and not provenance.unmarked(tag):
                self.tracker.set(result, provenance.batch(len(shape), self.batch_size))
            else:
                shared.misuse = "an operation whose rows are not the batch in order"
        return result

    def _is_tracked(self, x: object) -> bool:
        return isinstance(x, Tensor) and id(x) in self._tracked

    def _expand(self, tensor: Tensor, other, shared: SharedOutput, back) -> Tensor | None:
        """``tensor`` expanded to the batch where ``tensor ⊕ x``, ``x`` of shape ``other``,
        would broadcast it over ``x``'s batch dimension, with a hook that keeps each example's
        gradient (taken back to the shared output's shape through ``back``, where ``tensor``
        rearranges it)."""
        try:
            result = torch.broadcast_shapes(tensor.shape, other)
        except RuntimeError:
            return None
        size = self.batch_size
        if len(other) != len(result) or other[0] != size or result[0] != size:
            return None
        padded = (1,) * (len(result) - tensor.dim()) + tuple(tensor.shape)
        if padded[0] != 1:
            return None
        expanded = tensor.reshape(padded).expand(size, *padded[1:])
        shape = (size, *tensor.shape)
        dtype = shared.tensor.dtype

        def keep(g: Tensor) -> None:
            g = g.reshape(shape)
            shared.example_grads.append((g if back is None else back(g)).to(dtype))

        expanded.register_hook(keep)
        return expanded


def _back(func, args, kwargs, tensor: Tensor, then):
    """``g_b`` of a rearranged shared output, ``(B, *result.shape)``, taken back to
    ``(B, *tensor.shape)`` (and on through ``then``, where ``tensor`` is itself rearranged):
    the rearrangement's vector-Jacobian product for each example."""
    rest = args[1:]

    def back(g: Tensor) -> Tensor:
        primal = tensor.detach()
        _, pull = torch.func.vjp(lambda u: func(u, *rest, **kwargs), primal)
        g = torch.func.vmap(lambda d: pull(d)[0])(g)
        return g if then is None else then(g)

    return back


def _inplace(name: str) -> bool:
    return name.startswith("__i") or (name.endswith("_") and not name.endswith("__"))


def _flat(result: object) -> tuple:
    return tuple(result) if isinstance(result, (list, tuple)) else (result,)
