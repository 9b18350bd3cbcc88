"""PyTorch's own module database as test material nobody here wrote.

``torch.testing._internal.common_modules.module_db`` holds, for every ``nn`` module, the
samples PyTorch's own tests run it on. Each training sample of a module with trainable
parameters becomes a batch of ``B`` examples with the batch on dim 0 (PyTorch's samples put
it on dim 1 for sequence-first layers, or have none): a :class:`Layout` wrapper moves it
where the module takes it. Samples without a batch dimension give one example each (a
batch stacks ``B`` of them, drawn with different seeds); batched ones give their rows. The
loss of example ``b`` is ``Σ out_b · w_b`` over the module's floating outputs, with fixed
random weights ``w`` as the target; an output without the batch (a loss reduced over it)
counts for every example, so that such a module combines examples.

:func:`judge` runs pergrad on one sample and compares with one backward pass per example.
"""

from __future__ import annotations

import collections
import functools
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

import pergrad

SEED = 1000
"""The seed of the first draw of a module's samples; the next draws take the next seeds."""

_RNNS = (nn.RNN, nn.GRU, nn.LSTM)
_TRANSFORMERS = (
    nn.Transformer,
    nn.TransformerEncoder,
    nn.TransformerEncoderLayer,
    nn.TransformerDecoderLayer,
)
_SEQUENCES = (*_RNNS, nn.MultiheadAttention, *_TRANSFORMERS)
_CELLS = (nn.RNNCell, nn.GRUCell, nn.LSTMCell)
_MASKS = frozenset({"attn_mask", "mask", "src_mask", "tgt_mask", "memory_mask"})
WHOLE_MODEL = frozenset({"func", "hooks", "loop"})


@dataclass(frozen=True)
class Case:
    """Sample ``index`` of a module in ``module_db``, in training mode."""

    name: str
    index: int
    desc: str

    def __str__(self) -> str:
        return f"{self.name}[{self.index}]{'-' + self.desc if self.desc else ''}"


@functools.cache
def _infos() -> dict:
    frozen = torch.backends.flags_frozen()
    from torch.testing._internal.common_modules import module_db

    if not frozen:  # PyTorch's test utilities freeze the backends' flags, which Opacus sets
        torch.backends.flags_frozen.__globals__["__allow_nonbracketed_mutation_flag"] = True
    return {info.name: info for info in module_db}


@functools.cache
def _draw(name: str, seed: int) -> list:
    info = _infos()[name]
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return info.module_inputs_func(
            info, device="cpu", dtype=torch.float64, requires_grad=False, training=True
        )


def cases() -> list[Case]:
    """Every training sample of every module that has trainable parameters, but those whose
    batch is empty."""
    found = []
    for name, info in _infos().items():
        for index, sample in enumerate(_draw(name, SEED)):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                module = _construct(info, sample)
            if not any(p.requires_grad for p in module.parameters()):
                continue
            leaves = [x for x in pytree.tree_leaves(_given(sample)) if isinstance(x, Tensor)]
            if leaves and leaves[0].numel() == 0:
                continue
            found.append(Case(name, index, sample.desc))
    return found


def _construct(info, sample) -> nn.Module:
    return info.module_cls(*sample.constructor_input.args, **sample.constructor_input.kwargs)


def _given(sample) -> tuple:
    return sample.forward_input.args, sample.forward_input.kwargs


def _attention(module: nn.Module) -> nn.MultiheadAttention | None:
    if isinstance(module, nn.MultiheadAttention):
        return module
    if isinstance(module, nn.TransformerEncoder):
        return module.layers[0].self_attn
    if isinstance(module, nn.Transformer):
        return module.encoder.layers[0].self_attn
    return getattr(module, "self_attn", None)


def batch_first(module: nn.Module) -> bool:
    if isinstance(module, _RNNS):
        return module.batch_first
    attention = _attention(module)
    return True if attention is None else attention.batch_first


def _unbatched(module: nn.Module, sample) -> bool:
    if "no_batch_dim" in sample.desc:
        return True
    if getattr(sample.reference_fn, "__name__", "").startswith("no_batch_dim"):
        return True
    given = [x for x in pytree.tree_leaves(_given(sample)) if isinstance(x, Tensor)]
    if isinstance(module, (*_RNNS, nn.MultiheadAttention)):
        return given[0].dim() == 2
    if isinstance(module, _CELLS):
        return given[0].dim() == 1
    return any(x.dim() == 0 for x in given)  # a batch has no 0-dimensional inputs


@dataclass(frozen=True)
class Slot:
    """Where an input carries examples in the module's own layout: along ``dim``, in groups of
    ``group`` rows (a 3-D attention mask holds each example's heads)."""

    dim: int
    group: int = 1


