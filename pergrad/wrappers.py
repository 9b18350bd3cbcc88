"""Models handed to pergrad inside a wrapper: the module pergrad runs, the prefix of its
parameters' names, and the process group a data-parallel wrapper sums over.

- ``DistributedDataParallel``: pergrad runs the module it wraps and sums the statistics over
  the wrapper's process group itself (one flattened all-reduce). DDP's own reducer never
  runs: it is armed only by the wrapper's ``forward``, which pergrad does not call, so it
  neither sums twice nor waits for gradients that never come (``no_sync``, unused parameters
  and ``find_unused_parameters`` change nothing).
- ``torch.compile``'s ``OptimizedModule``: pergrad runs the module it wraps, uncompiled, and
  says so once; a module compiled in place (``model.compile()``) and a compiled submodule
  run eagerly (``torch.compiler.set_stance("force_eager")``) while pergrad computes. Its
  hooks would otherwise be traced into the compiled graph, and the graph break they make
  would leave the module's ``forward`` uncompiled for the rest of the process.
- Wrappers pergrad cannot see through are refused, saying what to do: ``DataParallel``
  (one process drives several devices), DeepSpeed's engine and FSDP's first version. FSDP2
  (``fully_shard``) is :mod:`pergrad.fsdp`'s.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch.distributed as dist
from torch import nn

from pergrad.checks import InputError


@dataclass
class Unwrapped:
    """What :func:`unwrap` found inside a model."""

    module: nn.Module
    """The module pergrad runs: the model itself, or what its wrappers wrap."""
    prefix: str
    """What the wrappers add in front of the module's parameter names (``"module."``)."""
    process_group: object | None
    """The process group of a ``DistributedDataParallel`` wrapper, else ``None``."""
    compiled: bool
    """Whether a ``torch.compile`` wrapper was taken off, or the module is compiled in
    place."""


def unwrap(model: nn.Module) -> Unwrapped:
    """Take off ``DistributedDataParallel`` and ``torch.compile`` wrappers, in any nesting.

    Raises:
        InputError: a wrapper or a sharding pergrad cannot see through, saying what to do.
    """
    prefix, group, compiled = "", None, False
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            prefix, group, model = prefix + "module.", model.process_group, model.module
        elif _compile_wrapper(model):
            prefix, compiled, model = prefix + "_orig_mod.", True, model._orig_mod
        else:
            break
    for name, module in model.named_modules():
        _refuse(name, module)
    return Unwrapped(model, prefix, group, compiled or is_compiled(model))


def is_compiled(model: nn.Module) -> bool:
    """Whether ``model`` is ``torch.compile``'s wrapper of a module, or a module compiled in
    place (``model.compile()``, which compiles its call)."""
    return getattr(model, "_compiled_call_impl", None) is not None or _compile_wrapper(model)


def _compile_wrapper(model: nn.Module) -> bool:
    """Whether ``model`` is ``torch.compile``'s wrapper of a module (``OptimizedModule``)."""
    if "torch._dynamo" not in sys.modules:  # nothing was compiled in this process
        return False
    from torch._dynamo.eval_frame import OptimizedModule

    return isinstance(model, OptimizedModule)


def _refuse(name: str, module: nn.Module) -> None:
    where = f"'{name}' ({type(module).__name__})" if name else type(module).__name__
    if isinstance(module, nn.DataParallel):
        raise InputError(
            f"model: {where} is a torch.nn.DataParallel, which runs one process over several "
            f"devices; pergrad cannot see each device's examples. Use one process per device "
            f"with DistributedDataParallel (torchrun), and pass the DDP-wrapped model."
        )
    if isinstance(module, nn.parallel.DistributedDataParallel):
        raise InputError(
            f"model: {where} is a DistributedDataParallel inside the model. Wrap the whole "
            f"model in DDP, or pass the model without it and process_group=..."
        )
    kinds = {kind.__name__ for kind in type(module).__mro__}
    if "DeepSpeedEngine" in kinds:
        raise InputError(
            f"model: {where} is a DeepSpeed engine, whose gradient reduction and partitioning "
            f"pergrad cannot see through. Pass the module it wraps (engine.module) with "
            f"process_group=torch.distributed.group.WORLD and step an optim optimizer."
        )
    if "FullyShardedDataParallel" in kinds:
        raise InputError(
            f"model: {where} is wrapped by FSDP's first version (FullyShardedDataParallel), "
            f"whose flattened parameters pergrad cannot see through. Shard the model with "
            f"FSDP2's torch.distributed.fsdp.fully_shard instead."
        )


def check_group(given: object | None, wrapper: object | None) -> object | None:
    """The process group to sum over: the one given, the wrapper's, or ``None``.

    Raises:
        InputError: both are given and span different ranks.
    """
    if given is None or wrapper is None or given is wrapper:
        return wrapper if given is None else given
    ours, theirs = dist.get_process_group_ranks(given), dist.get_process_group_ranks(wrapper)
    if ours != theirs:
        raise InputError(
            f"process_group spans ranks {ours}, but the DistributedDataParallel wrapper's "
            f"spans {theirs}: the statistics would be summed over other ranks than the "
            f"gradients. Leave process_group=None to use the wrapper's."
        )
    return given
