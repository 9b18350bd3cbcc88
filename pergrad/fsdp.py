"""Models sharded with FSDP2 (``torch.distributed.fsdp.fully_shard``).

Each rank holds a shard (dim 0) of every parameter as a ``DTensor``. For a call of
:class:`pergrad.PerExample`, pergrad all-gathers the parameters (``unshard``) and keeps them
whole for the forward and backward pass, with FSDP's own gradient reduction off, computes
the sums of its examples' gradients and squares on the whole parameters as for any model,
sums them over the shards' process group, and keeps each rank's shard: ``p.grad`` and
``grad_stats(p).sq_mean`` are ``DTensor``\\ s sharded like ``p``. The parameters are sharded
again when the call ends, and FSDP's settings are restored.

Memory per rank: the whole parameters and the whole sums while a call runs (as for FSDP's
own forward with ``reshard_after_forward=False``), then the shards of the parameters, their
gradients, statistics and optimizer state, each ``1/world`` of the model.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from pergrad.checks import InputError
from pergrad.stats import Sums

_SETTINGS = ("post_forward_mesh_info", "reshard_after_backward", "reduce_grads", "all_reduce_grads")
"""What pergrad sets on each of FSDP's parameter groups for a call, and restores."""


class Sharding:
    """The FSDP2 modules of a model and the process group its parameters are sharded over."""

    def __init__(self, modules: list[nn.Module], group: object):
        self.modules = modules
        self.group = group

    @classmethod
    def find(cls, model: nn.Module) -> Sharding | None:
        """The sharding of ``model``, or ``None`` where no module is ``fully_shard``'ed.

        Raises:
            InputError: a sharding pergrad cannot compute with (several mesh dimensions, a
                placement other than dim-0 shards, a ``DTensor`` outside FSDP's modules).
        """
        from torch.distributed.fsdp import FSDPModule
        from torch.distributed.tensor import DTensor, Shard

        modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
        sharded = [(n, p) for n, p in model.named_parameters() if isinstance(p, DTensor)]
        if not modules:
            if sharded:
                raise InputError(
                    f"model: parameter '{sharded[0][0]}' is a DTensor outside FSDP's "
                    f"fully_shard (tensor parallelism), which pergrad cannot form per-example "
                    f"gradients of. Shard the model with fully_shard, or use "
                    f"DistributedDataParallel."
                )
            return None
        meshes = {tuple(p.device_mesh.mesh.flatten().tolist()): p for _, p in sharded}
        for name, p in sharded:
            if p.device_mesh.ndim != 1 or tuple(p.placements) != (Shard(0),):
                raise InputError(
                    f"model: parameter '{name}' is sharded as {tuple(p.placements)} over a "
                    f"{p.device_mesh.ndim}-D mesh; pergrad computes with FSDP2's dim-0 shards "
                    f"over one mesh dimension. Use fully_shard with a 1-D mesh."
                )
        if len(meshes) > 1:
            raise InputError(
                f"model: its parameters are sharded over the ranks {sorted(meshes)}; pergrad "
                f"sums the statistics over one group of ranks. Shard every module over the "
                f"same ranks."
            )
        mesh = next(iter(meshes.values())).device_mesh
        for module in modules:
            if not all(hasattr(g, s) for g in _groups(module) for s in _SETTINGS):
                raise InputError(
                    "model: this torch's FSDP2 keeps its settings where pergrad does not look; "
                    "pergrad cannot run it. Use DistributedDataParallel, or another torch."
                )
        return cls(modules, mesh.get_group())

    @contextmanager
    def unsharded(self) -> Iterator[None]:
        """Whole parameters, no resharding and no gradient reduction by FSDP, while entered."""
        groups = [group for module in self.modules for group in _groups(module)]
        saved = [(group, {name: getattr(group, name) for name in _SETTINGS}) for group in groups]
        try:
            for group, _ in saved:
                group.post_forward_mesh_info = None
                group.reshard_after_backward = False
                group.reduce_grads = group.all_reduce_grads = False
            for module in self.modules:
                module.unshard()
            yield
        finally:
            for module in self.modules:
                module.reshard()
            for group, settings in saved:
                for name, value in settings.items():
                    setattr(group, name, value)

    def reduce_dtypes(self, params: dict[str, Tensor]) -> dict[str, torch.dtype]:
        """The dtype FSDP reduces each of these whole (unsharded) parameters' gradients in:
        its ``MixedPrecisionPolicy``'s ``reduce_dtype``, else the dtype it computes in
        (``param_dtype``, else the parameter's own)."""
        found = {}
        for module in self.modules:
            for group in _groups(module):
                for fsdp_param in group.fsdp_params:
                    dtype = fsdp_param.reduce_dtype or fsdp_param.param_dtype
                    found[id(fsdp_param.unsharded_param)] = dtype or fsdp_param.orig_dtype
        return {name: found.get(id(p), p.dtype) for name, p in params.items()}

    def shard(self, sums: Sums, model: nn.Module) -> Sums:
        """The rank's shard of the global sums (of whole parameters), as ``DTensor``\\ s over
        the model's sharded parameters, which must be registered again (after
        :meth:`unsharded`)."""
        from torch.distributed.tensor import DTensor

        params = {name: p for name, p in model.named_parameters() if name in sums.params}
        local = Sums(params, sums.count, sums.loss_sum, losses=sums.losses)
        for name, p in params.items():
            for whole, part in ((sums.grad[name], local.grad), (sums.sq[name], local.sq)):
                if isinstance(p, DTensor):
                    mine = _own_rows(whole, p)
                    part[name] = DTensor.from_local(
                        mine, p.device_mesh, p.placements, shape=p.shape, stride=p.stride()
                    )
                else:  # a parameter FSDP left whole (replicated)
                    part[name] = whole
        return local


def _own_rows(whole: Tensor, p) -> Tensor:
    """This rank's rows of ``whole``, as ``fully_shard`` cuts dim 0 (``torch.chunk``)."""
    rank = p.device_mesh.get_local_rank()
    pieces = torch.chunk(whole, p.device_mesh.size(), dim=0)
    shape = p.to_local().shape
    if rank < len(pieces) and pieces[rank].shape == shape:
        return pieces[rank].clone()
    if rank >= len(pieces) and shape[0] == 0:  # a rank past the rows: an empty shard
        return whole.new_zeros(shape)
    raise RuntimeError(
        f"FSDP holds a shard of shape {tuple(shape)} on rank {rank} of a parameter of shape "
        f"{tuple(whole.shape)}, not the dim-0 chunk pergrad expects; report the model."
    )


def _groups(module: nn.Module) -> list:
    """FSDP's parameter groups of ``module``: a list in newer torch, one or none in 2.6."""
    state = module._get_fsdp_state()
    groups = getattr(state, "_fsdp_param_groups", None)
    if groups is None:
        groups = [group for group in [getattr(state, "_fsdp_param_group", None)] if group]
    return list(groups)
