"""Parameters used in a model's own code, each use at the operation that takes it.

A parameter may be used outside any layer that owns it (``self.dt_proj.weight @ h``,
``x * self.scale`` in a parent module, ``F.conv1d(h, self.conv.weight)``). While :class:`Uses`
is active during the per-layer path's forward pass, every torch function that receives a
watched parameter is seen:

- a function of parameters alone (``W[expert]``, ``W.t()``, ``-torch.exp(A_log)``, a table
  indexed by a buffer, a weight normalized from its direction and norm, ``W.type_as(x)``,
  which reads only ``x``'s dtype) is a *derivation*:
  its result is computed as usual and watched too, with the way to compute it again from
  the parameters;
- any other function is a *use*: the call becomes a layer of its own, an :class:`OpUse`,
  whose per-example gradients the per-layer path forms as for a layer without a rule:
  ``g_b = (∂f(θ, a_b)/∂θ)ᵀ δ_b``, with ``f`` the operation and the derivations before it, on
  each example's rows alone.

Derivations are computed as the model asks, attached to the parameter; uses compute with
their values detached, so autograd gives the parameter no gradient through a recorded use. A
use this mode does not see (a custom autograd Function given a derived tensor, a tensor kept
from an earlier pass) gives it one, and sends it to a whole-model mode, as does a hook the
model puts on a derived tensor. A hook put on any other tensor during the pass is watched:
one that returns a gradient other than the one it received may have moved it between
examples, and sends the model to a whole-model mode.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from pergrad import provenance

Derivation = Callable[[dict[str, Tensor]], Tensor]
"""Computes a watched tensor again from the parameters it comes from (by name)."""


class OpUse(nn.Module):
    """One operation that takes parameters, as a layer: its ``forward(*tensors)`` takes the
    operation's other tensor arguments in order, computes each watched argument again from
    the layer's parameters, and calls the operation."""

    def __init__(
        self, func, spec, leaves: list, slots: dict[int, Derivation], params: dict, batch: int
    ):
        super().__init__()
        self.func, self.spec, self.slots = func, spec, slots
        self.batch = batch  # the batch size, where a derivation expands to it
        self.inputs = [i for i, x in enumerate(leaves) if isinstance(x, Tensor) and i not in slots]
        self.leaves = [None if isinstance(x, Tensor) else x for x in leaves]
        self.name = getattr(func, "__name__", repr(func))
        self.names = {}  # name in the model -> in this layer
        for k, (name, p) in enumerate(params.items()):
            self.names[name] = f"p{k}"
            self.register_parameter(f"p{k}", p)

    def forward(self, *tensors: Tensor):
        leaves = list(self.leaves)
        for i, x in zip(self.inputs, tensors):
            leaves[i] = x
        theta = {name: self._parameters[local] for name, local in self.names.items()}
        rows = tensors[0].shape[0] if tensors and tensors[0].dim() else None
        for i, derive in self.slots.items():
            leaves[i] = _rows(derive(theta), self.batch, rows)
        args, kwargs = pytree.tree_unflatten(leaves, self.spec)
        return self.func(*args, **kwargs)

    def extra_repr(self) -> str:
        return self.name


