"""``PerExample``: per-example gradients and their statistics for any ``nn.Module``."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import nullcontext
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from pergrad import checks, distributed, fsdp, randomness, stats, wrappers
from pergrad import inputs as batch
from pergrad import verify as verification
from pergrad.auto import Auto, OneMode
from pergrad.fallback import warn
from pergrad.modes import MODES
from pergrad.reduce import GRADS, Quantity, Values
from pergrad.structure import Structure

LossFn = Callable[[Any, Tensor], Tensor]
Inputs = Tensor | Sequence[Tensor] | Mapping[str, Tensor]


class PerExample:
    """Per-example gradients ``g_b = ∇_Φ loss_fn(model(x_b), y_b)`` of a model's parameters.

    The model is wrapped, not copied: its own parameters receive ``.grad`` and the statistics.

    Args:
        model: any ``nn.Module``. Its trainable parameters (``requires_grad=True``) get
            per-example gradients; a tied parameter appears once, under its first name. A
            ``DistributedDataParallel`` wrapper is seen through: pergrad runs the module it
            wraps and sums over its process group (DDP's own reducer never runs). A
            ``torch.compile``'d model runs uncompiled, with a warning. ``DataParallel``,
            DeepSpeed and FSDP's first version are refused (:mod:`pergrad.wrappers`).
        loss_fn: ``loss_fn(output, target) -> Tensor`` of shape ``(B,)``, one loss per example,
            e.g. ``nn.CrossEntropyLoss(reduction="none")``.
        mode: ``"func"`` (``torch.func`` ``vmap(grad)``), ``"hooks"`` (Opacus hooks), ``"loop"``
            (one backward per example), or ``"auto"``. With ``"auto"``, :meth:`backward` and
            :meth:`grads` work layer by layer from one batched backward pass
            (:mod:`pergrad.layerwise`): a per-layer rule, or ``torch.func`` over a layer
            without one. Any parameter neither covers gets its per-example gradients from the
            first of the three whole-model modes that runs the model, chosen when first needed
            and announced by a :class:`FallbackWarning`.
        chunk_size: at most this many examples' gradients exist at once; ``None`` for the
            whole batch. Results do not depend on it.
        process_group: a ``torch.distributed`` process group (``torch.distributed.group.WORLD``
            for all ranks). :meth:`backward` then sums the statistics over the group, so
            every rank holds those of the global batch, its share of which may be uneven or
            empty. Every rank must call :meth:`backward` alike; the first call checks that the
            ranks start from the same parameters. ``None`` with a DDP-wrapped model: the
            wrapper's group.
        max_example_norm: ``C``: :meth:`backward` clips every example's gradient to norm ``C``
            (over all trainable parameters) before forming the statistics,
            ``g_b ← g_b · min(1, C / ‖g_b‖)``, as DP-SGD and robust training need; ``grads()``
            still returns the gradients as they are. ``‖g_b‖²`` comes from the rules' closed
            forms where they have one (``|δ_b|²·|a_b|²`` for a ``Linear`` on ``(B, in)``, an
            ``Embedding``), else from per-example gradients formed a few examples at a time;
            the clipped moments from the rules' moments with each ``δ_b`` scaled by ``c_b``.
            It keeps every layer's ``δ`` until the backward pass ends.
        verify: check every call against autograd, ``Σ_b c_b g_b = ∇ Σ_b c_b ℓ_b`` for
            distinct weights ``c_b`` (:mod:`pergrad.verify`), raising
            :class:`pergrad.VerificationError` where they disagree; about 2–3× the cost.
            ``None``: on where the environment variable ``PERGRAD_VERIFY`` is ``1`` (the test
            suite sets it).

    Example:
        >>> engine = PerExample(model, nn.CrossEntropyLoss(reduction="none"))
        >>> grads = engine.grads(x, y)        # {name: (B, *param.shape)}
        >>> loss = engine.backward(x, y)      # p.grad = mean, p.grad_stats = (n, mean of squares)
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        *,
        mode: str = "auto",
        chunk_size: int | None = None,
        process_group: object | None = None,
        max_example_norm: float | None = None,
        verify: bool | None = None,
    ):
        checks.model_and_loss(model, loss_fn)
        if mode != "auto" and mode not in MODES:
            raise ValueError(f"Invalid mode: {mode!r}; choose 'auto' or one of {sorted(MODES)}")
        if chunk_size is not None:
            checks.positive_int("chunk_size", chunk_size, "use None or an int >= 1")
        if max_example_norm is not None:
            checks.positive_number("max_example_norm", max_example_norm, "use None or a number > 0")
        if verify is not None and not isinstance(verify, bool):
            raise TypeError(f"verify must be True, False or None, got {verify!r}")
        unwrapped = wrappers.unwrap(model)
        if process_group is not None:
            distributed.check_initialized(process_group)
        self._sharding = fsdp.Sharding.find(unwrapped.module)
        wrapper_group = unwrapped.process_group
        if self._sharding is not None:
            wrapper_group = self._sharding.group
        process_group = wrappers.check_group(process_group, wrapper_group)
        self._warned_compiled = False
        if unwrapped.compiled:
            self._warn_compiled()
        self.model = model
        self._module = unwrapped.module
        self._prefix = unwrapped.prefix
        self.process_group = process_group
        self._ranks_checked = False
        self.loss_fn = loss_fn
        self.chunk_size = chunk_size
        self.max_example_norm = max_example_norm
        self.verify = verification.enabled(verify)
        """Whether every call is checked against autograd (:mod:`pergrad.verify`)."""
        self._structure: Structure | None = None
        self._compute = (
            Auto(self._module, loss_fn)
            if mode == "auto"
            else OneMode(MODES[mode](self._module, loss_fn))
        )
        self.last_losses: Tensor | None = None
        """Per-example losses ``(B,)`` of the last call, detached."""
        self.sources: dict[str, str] = {}
        """Where each parameter's numbers came from in the last call: the layer type whose
        per-layer rule computed them (``"Linear"``, ...), that type followed by ``" (local)"``
        (``torch.func`` over that layer alone), a torch function followed by ``" (op)"`` (a
        use at that operation, :mod:`pergrad.uses`), several joined by ``"+"`` (a parameter
        used by several layers), ``"unused"``, or the whole-model mode (``"func"``, ...)."""

    @property
    def mode(self) -> str:
        """The mode in use: the one requested; with ``"auto"``, ``"auto"`` until the first
        call, then ``"layerwise"`` (rules and layer-local ``torch.func``), or the whole-model
        mode chosen for what those do not cover."""
        return self._compute.mode

    def grads(self, inputs: Inputs, target: Tensor) -> dict[str, Tensor]:
        """Per-example gradients, ``{name: Tensor of shape (B, *param.shape)}``.

        Leaves ``.grad`` and the statistics untouched.

        Raises:
            TypeError, ValueError: bad inputs, loss or model; the message says what to do.
            FloatingPointError: some per-example gradient is NaN or infinite.
        """
        with self._whole_parameters():
            structure, chunks = self._prepare(inputs, target)
            params = structure.params
            results = [self._chunk(structure, x, y, GRADS) for x, y in chunks]
        if len(results) == 1:
            values, self.last_losses = results[0]
            grads = {name: values[name] for name in params}  # in the model's order
        else:
            grads = {name: torch.cat([g[name] for g, _ in results]) for name in params}
            self.last_losses = torch.cat([losses for _, losses in results])
        # in each parameter's own dtype, as .grad is (autocast computes some in lower precision)
        grads = {self._prefix + name: g.to(params[name].dtype) for name, g in grads.items()}
        checks.finite(grads, "per-example gradients")
        return grads

    def backward(self, inputs: Inputs, target: Tensor) -> Tensor:
        """Accumulate ``ĝ = mean_b g_b`` into ``p.grad`` and ``(n, mean_b g_b²)`` into
        ``p.grad_stats`` for every trainable parameter, chunk by chunk, and return the mean loss.

        Calling it again before the statistics are cleared accumulates: two halves of a batch
        leave what the whole batch would. Clear with ``optimizer.zero_grad()`` of an ``optim``
        optimizer or :meth:`zero_grad`.

        Raises:
            TypeError, ValueError: bad inputs, loss or model; the message says what to do.
            FloatingPointError: a gradient statistic is NaN or infinite; nothing is accumulated.
        """
        grouped = self.process_group is not None

        def this_rank() -> stats.Sums:
            structure, chunks = self._prepare(inputs, target, allow_empty=grouped)
            sums = stats.Sums(structure.params)
            moments = Quantity("moments", self.max_example_norm)
            for x, y in chunks:
                sums.add(*self._chunk(structure, x, y, moments))
            return sums

        with self._whole_parameters():
            sums = distributed.gathered(
                this_rank,
                self.process_group,
                self._ranks_checked,
                lambda: checks.trainable(self._module),
                self._reduce_dtypes(),
            )
            self._ranks_checked = grouped
            self.last_losses = sums.last_losses
            sums.check_finite()
        if self._sharding is not None:  # each rank keeps its shard of the global sums
            sums = self._sharding.shard(sums, self._module)
        sums.merge_into()
        return sums.mean_loss

    def zero_grad(self) -> None:
        """Clear ``.grad`` and the per-example statistics of every parameter of the model."""
        stats.zero_grad(self.model.parameters())

    def _verify(
        self, structure: Structure, inputs: batch.Inputs, target: Tensor, chunk, random
    ) -> None:
        """Check a chunk's values against autograd (:mod:`pergrad.verify`), each pass drawing
        the random numbers (dropout) the chunk's pass drew."""
        moments = None if isinstance(next(iter(chunk.values.values())), Tensor) else chunk.values
        grads = chunk.values
        if moments is not None:
            random.rewind()
            grads = self._compute(structure, inputs, target, GRADS).values
            verification.moments(moments, grads, self.max_example_norm)
        params = structure.params
        # each example alone draws other random numbers than the batch: those are checked
        # with every draw fixed (pergrad.alone)
        alone_drawn = {
            n: p
            for n, p in params.items()
            if chunk.random and chunk.sources[n] in verification.ALONE
        }
        drawn_in_batch = {n: p for n, p in params.items() if n not in alone_drawn}
        random.rewind()
        verification.against_autograd(
            self._module, self.loss_fn, inputs, target, drawn_in_batch, grads, chunk.sources
        )
        if alone_drawn:
            with torch.enable_grad(), randomness.FixedRandom():
                fixed, _ = self._compute.whole_model_mode(alone_drawn, inputs, target)
                verification.against_autograd(
                    self._module, self.loss_fn, inputs, target, alone_drawn, fixed, chunk.sources
                )

    def _reduce_dtypes(self) -> dict[str, torch.dtype] | None:
        """Under FSDP2, the dtype its policy reduces each parameter's gradients in
        (:meth:`pergrad.fsdp.Sharding.reduce_dtypes`); else ``None``: each its own."""
        if self._sharding is None:
            return None
        return self._sharding.reduce_dtypes(checks.trainable(self._module))

    def _whole_parameters(self):
        """For a model sharded with FSDP2, its parameters whole while entered
        (:mod:`pergrad.fsdp`)."""
        return nullcontext() if self._sharding is None else self._sharding.unsharded()

    def _warn_compiled(self) -> None:
        if not self._warned_compiled:
            self._warned_compiled = True
            warn(
                "pergrad: the model is compiled by torch.compile. pergrad runs it uncompiled "
                "for per-example statistics (its per-layer hooks cannot run inside a compiled "
                "graph); the compiled model is unchanged for your other calls."
            )

    def _prepare(
        self, inputs: Inputs, target: Tensor, allow_empty: bool = False
    ) -> tuple[Structure, Iterator[tuple[batch.Inputs, Tensor]]]:
        inputs, size = checks.batch(inputs, target, allow_empty)
        known = self._structure
        structure = self._structure = Structure(self._module) if known is None else known.current()
        structure.check()
        if structure.compiled:
            self._warn_compiled()
        step = self.chunk_size or size
        if step >= size:  # one chunk: the batch as it is
            return structure, iter([(inputs, target)] if size else [])
        chunks = (
            (batch.rows(inputs, slice(start, start + step)), target[start : start + step])
            for start in range(0, size, step)
        )
        return structure, chunks

    def _chunk(
        self, structure: Structure, inputs: batch.Inputs, target: Tensor, quantity: Quantity
    ) -> tuple[Values, Tensor]:
        """For one chunk, each parameter's ``quantity`` (per-example gradients, or the moments
        of the gradients clipped to ``max_example_norm``) and the losses (:mod:`pergrad.auto`)."""
        eager = torch.compiler.set_stance("force_eager") if structure.compiled else nullcontext()
        with eager:
            random = randomness.RandomState() if self.verify else None
            chunk = self._compute(structure, inputs, target, quantity)
            if random is not None and _finite(chunk.values):  # else check_finite says so
                with random.replays():
                    self._verify(structure, inputs, target, chunk, random)
        self.sources = {self._prefix + name: source for name, source in chunk.sources.items()}
        return chunk.values, chunk.losses


def _finite(values: Values) -> bool:
    """Whether every per-example gradient or moment is finite."""
    leaves = pytree.tree_leaves(values)
    return all(bool(torch.isfinite(t._values() if t.is_sparse else t).all()) for t in leaves)
