"""Every built-in rule, and a user's own, through ``pergrad.testing.check_rule``; the rules
added for real models (RMSNorm, Conv3d) and the position-pair expansion for few positions."""

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import pergrad
from pergrad.rules import RULES, base

RULE_CASES = {
    "linear": (lambda: nn.Linear(3, 4), lambda b: torch.randn(b, 3)),
    "linear_sequence": (lambda: nn.Linear(3, 4), lambda b: torch.randn(b, 2, 5, 3)),
    "linear_one_position": (lambda: nn.Linear(3, 4, bias=False), lambda b: torch.randn(b, 1, 3)),
    # few positions for their widths: |g_b|² from the two Gram matrices over positions
    "linear_few_positions": (lambda: nn.Linear(8, 6), lambda b: torch.randn(b, 3, 8)),
    "conv1d": (lambda: nn.Conv1d(2, 4, 3, padding=1, groups=2), lambda b: torch.randn(b, 2, 6)),
    "conv2d_one_position": (
        lambda: nn.Conv2d(3, 4, 3, padding=1),
        lambda b: torch.randn(b, 3, 1, 1),
    ),
    "conv2d_strided": (lambda: nn.Conv2d(2, 3, 2, stride=2), lambda b: torch.randn(b, 2, 5, 4)),
    "conv3d": (
        lambda: nn.Conv3d(2, 4, (2, 3, 1), stride=(1, 2, 1), padding=1, groups=2),
        lambda b: torch.randn(b, 2, 3, 4, 2),
    ),
    "embedding": (lambda: nn.Embedding(5, 3, padding_idx=1), lambda b: torch.randint(0, 5, (b, 4))),
    "layer_norm": (lambda: nn.LayerNorm(4), lambda b: torch.randn(b, 3, 4)),
    "group_norm": (lambda: nn.GroupNorm(2, 4), lambda b: torch.randn(b, 4, 3)),
    "rms_norm": (lambda: nn.RMSNorm((2, 3), eps=1e-6), lambda b: torch.randn(b, 4, 2, 3)),
    "rms_norm_default_eps": (lambda: nn.RMSNorm(3), lambda b: torch.randn(b, 3)),
    "gpt2_conv1d": (lambda: Conv1D(4, 3), lambda b: torch.randn(b, 5, 3)),
    "attention": (
        lambda: nn.MultiheadAttention(4, 2, batch_first=True),
        lambda b: (torch.randn(b, 3, 4),) * 3,
    ),
    "rnn_relu": (
        lambda: nn.RNN(3, 4, batch_first=True, nonlinearity="relu"),
        lambda b: torch.randn(b, 5, 3),
    ),
    "gru_two_layers": (lambda: nn.GRU(3, 4, 2, batch_first=True), lambda b: torch.randn(b, 4, 3)),
    "lstm_bidirectional": (
        lambda: nn.LSTM(3, 4, 2, batch_first=True, bidirectional=True),
        lambda b: torch.randn(b, 4, 3),
    ),
    "lstm_without_bias": (
        lambda: nn.LSTM(3, 2, batch_first=True, bias=False),
        lambda b: torch.randn(b, 3, 3),
    ),
    "lstm_projected": (
        lambda: nn.LSTM(3, 4, 2, batch_first=True, bidirectional=True, proj_size=2),
        lambda b: torch.randn(b, 4, 3),
    ),
    "rnn_cell": (lambda: nn.RNNCell(3, 4), lambda b: (torch.randn(b, 3), torch.randn(b, 4))),
    "gru_cell": (lambda: nn.GRUCell(3, 4), lambda b: torch.randn(b, 3)),
    "lstm_cell": (lambda: nn.LSTMCell(3, 4), lambda b: torch.randn(b, 3)),  # (h, c): module_db
    "prelu_per_channel": (lambda: nn.PReLU(3), lambda b: torch.randn(b, 3, 5)),
    "prelu_one_slope": (lambda: nn.PReLU(), lambda b: torch.randn(b, 2, 3, 2)),
    "bilinear": (lambda: nn.Bilinear(3, 2, 4), lambda b: (torch.randn(b, 3), torch.randn(b, 2))),
    "bilinear_positions": (
        lambda: nn.Bilinear(3, 2, 4, bias=False),
        lambda b: (torch.randn(b, 5, 3), torch.randn(b, 5, 2)),
    ),
}