class Uses(TorchFunctionMode):
    """Watches the parameters ``params`` (name -> parameter) during a forward pass; each use
    is handed to ``record(op_use, tensors, output)``, which returns the output the model
    receives (see the module doc); ``tensors``: the operation's other tensor arguments. Every
    other call goes to ``tracker`` (:meth:`pergrad.provenance.Provenance.call`: recurrent
    kernels run whole)."""

    def __init__(
        self, params: dict[str, Tensor], size: int, tracker: provenance.Provenance, record
    ):
        super().__init__()
        self.params = params
        self.batch = size
        self.tracker = tracker
        self.record = record
        self.changed: list[str] = []
        """Hooks the model put on gradients during the pass that changed one (known after the
        backward pass)."""
        self.unseen: dict[str, str] = {}
        """Parameters with a use pergrad cannot follow, and why."""
        # id -> (the tensor as the model holds it, the parameters it comes from, derivation,
        # its value detached)
        self._watched: dict[int, tuple[Tensor, tuple[str, ...], Derivation, Tensor]] = {
            id(p): (p, (name,), functools.partial(_named, name), p.detach())
            for name, p in params.items()
        }

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is Tensor.register_hook and torch.is_grad_enabled():
            return self._hooked(func, *args, **kwargs)
        if not self._any_watched(args, kwargs) or not torch.is_grad_enabled():
            return self.tracker.call(func, args, kwargs)
        if _in_place(getattr(func, "__name__", "")):  # a parameter's: autograd finds it
            return func(*args, **kwargs)
        if torch._C._functorch.peek_interpreter_stack() is not None:  # in the model's vmap
            return func(*args, **kwargs)  # on the parameter itself: autograd finds it
        leaves, spec = pytree.tree_flatten((args, kwargs))
        hits = [i for i, x in enumerate(leaves) if self._is_watched(x)]
        others = [x for i, x in enumerate(leaves) if isinstance(x, Tensor) and i not in hits]
        names = tuple(dict.fromkeys(n for i in hits for n in self._watched[id(leaves[i])][1]))
        slots = {i: self._watched[id(leaves[i])][2] for i in hits}
        converted = func in _CONVERSIONS and hits == [0]  # W.type_as(x), not x.type_as(W)
        if converted or all(map(self._constant, others)):
            output = func(*args, **kwargs)
            self._derived(func, leaves, spec, slots, names, output)
            return output
        values = list(leaves)
        for i in hits:
            values[i] = self._watched[id(leaves[i])][3]
        a, kw = pytree.tree_unflatten(values, spec)
        output = func(*a, **kw)
        if not any(isinstance(x, Tensor) and x.is_floating_point() for x in _flat(output)):
            return output  # nothing reaches the parameters through it
        params = {name: self.params[name] for name in names}
        op = OpUse(func, spec, leaves, slots, params, self.batch)
        return self.record(op, tuple(others), output)

    def _hooked(self, register, tensor: Tensor, hook, *args, **kwargs):
        """``tensor.register_hook(hook)``, the hook watched: one that returns a gradient other
        than the one it received (``lambda g: g.flip(0)``) may have moved it between examples,
        which no one example's backward pass sees (FSDP's own hooks return it unchanged)."""

        if self._is_watched(tensor):  # its gradient comes from the uses pergrad records
            for name in self._watched[id(tensor)][1]:
                self.unseen[name] = "a hook on a tensor computed from it"

        def watched(grad: Tensor):
            found = hook(grad)
            if found is not None and found is not grad:
                self.changed.append(getattr(hook, "__qualname__", repr(hook)))
            return found

        return register(tensor, watched, *args, **kwargs)

    def _derived(self, func, leaves: list, spec, slots: dict, names: tuple, result) -> None:
        """Watch ``result``, a function of parameters and constants, with its derivation."""

        def again(theta: dict[str, Tensor]) -> object:
            new = list(leaves)
            for j, derive in slots.items():
                new[j] = derive(theta)
            a, kw = pytree.tree_unflatten(new, spec)
            return func(*a, **kw)

        several = isinstance(result, (list, tuple))
        for k, x in enumerate(_flat(result)):
            if isinstance(x, Tensor) and x.is_floating_point():
                derive = (lambda theta, k=k: again(theta)[k]) if several else again
                self._watched[id(x)] = (x, names, derive, x.detach())

    def _constant(self, x: Tensor) -> bool:
        """Whether ``x`` holds no example's data and no gradient reaches it."""
        if x.requires_grad:
            return False
        with self.tracker.paused():
            return provenance.unmarked(self.tracker.tag(x))

    def _is_watched(self, x: object) -> bool:
        found = self._watched.get(id(x)) if isinstance(x, Tensor) else None
        return found is not None and found[0] is x

    def _any_watched(self, args: tuple, kwargs: dict) -> bool:
        for x in (*args, *kwargs.values()):
            if isinstance(x, Tensor):
                if self._is_watched(x):
                    return True
            elif isinstance(x, (list, tuple)) and any(map(self._is_watched, x)):
                return True
        return False


_CONVERSIONS = frozenset({Tensor.type_as, Tensor.to})
"""Functions that read only the dtype and device of their other tensors (``W.type_as(x)``)."""


def _rows(value: Tensor, batch: int, rows: int | None) -> Tensor:
    """A derivation that expanded a parameter to the batch (``cls.expand(B, -1, -1)``: every
    row the same memory, whatever the parameter) replayed on ``rows`` rows: as many of its
    rows."""
    if rows is None or rows == batch or not value.dim():
        return value
    if value.shape[0] == batch and value.stride(0) == 0:
        return value[:rows]
    return value


def _named(name: str, theta: dict[str, Tensor]) -> Tensor:
    return theta[name]


def _in_place(name: str) -> bool:
    return (
        name == "__setitem__"
        or name.startswith("__i")
        or (name.endswith("_") and not name.endswith("__"))
    )


def _flat(result: object) -> tuple:
    return tuple(result) if isinstance(result, (list, tuple)) else (result,)
