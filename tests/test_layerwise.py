"""Per-layer rules (``mode="auto"``'s ``backward`` and ``grads``) against one backward per
example.

Every test also checks ``engine.sources``, so that a rule silently falling back to another
mode would fail it rather than pass on the fallback's numbers.
"""

import sys
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from zoo import CASES, CROSS_ENTROPY, statistics

import pergrad
from pergrad import rules

MSE = lambda out, y: (out - y).square().flatten(1).sum(1)  # noqa: E731


def covered(model: nn.Module) -> dict[str, str]:
    """Every trainable parameter of a layer whose type has a rule for its configuration, with
    that type's name."""
    names = {name for name, p in model.named_parameters() if p.requires_grad}
    found = {}
    for module_name, module in model.named_modules():
        if rules.rule_for(module)[0] is not None:
            for name, _ in module.named_parameters(prefix=module_name):
                if name in names:
                    found[name] = type(module).__name__
    return found


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_zoo_model(name):
    model, inputs, target = CASES[name].build(5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pergrad.FallbackWarning)
        sources = statistics(model, CROSS_ENTROPY, inputs, target)
    expected = covered(model)
    # the tied weight is shared by two layers, so no one rule covers it; parent_use's
    # embedding weight is also used at an operation; opaque_use's, by a custom Function
    if name in ("tied", "parent_use", "opaque_use"):
        expected.pop("embed.weight")
    if name == "parent_use":
        assert sources["embed.weight"] == "Embedding+matmul (op)"
    assert {n: s for n, s in sources.items() if n in expected} == expected


def test_rules_cover_the_whole_char_transformer_of_the_text_example():
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
    from tasks import text_task

    task = text_task(seed=0, sequences=60, curve_examples=4)
    torch.manual_seed(0)
    model = task.make_model().double()
    x, y = (t[:6] for t in task.train)
    sources = statistics(model, task.loss_fn, x, y)
    assert sources == covered(model) and len(sources) == len(list(model.parameters()))


sizes = st.integers(1, 4)


@settings(max_examples=25, deadline=None)
@given(
    b=sizes, middle=st.lists(st.integers(1, 3), max_size=2), i=sizes, o=sizes, bias=st.booleans()
)
def test_linear_with_any_leading_dims(b, middle, i, o, bias):
    torch.manual_seed(b + i + o)
    model = nn.Sequential(nn.Linear(i, o, bias=bias), nn.Tanh(), nn.Flatten(), nn.LazyLinear(2))
    x = torch.randn(b, *middle, i)
    model(x)  # materialize the lazy layer, then go to float64
    model = model.double()
    assert statistics(model, MSE, x.double(), torch.randn(b, 2, dtype=torch.float64))[
        "0.weight"
    ] == ("Linear")


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")
@settings(max_examples=30, deadline=None)
@given(
    b=sizes,
    two_d=st.booleans(),
    groups=st.sampled_from([1, 2]),
    kernel=st.integers(1, 3),
    stride=st.integers(1, 2),
    dilation=st.integers(1, 2),
    padding=st.sampled_from([0, 1, "same"]),
    padding_mode=st.sampled_from(["zeros", "reflect", "circular"]),
)
def test_conv_any_configuration(b, two_d, groups, kernel, stride, dilation, padding, padding_mode):
    if padding == "same":
        stride = 1
    conv = (nn.Conv2d if two_d else nn.Conv1d)(
        2 * groups, 2 * groups, kernel, stride, padding, dilation, groups, padding_mode=padding_mode
    )
    model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(1)).double()
    shape = (b, 2 * groups, *((7, 6) if two_d else (9,)))
    x = torch.randn(shape, dtype=torch.float64)
    target = torch.randn(model(x).shape, dtype=torch.float64)
    sources = statistics(model, MSE, x, target)
    assert sources == covered(model)