@pytest.mark.parametrize("case", sorted(RULE_CASES))
def test_every_built_in_rule_passes_the_check_users_get(case):
    make_layer, make_inputs = RULE_CASES[case]
    torch.manual_seed(0)
    layer = make_layer()
    for p in layer.parameters():  # not the initial ones and zeros of norms
        nn.init.normal_(p)
    pergrad.testing.check_rule(layer, make_inputs, max_examples=8)


def test_every_registered_layer_type_has_a_case():
    covered = {type(make()) for make, _ in RULE_CASES.values()}
    named = {f"{t.__module__}.{t.__qualname__}" for t in covered}
    assert set(RULES) <= covered | named


class Scale(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(width))

    def forward(self, x):
        return x * self.weight


@pytest.fixture
def scale_rule():
    @pergrad.register_rule(Scale)
    def scale(layer, call):
        return {
            "weight": (call.output_grad * call.input)
            .reshape(call.batch_size, -1, layer.weight.shape[0])
            .sum(1)
        }

    yield scale
    del RULES[Scale]


def test_a_users_rule_is_used_and_checked(scale_rule):
    pergrad.testing.check_rule(Scale(4), lambda b: torch.randn(b, 3, 4), max_examples=5)
    model = nn.Sequential(Scale(4), nn.Linear(4, 2))
    engine = pergrad.PerExample(model, nn.CrossEntropyLoss(reduction="none"))
    engine.backward(torch.randn(3, 4), torch.tensor([0, 1, 1]))
    assert engine.sources["0.weight"] == "Scale"


def test_a_wrong_rule_fails_the_check():
    @pergrad.register_rule(Scale)
    def wrong(layer, call):  # forgets the sum over positions: per-position, not per-example
        return {"weight": (call.output_grad * call.input)[:, 0]}

    try:
        with pytest.raises(AssertionError):
            pergrad.testing.check_rule(Scale(4), lambda b: torch.randn(b, 3, 4), max_examples=5)
    finally:
        del RULES[Scale]


@pytest.mark.parametrize(("count", "expected"), [(1, True), (4, True), (8, False), (16, False)])
def test_the_pair_expansion_is_chosen_only_for_few_positions(count, expected):
    assert base.pairs_cheaper(32, count, 512, 4608) is expected


def test_the_pair_expansion_equals_per_example_gradients():
    torch.manual_seed(0)
    delta, a = (
        torch.randn(2, 5, 3, 4, dtype=torch.float64),
        torch.randn(2, 5, 3, 6, dtype=torch.float64),
    )
    per_example = torch.einsum("gbto,gbti->gboi", delta, a)
    squares = base.pair_moments(delta, a, per_example.sum(1))
    torch.testing.assert_close(squares, per_example.square().sum(1))


def test_the_pair_expansion_is_never_below_the_square_of_the_sum():
    """Positions whose products nearly cancel, in float32: the expansion's terms of both
    signs can round below zero; the result stays at or above ``(Σ_b g_b)²/B``."""
    torch.manual_seed(0)
    a = torch.randn(1, 6, 2, 5)
    a[:, :, 1] = a[:, :, 0] * (1 + 1e-4)  # two positions of nearly the same input
    delta = torch.randn(1, 6, 2, 3)
    delta[:, :, 1] = -delta[:, :, 0]  # and opposite gradients: g_b nearly 0
    per_example = torch.einsum("gbto,gbti->gboi", delta.double(), a.double())
    grad_sum = per_example.sum(1).float()
    squares = base.pair_moments(delta, a, grad_sum)
    assert bool((squares >= grad_sum.square() / 6).all())
    assert bool((squares >= 0).all())
    exact = per_example.square().sum(1)
    assert float((squares.double() - exact).abs().max()) < 1e-6 * float(
        (delta.abs().sum(2).square().sum(1)).max() * a.abs().sum(2).square().sum(1).max()
    )