def _slot(module: nn.Module, path: tuple, x: Tensor, unbatched: bool) -> Slot | None:
    """The input at ``path``'s batch in the module's batched layout; ``None``: shared by the
    whole batch (a 2-D attention mask)."""
    name = getattr(path[-1], "key", None)
    if isinstance(module, _RNNS):
        first = path[0].idx == 0 and len(path) == 2 and path[1].idx == 0
        return Slot(0 if batch_first(module) else 1) if first else Slot(1)  # states: (L, B, H)
    if isinstance(module, _SEQUENCES):
        if name in _MASKS:
            return Slot(0, _attention(module).num_heads) if x.dim() == 3 else None
        if name is not None and name.endswith("key_padding_mask"):
            return Slot(0)
        return Slot(0 if batch_first(module) else 1)
    return Slot(0)


class Layout(nn.Module):
    """The module with every per-example input and output batched on dim 0."""

    def __init__(self, module: nn.Module, spec, leaves: list, slots: list[Slot | None]):
        super().__init__()
        self.module = module
        self._spec, self._leaves, self._slots = spec, leaves, slots

    def forward(self, *batched: Tensor):
        leaves, given = list(self._leaves), iter(batched)
        for i, slot in enumerate(self._slots):
            if slot is not None:
                x = next(given)
                x = x.flatten(0, 1) if slot.group > 1 else x
                leaves[i] = x.movedim(0, slot.dim)
        args, kwargs = pytree.tree_unflatten(leaves, self._spec)
        out = self.module(*args, **kwargs)
        leaves, spec = pytree.tree_flatten(out)
        dims = _output_dims(self.module, len(leaves))
        moved = [
            x.movedim(d, 0) if isinstance(x, Tensor) and d and x.dim() > d else x
            for x, d in zip(leaves, dims)
        ]
        return pytree.tree_unflatten(moved, spec)


def _output_dims(module: nn.Module, count: int) -> list[int]:
    first = 0 if batch_first(module) else 1
    if isinstance(module, _RNNS):  # output, then the final states (layers, B, H)
        return [first] + [1] * (count - 1)
    if isinstance(module, nn.MultiheadAttention):  # output, then the weights (B, …)
        return [first] + [0] * (count - 1)
    if isinstance(module, _TRANSFORMERS):
        return [first] * count
    return [0] * count


@dataclass
class Example:
    """One sample as a batch: the model, its inputs, the weights ``w`` as the target, and
    the loss ``ℓ_b = Σ out_b · w_b``."""

    model: nn.Module
    inputs: tuple[Tensor, ...]
    target: Tensor

    def loss(self, output, weights: Tensor) -> Tensor:
        return (_flat(output, len(weights)) * weights).sum(1)


def _flat(output, size: int) -> Tensor:
    """The floating outputs, per example ``(B, k)``; one without the batch counts for all."""
    parts = []
    for x in pytree.tree_leaves(output):
        if isinstance(x, Tensor) and x.is_floating_point():
            if x.dim() and x.shape[0] == size:
                parts.append(x.reshape(size, -1))
            else:
                parts.append(x.reshape(1, -1).expand(size, -1))
    return torch.cat(parts, 1)


def example(case: Case, size: int) -> Example | None:
    """``size`` examples of the sample: its rows (in as many draws as needed), or, where it
    has no batch dimension, that many draws of it stacked; ``None`` where the module cannot
    run such a batch."""
    info = _infos()[case.name]
    first = _draw(case.name, SEED)[case.index]
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = _construct(info, first)
    unbatched = _unbatched(module, first)
    paths, spec = pytree.tree_flatten_with_path(_given(first))
    leaves = [x for _, x in paths]
    slots = [
        _slot(module, path, x, unbatched) if isinstance(x, Tensor) else None for path, x in paths
    ]
    inputs, draws = [], []
    for i, slot in enumerate(slots):
        if slot is None:
            continue
        rows, seed = [], SEED
        while sum(len(r) for r in rows) < size:
            x = pytree.tree_leaves(_given(_draw(case.name, seed)[case.index]))[i]
            seed += 1
            if unbatched:
                x = x.unsqueeze(0)
            else:
                x = x.movedim(slot.dim, 0)
                x = x.unflatten(0, (-1, slot.group)) if slot.group > 1 else x
            rows.append(x)
        inputs.append(torch.cat(rows)[:size])
        draws.append(seed - SEED)
    model = Layout(module, spec, leaves, slots).double().train()
    try:
        with torch.no_grad(), warnings.catch_warnings():  # lazy modules take their shapes
            warnings.simplefilter("ignore")
            output = model(*inputs)
    except Exception:  # the module cannot take such a batch (BatchNorm, one example)
        return None
    model.double()
    target = torch.randn(size, _flat(output, size).shape[1], dtype=torch.float64)
    return Example(model, tuple(inputs), target)