@settings(max_examples=25, deadline=None)
@given(
    b=sizes,
    length=st.integers(1, 6),
    padding_idx=st.sampled_from([None, 0, 3]),
    vocabulary=st.integers(2, 5),
)
def test_embedding_repeated_tokens_and_padding_idx(b, length, padding_idx, vocabulary):
    vocabulary = max(vocabulary, 4)
    torch.manual_seed(length)
    model = nn.Sequential(
        nn.Embedding(vocabulary, 3, padding_idx=padding_idx), nn.Flatten(), nn.Linear(3 * length, 2)
    ).double()
    tokens = torch.randint(0, vocabulary, (b, length))  # few tokens: many repeats per example
    sources = statistics(model, CROSS_ENTROPY, tokens, torch.randint(0, 2, (b,)))
    assert sources == covered(model)


@settings(max_examples=25, deadline=None)
@given(
    b=sizes,
    positions=st.lists(st.integers(1, 3), max_size=2),
    width=st.integers(1, 4),
    two_dims=st.booleans(),
    bias=st.booleans(),
    groups=st.sampled_from([1, 2, 4]),
)
def test_layer_norm_and_group_norm(b, positions, width, two_dims, bias, groups):
    shape = (2, width) if two_dims else (width,)
    layer_norm = nn.LayerNorm(shape, bias=bias).double()
    group_norm = nn.GroupNorm(groups, 4).double()
    for layer in (layer_norm, group_norm):
        nn.init.normal_(layer.weight)
    x = torch.randn(b, *positions, *shape, dtype=torch.float64)
    assert statistics(layer_norm, MSE, x, torch.randn_like(x)) == covered(layer_norm)
    x = torch.randn(b, 4, 2, *positions, dtype=torch.float64)  # 2+ values per channel
    assert statistics(group_norm, MSE, x, torch.randn_like(x)) == covered(group_norm)


class Attention(nn.Module):
    def __init__(self, heads, cross, causal, padded, bias, boolean, time_first=False):
        super().__init__()
        self.attention = nn.MultiheadAttention(4, heads, bias=bias, batch_first=not time_first)
        self.cross, self.causal, self.padded, self.boolean = cross, causal, padded, boolean
        self.time_first = time_first

    def forward(self, x, memory):
        length = x.shape[1]
        key = memory if self.cross else x
        mask = torch.ones(length, length, dtype=torch.bool).triu(1)  # True: masked out
        padding = torch.zeros(key.shape[:2], dtype=torch.bool)
        padding[:, -1] = key.shape[1] > 1  # mask each example's last key, unless it is the only one
        if not self.boolean:  # the same masks, additive
            mask, padding = (
                torch.zeros(m.shape).masked_fill(m, -torch.inf) for m in (mask, padding)
            )
        padding = padding if self.padded else None  # (B, S) either way
        if self.time_first:  # (L, B, E): the padding mask's examples are on another dim
            x, key = x.transpose(0, 1), key.transpose(0, 1)
        out, _ = self.attention(
            x,
            key,
            key,
            key_padding_mask=padding,
            attn_mask=mask if self.causal and not self.cross else None,
            is_causal=self.causal and not self.cross,
            need_weights=False,
        )
        return out.transpose(0, 1) if self.time_first else out


@settings(max_examples=25, deadline=None)
@given(
    b=sizes,
    length=st.integers(1, 4),
    memory=st.integers(1, 4),
    heads=st.sampled_from([1, 2]),
    cross=st.booleans(),
    causal=st.booleans(),
    padded=st.booleans(),
    bias=st.booleans(),
    boolean=st.booleans(),
    time_first=st.booleans(),
)
def test_multihead_attention(
    b, length, memory, heads, cross, causal, padded, bias, boolean, time_first
):
    torch.manual_seed(length * 7 + memory)
    model = Attention(heads, cross, causal, padded, bias, boolean, time_first).double()
    x = torch.randn(b, length, 4, dtype=torch.float64)
    keys = torch.randn(b, memory, 4, dtype=torch.float64)
    sources = statistics(model, MSE, (x, keys), torch.randn_like(x))
    # sequence first: the rule on the rows moved to dim 0, or, for one example, the layer
    # replayed whole where its rows do not say their layout
    local = {name: f"{kind} (local)" for name, kind in covered(model).items()}
    assert sources in (covered(model), local) if time_first else sources == covered(model)


