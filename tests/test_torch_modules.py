"""pergrad over PyTorch's own module database (``module_db``, the samples PyTorch's tests run
every ``nn`` module on): every module with trainable parameters, each training sample as a
batch of 1, 3 and 4 examples and of 3 in chunks of 2 (a last chunk of one), float64, against
one backward pass per example (more closely than ``verify=True`` would, so without it). Each
is exact or refused with an error that says why; none is wrong and none raises anything
else. The count on the per-layer path is printed at the end of the run
(:func:`conftest.pytest_terminal_summary`)."""

from __future__ import annotations

import pytest
import torch_modules
from torch_modules import Case

CONFIGS = [(1, None), (3, None), (3, 2), (4, None)]
"""``(B, chunk_size)``."""

SAMPLED = {"nn.LinearCrossEntropyLoss": 7}
"""Modules whose samples are every combination of independent options: every n-th is run
(LinearCrossEntropyLoss has 857: reductions, class weights, ignored targets, smoothing,
chunked kernels and output shapes, each choice in many)."""

PER_LAYER = frozenset(
    {"nn.Bilinear", "nn.PReLU", "nn.RNNCell", "nn.GRUCell", "nn.LSTMCell", "nn.LSTM"}
)
"""Modules every parameter of which must come from a rule or the layer-local path, with no
whole-model mode (MultiheadAttention and the Transformer layers too, below)."""


def cases() -> list[Case]:
    return [c for c in torch_modules.cases() if c.index % SAMPLED.get(c.name, 1) == 0]


def _on_the_per_layer_path(case: Case) -> bool:
    return case.name in PER_LAYER or case.name.startswith(
        ("nn.MultiheadAttention", "nn.Transformer")
    )


@pytest.mark.parametrize("case", cases(), ids=str)
def test_exact_or_refused(case: Case):
    summaries = set()
    for size, chunk_size in CONFIGS:
        verdict = torch_modules.judge(case, size, chunk_size, verify=False)  # compared below
        summaries.add(verdict.summary)
        where = f"{case} at B = {size}, chunk_size = {chunk_size}"
        assert verdict.kind in ("exact", "refused", "refused though separable", "not applicable"), (
            f"{where}: {verdict.kind}: {verdict.detail}"
        )
        if verdict.kind == "exact" and _on_the_per_layer_path(case):
            assert not verdict.whole_model, f"{where}: whole-model mode for {verdict.whole_model}"
    torch_modules.TALLY[torch_modules.sample_summary(summaries)] += 1
