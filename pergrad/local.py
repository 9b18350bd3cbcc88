"""Layer-local per-example gradients for a layer without a rule: ``torch.func`` over that layer
alone.

For one call of a layer ``y = f(θ, a)`` on a batch, with output gradients ``δ``, example
``b``'s gradient of the layer's parameters is the vector-Jacobian product
``g_b = (∂f(θ, a_b)/∂θ)ᵀ δ_b``, where ``f(θ, a_b)`` runs the layer's ``forward`` on that
example alone (a batch of one). ``vmap`` over the examples runs all of them at once, a few at
a time. It is right only where the layer's output for example ``b`` is its output for ``a_b``
alone, so every replay's output is compared with the output the batch produced: a layer that
mixes examples or draws random numbers fails that comparison and is refused.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.func import vjp, vmap
from torch.utils import _pytree as pytree

from pergrad.checks import agree


class LocalError(RuntimeError):
    """The layer-local path cannot give this layer's per-example gradients."""


def floating_leaves(output: object) -> list[Tensor]:
    """The floating-point tensors in a layer's output, in ``pytree`` order."""
    return [
        x for x in pytree.tree_leaves(output) if isinstance(x, Tensor) and x.is_floating_point()
    ]


def swap(module: nn.Module, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Make the module's parameters (names relative to it) the given tensors; return the old."""
    old = {}
    for name, tensor in tensors.items():
        submodule_name, _, leaf = name.rpartition(".")
        submodule = module.get_submodule(submodule_name)
        old[name] = submodule._parameters[leaf]
        submodule._parameters[leaf] = tensor
    return old


def forward(module: nn.Module, theta: dict[str, Tensor], args: tuple, kwargs: dict) -> list:
    """The layer's ``forward`` (its own hooks not run) with parameters ``theta``."""
    old = swap(module, theta)
    try:
        return floating_leaves(module.forward(*args, **kwargs))
    finally:
        swap(module, old)


def per_example_grads(
    module: nn.Module,
    names: Sequence[str],
    args: tuple,
    kwargs: dict,
    batched: dict[int | str, int],
    outputs: Sequence[Tensor],
    output_grads: Sequence[Tensor],
) -> dict[str, Tensor]:
    """``g_b`` of the parameters ``names`` for examples whose inputs are ``args``/``kwargs``
    (the entries keyed in ``batched``, positions or keyword names, carry the examples on dim
    0, each example's rows together, as many as ``batched`` says; the others are shared) and
    whose outputs and output gradients the batch gave.

    Raises:
        LocalError: the layer cannot run under ``vmap``, or an example's replayed output
            differs from the batch's.
    """
    theta = {name: module.get_parameter(name).detach() for name in names}
    values = {key: get(args, kwargs, key).unflatten(0, (-1, rows)) for key, rows in batched.items()}

    def one(theta: dict[str, Tensor], values: dict, deltas: list[Tensor]):
        a, k = list(args), dict(kwargs)
        for key, value in values.items():  # one example's rows, as a batch of one
            put(a, k, key, value)
        out, pull = vjp(lambda t: forward(module, t, tuple(a), k), theta)
        if len(out) != len(deltas):
            raise LocalError("its outputs differ in number for one example")
        (grads,) = pull([d.unsqueeze(0).to(o.dtype) for d, o in zip(deltas, out)])
        return grads, [o.squeeze(0) for o in out]

    with _replaying():
        grads, replayed = vmap(one, in_dims=(None, 0, 0), randomness="different")(
            theta, values, list(output_grads)
        )
    _check(outputs, replayed)
    return grads


def grads_by_rows(
    module: nn.Module,
    names: Sequence[str],
    args: tuple,
    kwargs: dict,
    inputs: dict,
    outputs: Sequence[Tensor],
    output_rows: Sequence[tuple[int, Tensor]],
    output_grads: Sequence[Tensor],
    examples: range,
) -> dict[str, Tensor]:
    """``g_b`` for examples ``examples`` of a call whose inputs keyed in ``inputs``, outputs
    and ``δ`` hold examples along one dimension each, ``(dim, example of each index)``: the
    layer run on example ``b``'s rows alone, one example at a time, with autograd (so
    data-dependent code, such as routing tokens to experts, replays too). An example with no
    rows gets zeros.

    Raises:
        LocalError: the layer fails on an example's rows, or its outputs for them differ from
            those rows of the batch's.
    """
    theta = {name: module.get_parameter(name).detach().requires_grad_() for name in names}
    found: dict[str, list[Tensor]] = {name: [] for name in names}
    pick = lambda x, dim, ids, b: x.index_select(dim, (ids == b).nonzero().squeeze(1))  # noqa: E731
    for b in examples:
        a, k = list(args), dict(kwargs)
        for key, (dim, ids) in inputs.items():
            put(a, k, key, pick(get(args, kwargs, key), dim, ids, b))
        expected = [pick(o, dim, ids, b) for o, (dim, ids) in zip(outputs, output_rows)]
        deltas = [pick(d, dim, ids, b) for d, (dim, ids) in zip(output_grads, output_rows)]
        for name, g in replayed_grads(module, theta, tuple(a), k, expected, deltas).items():
            found[name].append(g)
    return {name: torch.stack(gs) for name, gs in found.items()}


def replayed_grads(
    module: nn.Module,
    theta: dict[str, Tensor],
    args: tuple,
    kwargs: dict,
    outputs: Sequence[Tensor],
    output_grads: Sequence[Tensor],
) -> dict[str, Tensor]:
    """The vector-Jacobian product ``(∂f(θ, a)/∂θ)ᵀ δ`` of the layer's ``forward`` run again
    on inputs ``a`` that hold one example's data alone, with autograd (``theta`` requires
    grad): that example's gradient, zeros where no output needs one.

    Raises:
        LocalError: the layer fails on these inputs, or its outputs differ from ``outputs``.
    """
    with _replaying(), torch.enable_grad():
        replayed = forward(module, theta, args, kwargs)
        if len(replayed) != len(outputs):
            raise LocalError("its outputs differ in number for an example's rows")
        _check(outputs, replayed)
        pairs = [(o, d) for o, d in zip(replayed, output_grads) if o.requires_grad]
        grads = (
            torch.autograd.grad(
                [o for o, _ in pairs],
                list(theta.values()),
                [d.to(o.dtype) for o, d in pairs],
                allow_unused=True,
            )
            if pairs
            else [None] * len(theta)
        )
    return {
        name: torch.zeros_like(p) if g is None else g for (name, p), g in zip(theta.items(), grads)
    }


@contextmanager
def _replaying() -> Iterator[None]:
    """No gradients outside ``torch.func``'s own, and any of its errors turned into a
    :class:`LocalError`. ``vjp`` differentiates with respect to the parameters it is given
    whatever the global mode; under ``torch.no_grad`` the layer's other parameters (those of
    its submodules) add no graph to what it returns."""
    try:
        with torch.no_grad():
            yield
    except LocalError:
        raise
    except Exception as error:
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise LocalError(
            f"torch.func cannot replay it: {type(error).__name__}: {first_line}"
        ) from error


def _check(outputs: Sequence[Tensor], replayed: Sequence[Tensor]) -> None:
    for batch, alone in zip(outputs, replayed):
        if batch.shape != alone.shape or not agree(alone.detach(), batch.detach()):
            raise LocalError(
                "its output for one example differs from its output in the batch (it mixes "
                "examples, draws random numbers, or does not carry the batch on dim 0)"
            )


def get(args: Sequence, kwargs: dict, key: int | str):
    """The input at ``key``: a position in ``args`` or a keyword of ``kwargs``."""
    return args[key] if isinstance(key, int) else kwargs[key]


def put(args: list, kwargs: dict, key: int | str, value) -> None:
    """Set the input at ``key`` (see :func:`get`)."""
    if isinstance(key, int):
        args[key] = value
    else:
        kwargs[key] = value