def test_sequence_first_cross_attention_of_one_example_and_one_query():
    """``B = 1``, ``L = 1``: the query ``(1, 1, E)`` looks batch first; the keys ``(S, 1, E)``
    do not, and the rule reads them as the layer does."""
    torch.manual_seed(9)
    model = Attention(1, True, False, False, False, False, time_first=True).double()
    x, keys = torch.randn(1, 1, 4, dtype=torch.float64), torch.randn(1, 2, 4, dtype=torch.float64)
    assert statistics(model, MSE, (x, keys), torch.randn_like(x)) == covered(model)


class WeightUsedTwice(nn.Module):
    """A GPT-style head: the embedding's weight also maps back to the vocabulary."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(7, 4)
        self.hidden = nn.Linear(4, 4)

    def forward(self, tokens):
        return torch.tanh(self.hidden(self.embed(tokens))).mean(1) @ self.embed.weight.T


class LayerCalledTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.shared = nn.Linear(4, 4)
        self.out = nn.Linear(4, 3)

    def forward(self, x):
        return self.out(self.shared(torch.tanh(self.shared(x))))


def test_weight_used_outside_its_layer_is_taken_at_the_operation():
    torch.manual_seed(0)
    model = WeightUsedTwice().double()
    sources = statistics(model, CROSS_ENTROPY, torch.randint(0, 7, (5, 3)), torch.arange(5))
    assert sources == {
        "embed.weight": "Embedding+matmul (op)",
        "hidden.weight": "Linear",
        "hidden.bias": "Linear",
    }


def test_weight_used_where_pergrad_cannot_see_goes_to_another_mode():
    torch.manual_seed(0)
    model, inputs, target = CASES["opaque_use"].build(5)
    outside = "'embed.weight': used outside the Embedding layer"
    with pytest.warns(pergrad.FallbackWarning, match=outside):
        sources = statistics(model, CROSS_ENTROPY, inputs, target)
    assert sources == {"embed.weight": "func", "hidden.weight": "Linear", "hidden.bias": "Linear"}


def test_layer_called_twice_gets_the_per_example_sum_over_its_calls():
    torch.manual_seed(0)
    model = LayerCalledTwice().double()
    x = torch.randn(5, 4, dtype=torch.float64)
    sources = statistics(model, CROSS_ENTROPY, x, torch.randint(0, 3, (5,)))
    assert sources == covered(model)


class SequenceFirst(nn.Module):
    """Batch-first inputs, and inside a layer that takes ``(T, B, E)``."""

    def __init__(self):
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(4, 2, 8, dropout=0.0)

    def forward(self, x):
        return self.layer(x.transpose(0, 1)).transpose(0, 1)


@pytest.mark.parametrize("length", [5, 3])  # 5 = B: a (T, B, E) input looks batch-first
def test_sequence_first_layers_are_not_mistaken_for_batch_first(length):
    torch.manual_seed(0)
    model = SequenceFirst().double()
    x = torch.randn(5, length, 4, dtype=torch.float64)
    sources = statistics(model, MSE, x, torch.randn_like(x))
    assert sources["layer.linear1.weight"] == "Linear"  # its (T, B, E) rows regrouped
    # and the attention's: its rule reads its (T, B, E) inputs with the examples moved first
    assert sources["layer.self_attn.in_proj_weight"] == "MultiheadAttention"
    assert sources["layer.self_attn.out_proj.weight"] == "MultiheadAttention"


def test_in_place_activation_after_a_layer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(inplace=True), nn.Linear(6, 3)).double()
    x = torch.randn(7, 4, dtype=torch.float64)
    assert statistics(model, CROSS_ENTROPY, x, torch.randint(0, 3, (7,))) == covered(model)


def test_model_is_left_clean_even_when_the_forward_pass_fails():
    model = nn.Sequential(nn.Linear(4, 6), nn.Linear(5, 3)).double()  # wrong inner width
    params = list(model.parameters())
    engine = pergrad.PerExample(model, CROSS_ENTROPY)
    with pytest.raises(RuntimeError), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine.backward(torch.randn(3, 4, dtype=torch.float64), torch.arange(3))
    assert list(model.parameters()) == params
    assert all(type(p) is nn.Parameter for p in model.parameters())
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks


@pytest.mark.parametrize("case", ["transformer", "tied"])
def test_nothing_is_kept_alive_after_a_call(case):
    """The hooks on a pass's tensors hold its records, and the records the inputs whose graph
    holds the hooks: unless released, a cycle Python cannot collect keeps every step's graph."""
    import gc
    import weakref

    model, inputs, target = CASES[case].build(4)
    engine = pergrad.PerExample(model, CROSS_ENTROPY)
    engine.backward(inputs, target)
    engine.grads(inputs, target)
    alive = weakref.ref(next(model.parameters()))
    del model, engine
    gc.collect()
    assert alive() is None