@dataclass
class Verdict:
    """What pergrad did with one sample at one batch size: ``"exact"``, ``"refused"`` (the
    model combines examples), ``"refused though separable"``, ``"wrong"``, ``"crashed"`` or
    ``"not applicable"`` (the module cannot run the batch); and the parameters a
    whole-model mode computed."""

    kind: str
    detail: str = ""
    whole_model: tuple[str, ...] = ()

    @property
    def summary(self) -> str:
        """The kind, and for exact numbers whether a whole-model mode computed any."""
        if self.kind != "exact":
            return self.kind
        return "exact, with a whole-model mode" if self.whole_model else "exact, per layer"


TALLY: collections.Counter = collections.Counter()
"""How many samples got each :func:`sample_summary` in this run."""


def sample_summary(summaries: set[str]) -> str:
    """A sample's verdict over the batch sizes it ran at: exact on the per-layer path at
    every one where it is exact, exact with a whole-model mode at some, or refused at all."""
    if "exact, with a whole-model mode" in summaries:
        return "exact, with a whole-model mode"
    if "exact, per layer" in summaries:
        return "exact, per layer"
    return "refused"


def _close(actual: Tensor, expected: Tensor) -> bool:
    """Equal to rounding, NaN where the other is NaN (a loss over no token)."""
    if actual.shape != expected.shape:
        return False
    finite = expected[expected.isfinite()]
    scale = max(float(finite.abs().max()) if finite.numel() else 0.0, 1e-3)
    return torch.allclose(actual, expected, rtol=0, atol=1e-6 * scale + 1e-12, equal_nan=True)


def _alone(batch: Example) -> tuple[dict[str, Tensor], Tensor] | None:
    """Per-example gradients and losses by one backward pass per example; ``None`` where the
    module cannot run one example (BatchNorm in training mode)."""
    params = {n: p for n, p in batch.model.named_parameters() if p.requires_grad}
    grads: dict[str, list[Tensor]] = {n: [] for n in params}
    losses = []
    try:
        for b in range(len(batch.target)):
            output = batch.model(*(x[b : b + 1] for x in batch.inputs))
            loss = batch.loss(output, batch.target[b : b + 1]).sum()
            found = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
            for (n, p), g in zip(params.items(), found):
                grads[n].append(torch.zeros_like(p) if g is None else g)
            losses.append(loss.detach())
    except Exception:
        return None
    return {n: torch.stack(g) for n, g in grads.items()}, torch.stack(losses)


def judge(
    case: Case, size: int, chunk_size: int | None = None, verify: bool | None = None
) -> Verdict:
    """pergrad's ``grads`` and ``backward`` on ``size`` examples of the sample against one
    backward pass per example (the modules' own warnings silenced); ``verify`` as
    :class:`pergrad.PerExample` takes it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _judge(case, size, chunk_size, verify)


def _judge(case: Case, size: int, chunk_size: int | None, verify: bool | None) -> Verdict:
    batch = example(case, size)
    if batch is None:
        return Verdict("not applicable", "the module cannot run this batch")
    reference = _alone(batch)
    with torch.no_grad():
        losses = batch.loss(batch.model(*batch.inputs), batch.target)
    separable = reference is not None and _close(losses, reference[1])
    finite = reference is not None and all(bool(g.isfinite().all()) for g in reference[0].values())
    engine = pergrad.PerExample(batch.model, batch.loss, chunk_size=chunk_size, verify=verify)
    try:
        grads = engine.grads(batch.inputs, batch.target)
        sources = dict(engine.sources)
        engine.backward(batch.inputs, batch.target)
    except (pergrad.InputError, FloatingPointError) as error:
        justified = not separable or not finite
        return Verdict("refused" if justified else "refused though separable", str(error))
    except Exception as error:
        return Verdict("crashed", f"{type(error).__name__}: {error}")
    if not separable:
        return Verdict("wrong", "numbers for a model that combines examples")
    expected = reference[0]
    wrong = [n for n, g in grads.items() if not _close(g, expected[n])]
    for name, p in batch.model.named_parameters():
        if name in expected and not (
            _close(p.grad, expected[name].mean(0))
            and _close(p.grad_stats.sq_mean, expected[name].square().mean(0))
        ):
            wrong.append(f"{name} (statistics)")
    if wrong:
        return Verdict("wrong", ", ".join(wrong))
    whole = tuple(n for n, source in sources.items() if source in WHOLE_MODEL)
    return Verdict("exact", "", whole)
