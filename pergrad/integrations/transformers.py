"""``PerExampleTrainer``: Hugging Face's ``Trainer``, with per-example statistics.

Every micro-batch runs :meth:`pergrad.PerExample.backward` instead of ``loss.backward()``, so
``p.grad`` and ``p.grad_stats`` accumulate over the micro-batches of one optimizer step as
over one batch of all their examples (no ``1/accumulation`` scaling of anything), summed over
data-parallel ranks where the model is wrapped in ``DistributedDataParallel`` (as ``accelerate
launch`` and ``torchrun`` do). Clipping to ``max_grad_norm`` goes through
:func:`pergrad.clip_grad_norm_`, which scales the statistics with the gradients, and the loss
is logged as ``Trainer`` logs it: the mean over the step's examples.

>>> trainer = PerExampleTrainer(
...     model=model, args=TrainingArguments("out", gradient_accumulation_steps=4),
...     train_dataset=dataset, per_example_loss=pergrad.losses.causal_lm,
...     optimizers=(optim.Adam(model.parameters(), lr=1e-4), None),
... )
>>> trainer.train()
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from transformers import Trainer

from pergrad import stats
from pergrad.checks import InputError
from pergrad.engine import PerExample


class PerExampleTrainer(Trainer):
    """A ``transformers.Trainer`` whose backward pass is :meth:`pergrad.PerExample.backward`.

    Args:
        per_example_loss: ``loss_fn(output, labels) -> (B,)``, one loss per example, e.g.
            :func:`pergrad.losses.causal_lm`. ``labels`` is the batch's first label column
            (``args.label_names``, ``"labels"`` by default), taken out of the model's inputs.
        engine_options: keyword arguments of :class:`pergrad.PerExample` (``mode``,
            ``chunk_size``, ``max_example_norm``).
        *args: ``Trainer``'s positional arguments.
        **kwargs: ``Trainer``'s keyword arguments; among them ``optimizers``, ``(optimizer,
            scheduler)`` as for ``Trainer``, whose optimizer must read pergrad's statistics:
            an ``optim`` optimizer.

    Raises:
        InputError: no ``per_example_loss`` or no optimizer given, ``fp16`` asked for
            (its loss scaling needs ``loss.backward()``; use ``bf16``), or a loss setting
            that ``per_example_loss`` would bypass (label smoothing, ``compute_loss_func``,
            a ``compute_loss`` override).
    """

    def __init__(
        self,
        *args: Any,
        per_example_loss: Callable[[Any, Tensor], Tensor] | None = None,
        engine_options: dict[str, Any] | None = None,
        **kwargs: Any,
    ):
        if per_example_loss is None:
            raise InputError(
                "PerExampleTrainer needs per_example_loss=: one loss per example, e.g. "
                "pergrad.losses.causal_lm for a language model"
            )
        optimizer = (kwargs.get("optimizers") or (None, None))[0]
        if optimizer is None:
            raise InputError(
                "PerExampleTrainer needs optimizers=(optimizer, scheduler_or_None) with an "
                "optimizer that reads pergrad's statistics, e.g. "
                "optim.Adam(model.parameters(), lr=1e-4)"
            )
        super().__init__(*args, **kwargs)
        if self.args.fp16:
            raise InputError(
                "PerExampleTrainer cannot use fp16=True: its loss scaling runs through "
                "loss.backward(). Use bf16=True, which needs no scaling."
            )
        dropped = {
            "args.label_smoothing_factor": self.args.label_smoothing_factor != 0,
            "compute_loss_func": self.compute_loss_func is not None,
            "an override of compute_loss": type(self).compute_loss is not Trainer.compute_loss,
        }
        if any(dropped.values()):
            names = ", ".join(name for name, set_ in dropped.items() if set_)
            raise InputError(
                f"PerExampleTrainer computes the loss with per_example_loss alone, so {names} "
                f"would be ignored. Put it into per_example_loss (one loss per example)."
            )
        self.per_example_loss = per_example_loss
        self.engine_options = dict(engine_options or {})
        self._engines: dict[int, PerExample] = {}

    def engine(self, model: nn.Module) -> PerExample:
        """The :class:`pergrad.PerExample` that runs ``model`` (one per model object)."""
        key = id(model)
        if key not in self._engines:
            self._engines[key] = PerExample(model, self.per_example_loss, **self.engine_options)
        return self._engines[key]

    def training_step(
        self,
        model: nn.Module,
        inputs: dict[str, Tensor | Any],
        num_items_in_batch: Tensor | int | None = None,
    ) -> Tensor:
        """Accumulate one micro-batch's per-example statistics; return its mean loss divided
        by the micro-batches of this step, as ``Trainer`` logs it."""
        model.train()
        inputs = dict(self._prepare_inputs(inputs))
        label = self.label_names[0] if self.label_names else "labels"
        if label not in inputs:
            raise InputError(
                f"the batch has no '{label}' column for per_example_loss: give the dataset or "
                f"its collator one, or name it in TrainingArguments(label_names=[...])"
            )
        labels = inputs.pop(label)
        with self.compute_loss_context_manager():
            loss = self.engine(model).backward(inputs, labels)
        return loss.detach() / self.current_gradient_accumulation_steps

    def _clip_grad_norm(self, model: nn.Module) -> Tensor:
        """Clip to ``max_grad_norm`` with :func:`pergrad.clip_grad_norm_`, which scales the
        statistics with the gradients; return the norm before clipping."""
        return stats.clip_grad_norm_(model.parameters(), self.args.max_grad_norm)

    def _get_grad_norm(self, model: nn.Module, grad_norm: Tensor | float | None = None) -> float:
        """The norm of the mean gradients, without touching them."""
        if grad_norm is None:
            with torch.no_grad():
                norms = [p.grad.float().norm() for p in model.parameters() if p.grad is not None]
                grad_norm = torch.stack(norms).norm() if norms else torch.zeros(())
        value = float(grad_norm)
        return value if math.isfinite(value) else float("nan")