class Doubler(nn.Module):
    """A layer whose registered rule fails: the layer-local path takes over, and says so."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3))

    def forward(self, x):
        return x * self.weight


def test_a_rule_that_fails_says_why_and_the_layer_local_path_takes_over():
    def failing(layer, call):
        raise ValueError("not for this shape")

    pergrad.register_rule(Doubler)(failing)
    try:
        torch.manual_seed(0)
        model = nn.Sequential(Doubler(), nn.Linear(3, 2)).double()
        x, y = torch.randn(4, 3, dtype=torch.float64), torch.randint(0, 2, (4,))
        with pytest.warns(
            pergrad.FallbackWarning, match=r"Doubler rule failed.*not for this shape"
        ):
            sources = statistics(model, CROSS_ENTROPY, x, y)
        assert sources["0.weight"] == "Doubler (local)"
    finally:
        del rules.RULES[Doubler]


def test_why_a_rule_did_not_apply_is_in_the_fallback_warning():
    """A sequence that holds no example's data (a learned one run beside the batch's) whose
    output reaches every example's loss: the recurrent rule cannot give its gradient to an
    example, says so, and a whole-model mode computes it."""
    torch.manual_seed(0)

    class WithLearnedSequence(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm, self.out = nn.LSTM(3, 4, batch_first=True), nn.Linear(4, 2)
            self.learned = nn.Parameter(torch.randn(1, 5, 3))

        def forward(self, x):
            out = self.lstm(torch.cat([x, self.learned]))[0][:, -1]
            return self.out(out[:-1] + out[-1:])

    x, y = torch.randn(3, 5, 3, dtype=torch.float64), torch.randint(0, 2, (3,))
    model = WithLearnedSequence().double()
    with pytest.warns(pergrad.FallbackWarning) as record:
        statistics(model, CROSS_ENTROPY, x, y)
    messages = " ".join(str(w.message) for w in record)
    assert "LSTM (its rule: its rule failed: ValueError: a sequence holding no" in messages


class RearrangedBias(nn.Module):
    """A bias table looked up by constant buckets, rearranged and met with the batch's scores,
    by an addition or through ``torch.where`` with a batched mask (T5's relative attention
    bias)."""

    def __init__(self, through_where: bool):
        super().__init__()
        self.table, self.out = nn.Embedding(5, 2), nn.Linear(32, 3)
        self.through_where = through_where

    def forward(self, scores):  # (B, 2, 4, 4)
        buckets = (torch.arange(4)[None] - torch.arange(4)[:, None]).clamp(-2, 2) + 2
        bias = self.table(buckets).permute(2, 0, 1).unsqueeze(0)  # (1, 2, 4, 4), shared
        if self.through_where:
            scores = torch.where(scores > 0, bias, scores)
        else:
            scores = scores + bias
        return self.out(scores.flatten(1))


@pytest.mark.parametrize("through_where", [False, True])
def test_a_shared_output_rearranged_before_it_meets_the_batch(through_where):
    torch.manual_seed(0)
    model = RearrangedBias(through_where).double()
    x = torch.randn(5, 2, 4, 4, dtype=torch.float64)
    sources = statistics(model, CROSS_ENTROPY, x, torch.randint(0, 3, (5,)))
    # the table's call holds no example's data: its weight is taken where the bias meets them
    assert sources == {
        **covered(model),
        "table.weight": "where (op)" if through_where else "add (op)",
    }
