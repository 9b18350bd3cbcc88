"""Recurrent layers on the per-layer path, in every layout a model hands them: batch-first or
not, several layers, both directions, an initial state computed from the example, the final
state reaching the loss, packed sequences of different lengths in any order — each exact
against one backward per example, with no parameter on a whole-model mode."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
from zoo import reference_grads, statistics

import pergrad
from pergrad import provenance

KINDS = {
    "rnn_tanh": lambda **o: nn.RNN(3, 4, **o),
    "rnn_relu": lambda **o: nn.RNN(3, 4, nonlinearity="relu", **o),
    "gru": lambda **o: nn.GRU(3, 4, **o),
    "lstm": lambda **o: nn.LSTM(3, 4, **o),
    "lstm_proj": lambda **o: nn.LSTM(3, 4, proj_size=2, **o),
}
WIDTH = {"lstm_proj": 2}
"""Each direction's output, where it is not the hidden size (4): the projection's."""


class Reader(nn.Module):
    """A recurrent layer on a batch of sequences ``(B, T, 3)``; each sequence's length is read
    from its data (``1 + ⌊3·|x_b0|⌋ mod T``)."""

    def __init__(self, kind, batch_first, layers, bidirectional, initial, final, packed, sort):
        super().__init__()
        self.rnn = KINDS[kind](
            num_layers=layers, bidirectional=bidirectional, batch_first=batch_first
        )
        self.states = layers * (2 if bidirectional else 1)
        self.width = WIDTH.get(kind, 4)
        self.start = nn.Linear(3, 4 * self.states)  # the initial state, from the first step
        self.head = nn.Linear(self.width * (2 if bidirectional else 1), 1)
        self.kind, self.batch_first = kind, batch_first
        self.initial, self.final, self.packed, self.sort = initial, final, packed, sort

    def forward(self, x):
        size, steps = x.shape[:2]
        sequences = x if self.batch_first else x.transpose(0, 1)
        lengths = 1 + (3 * x[:, 0, 0].abs()).long() % steps
        if self.packed:
            if self.sort:  # sorted by the model, restored after
                lengths, order = lengths.sort(descending=True)
                sequences = sequences[order] if self.batch_first else sequences[:, order]
            sequences = pack_padded_sequence(
                sequences, lengths, batch_first=self.batch_first, enforce_sorted=self.sort
            )
        args = (sequences,)
        if self.initial:
            h = torch.tanh(self.start(x[:, 0])).view(size, self.states, 4).transpose(0, 1)
            if self.packed and self.sort:
                h = h[:, order]
            if self.kind.startswith("lstm"):  # h (projected, where it is) and c
                h = (h[..., : self.width].contiguous(), 0.5 * h.contiguous())
            args += (h,)
        out, state = self.rnn(*args)
        if self.packed:
            # longer than any sequence: the padding is there whatever the other examples
            out = pad_packed_sequence(out, batch_first=self.batch_first, total_length=steps + 1)
            out = out[0].narrow(1 if self.batch_first else 0, 0, steps)
        out = out if self.batch_first else out.transpose(0, 1)
        state = state if self.kind.startswith("lstm") else (state,)
        if self.packed and self.sort:  # back in the order of the batch
            out, state = out[order.argsort()], [s[:, order.argsort()] for s in state]
        loss = self.head(torch.tanh(out)).sum((1, 2))
        if self.final:
            loss = loss + (state[0] ** 2).sum((0, 2)) + state[-1].sum((0, 2))
        return loss


def _squared(output, target):
    return (output - target) ** 2


def check(kind, batch_first, layers, bidirectional, initial, final, packed, sort, size=4):
    torch.manual_seed(layers + 2 * size)
    model = Reader(kind, batch_first, layers, bidirectional, initial, final, packed, sort).double()
    x = torch.randn(size, 5, 3, dtype=torch.float64)
    y = torch.randn(size, dtype=torch.float64)
    sources = statistics(model, _squared, x, y)
    rule = "LSTM" if kind.startswith("lstm") else kind[:3].upper()
    assert {s for n, s in sources.items() if n.startswith("rnn.")} == {rule}, sources
    assert set(sources.values()) <= {rule, "Linear", "unused"}, sources


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize(
    "layout",
    [
        dict(batch_first=True, layers=1, bidirectional=False, initial=False, final=False),
        dict(batch_first=False, layers=2, bidirectional=True, initial=True, final=True),
        dict(batch_first=True, layers=2, bidirectional=True, initial=True, final=True),
    ],
)
@pytest.mark.parametrize("packed, sort", [(False, False), (True, False), (True, True)])
def test_recurrent_layers_are_exact_on_the_per_layer_path(kind, layout, packed, sort):
    check(kind, packed=packed, sort=sort, **layout)


@settings(max_examples=12, deadline=None, database=None)
@given(
    kind=st.sampled_from(sorted(KINDS)),
    flags=st.tuples(*[st.booleans()] * 6),
    layers=st.integers(1, 2),
    size=st.integers(1, 5),
)
def test_any_layout_is_exact(kind, flags, layers, size):
    batch_first, bidirectional, initial, final, packed, sort = flags
    check(kind, batch_first, layers, bidirectional, initial, final, packed, sort and packed, size)


def test_clipping_on_packed_sequences_with_a_final_state():
    torch.manual_seed(0)
    model = Reader("lstm", True, 2, True, True, True, True, False).double()
    x = torch.randn(6, 5, 3, dtype=torch.float64)
    y = torch.randn(6, dtype=torch.float64)
    reference = reference_grads(model, _squared, x, y)
    norms = sum(g.flatten(1).square().sum(1) for g in reference.values()).sqrt()
    factors = (0.5 / norms).clamp(max=1)
    assert bool((factors < 1).any())
    engine = pergrad.PerExample(model, _squared, max_example_norm=0.5)
    engine.backward(x, y)
    assert {s for n, s in engine.sources.items() if n.startswith("rnn.")} == {"LSTM"}
    for name, p in model.named_parameters():
        g = reference[name] * factors.view(-1, *[1] * p.dim())
        torch.testing.assert_close(p.grad, g.mean(0), rtol=1e-9, atol=1e-12, msg=name)
        torch.testing.assert_close(p.grad_stats.sq_mean, g.square().mean(0), rtol=1e-9, atol=1e-12)


def test_a_sequence_of_several_examples_is_refused():
    """Rows of two examples in one sequence: the recurrence mixes them, so no example's loss
    is its own. The layers cannot follow it, and the losses computed one example at a time
    differ from the batch's."""
    torch.manual_seed(0)

    class Swapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn, self.head = nn.GRU(3, 4, batch_first=True), nn.Linear(4, 1)

        def forward(self, x):
            x = torch.cat([x[:, :2], x.flip(0)[:, 2:]], 1)  # late steps from another example
            return self.head(self.rnn(x)[0][:, -1]).squeeze(1)

    x, y = torch.randn(3, 4, 3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    model = Swapped().double()
    with pytest.raises(
        pergrad.InputError, match="computed alone .mode='loop'. is .*, in the batch"
    ):
        pergrad.PerExample(model, _squared).backward(x, y)
    assert all(p.grad is None for p in model.parameters())


def test_a_float32_lstm_on_cpu_is_followed_through_its_fused_kernel():
    """In float32 on CPU, ``nn.LSTM`` runs oneDNN's kernel, one operation per layer: each
    column of its output and final states holds its own example's data, and the rule gives
    every example its gradients."""
    torch.manual_seed(0)
    model = Reader("lstm", True, 2, True, True, True, False, False)
    x, y = torch.randn(4, 5, 3), torch.randn(4)
    tracker = provenance.Provenance()
    with tracker:
        tracker.set(x, provenance.batch(3, 4))
        out = model(x)
    tags = provenance.table(tracker.tag(out), tuple(out.shape)).expand(out.shape)
    assert torch.equal(tags, torch.arange(4)), tags
    engine = pergrad.PerExample(model, _squared)
    grads = engine.grads(x, y)
    assert {s for n, s in engine.sources.items() if n.startswith("rnn.")} == {"LSTM"}
    reference = reference_grads(model, _squared, x, y)
    for name, g in grads.items():
        torch.testing.assert_close(g, reference[name], rtol=1e-4, atol=1e-5, msg=name)


def test_the_rule_steps_aside_where_its_run_differs_from_the_layer(monkeypatch):
    """The rule compares its own run of the recurrence with what the layer returned."""
    from pergrad.rules import recurrent

    run = recurrent._Sequences.run
    monkeypatch.setattr(
        recurrent._Sequences,
        "run",
        lambda self, u, k: (lambda o, s: (o * 1.01, s))(*run(self, u, k)),
    )
    torch.manual_seed(0)
    model = Reader("gru", True, 1, False, False, False, False, False).double()
    x, y = torch.randn(3, 5, 3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    with pytest.warns(pergrad.FallbackWarning) as record:
        sources = statistics(model, _squared, x, y)
    assert any("differs from the layer's output" in str(w.message) for w in record)
    assert sources["rnn.weight_ih_l0"] != "GRU"


class PaddedToTheLongest(nn.Module):
    """Packed sequences padded back to the batch's longest, then averaged over time: an
    example's mean depends on the other examples' lengths."""

    def __init__(self):
        super().__init__()
        self.rnn, self.head = nn.GRU(3, 4, batch_first=True), nn.Linear(4, 1)

    def forward(self, x):
        lengths = 1 + (3 * x[:, 0, 0].abs()).long() % x.shape[1]
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        out = pad_packed_sequence(self.rnn(packed)[0], batch_first=True)[0]
        return self.head(out.mean(1)).squeeze(1)


def test_padding_to_the_batchs_longest_sequence_is_refused():
    torch.manual_seed(1)
    x, y = torch.randn(4, 5, 3, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    x[0, 0, 0] = 1.4  # one sequence of all 5 steps, the others shorter
    model = PaddedToTheLongest().double()
    with pytest.raises(pergrad.InputError, match="combines examples.*batch's longest sequence"):
        pergrad.PerExample(model, _squared).backward(x, y)
    assert all(p.grad is None for p in model.parameters())
    y[0] = 0.0  # the same, where the longest sequence is every sequence's length
    lengths = 1 + (3 * x[:, 0, 0].abs()).long() % 5
    x[:, 0, 0] = 1.4 * torch.ones(4, dtype=torch.float64)
    assert bool((1 + (3 * x[:, 0, 0].abs()).long() % 5 == 5).all()) and bool(lengths.ne(5).any())
    assert set(statistics(model, _squared, x, y).values()) == {"GRU", "Linear"}


def test_recurrent_weights_computed_from_an_example_are_refused():
    class FromData(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn, self.head = nn.GRU(3, 4, batch_first=True), nn.Linear(4, 1)

        def forward(self, x):
            weights = [w * (1 + torch.tanh(x[0, 0, 0])) for w in self.rnn._flat_weights]
            h0 = x.new_zeros(1, len(x), 4)
            out = torch.gru(x, h0, weights, True, 1, 0.0, False, False, True)[0]
            return self.head(out[:, -1]).squeeze(1)

    x, y = torch.randn(3, 5, 3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    with pytest.raises(pergrad.InputError, match="weights come from an example"):
        pergrad.PerExample(FromData().double(), _squared).grads(x, y)
