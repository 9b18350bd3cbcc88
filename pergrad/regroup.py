"""A layer call's rows regrouped by example, for a rule that reads the batch on dim 0.

Inside a model, a layer may see the batch's rows flattened into tokens ``(B·T, d)``, cut into
windows, routed to an expert (some tokens of some examples) or reordered. Given the example of
every row (:mod:`pergrad.provenance`), :class:`Regroup` lays them out as ``(B, K, …)``: example
``b``'s rows in order, padded with zeros to the most rows any example has. A padded row adds
nothing to ``g_b = Σ_rows δ_r a_rᵀ`` (its ``δ`` is zero), and an example with no rows gets
``g_b = 0``.
"""

from __future__ import annotations

import torch
from torch import Tensor


class Regroup:
    """Lays out tensors whose leading dimensions are ``leading`` as ``(size, K, …)``, from the
    example ``ids`` of their flattened leading positions."""

    def __init__(self, ids: Tensor, size: int, leading: tuple[int, ...], device: torch.device):
        self.leading = leading
        self.size = size
        counts = torch.bincount(ids, minlength=size)
        self.per_example = int(counts.max()) if len(ids) else 0
        rows = len(ids)
        blocks = torch.arange(size).repeat_interleave(rows // size) if rows % size == 0 else None
        if blocks is not None and torch.equal(ids, blocks):  # B blocks in order: a view
            self.index = None
            return
        order = torch.argsort(ids, stable=True)
        starts = torch.cumsum(counts, 0) - counts
        slot = torch.arange(rows) - starts[ids[order]]
        index = torch.full((size, self.per_example), rows, dtype=torch.long)
        index[ids[order], slot] = order
        self.index = index.to(device)

    def __call__(self, x: Tensor) -> Tensor:
        """``x`` (``*leading, …``) as ``(size, K, …)``."""
        rest = x.shape[len(self.leading) :]
        flat = x.reshape(-1, *rest)
        if self.index is None:
            return flat.view(self.size, -1, *rest)
        return torch.cat([flat, flat.new_zeros(1, *rest)])[self.index]

    def aligned(self, x: object) -> bool:
        """Whether ``x`` is a tensor whose leading dimensions are the call's positions."""
        return isinstance(x, Tensor) and tuple(x.shape[: len(self.leading)]) == self.leading
