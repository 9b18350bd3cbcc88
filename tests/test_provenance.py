"""Which example each row belongs to, followed through the operations that move rows: models
that flatten, route, window or reorder their batch get exact per-layer statistics; models that
combine examples are refused; operations pergrad does not follow send the model to a
whole-model mode. Tags are checked against perturbing one example at a time."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from zoo import CROSS_ENTROPY, statistics

import pergrad
from pergrad import provenance
from pergrad.uses import Uses


def _squared(output, target):
    return (output - target).square().reshape(len(target), -1).sum(1)


class Routed(nn.Module):
    """An expert called on the tokens the batch routed to it, flattened (the rows of one
    example are as many as it routes: none for some)."""

    def __init__(self):
        super().__init__()
        self.expert = nn.Linear(2, 1)

    def forward(self, x):
        tokens = x.flatten(0, 1)
        rows = (tokens[:, 0] > 0).nonzero().squeeze(1)
        routed = self.expert(tokens[rows])
        out = torch.zeros(len(tokens), 1, dtype=x.dtype).index_add(0, rows, routed)
        return out.view(len(x), -1).sum(1)


class Experts(nn.Module):
    """A mixture of experts, one module per expert, each token sent to its best one and
    scaled by the router's weight, as mixture-of-experts layers built from modules do."""

    def __init__(self, width=4, count=3):
        super().__init__()
        self.router = nn.Linear(width, count)
        self.experts = nn.ModuleList(nn.Linear(width, width) for _ in range(count))
        self.norm, self.head = nn.LayerNorm(width), nn.Linear(width, 2)

    def forward(self, x):
        tokens = x.flatten(0, 1)
        weights = self.router(tokens).softmax(-1)
        best, choice = weights.max(-1)
        out = torch.zeros_like(tokens)
        for e, expert in enumerate(self.experts):
            rows = torch.where(choice == e)[0]
            out.index_add_(0, rows, expert(tokens[rows]) * best[rows, None])
        return self.head(self.norm(out)).view(*x.shape[:2], 2).mean(1)


class Sorted(nn.Module):
    """Layers that see the batch sorted by a feature, and the order restored after."""

    def __init__(self):
        super().__init__()
        self.first, self.second = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x):
        order = x[:, 0].argsort()
        return self.second(torch.tanh(self.first(x[order])))[order.argsort()]


class Windows(nn.Module):
    """Swin's partition: ``(B, H, W, C)`` cut into windows ``(B·windows, w·w, C)``, a layer
    and a norm over each window's tokens, and the windows put back."""

    def __init__(self, channels=3, window=2):
        super().__init__()
        self.window = window
        self.mix, self.norm = nn.Linear(channels, channels), nn.LayerNorm(channels)
        self.head = nn.Linear(channels, 2)

    def forward(self, x):
        b, h, w, c = x.shape
        s = self.window
        windows = x.view(b, h // s, s, w // s, s, c).permute(0, 1, 3, 2, 4, 5)
        windows = windows.reshape(-1, s * s, c)
        y = self.norm(self.mix(windows))
        y = y.view(b, h // s, w // s, s, s, c).permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)
        return self.head(y).mean((1, 2))


class TimeFirst(nn.Module):
    """Layers run on ``(T, B, d)``, as sequence-first code does."""

    def __init__(self):
        super().__init__()
        self.first, self.second = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.second(torch.relu(self.first(x.transpose(0, 1)))).mean(0)


class Centered(nn.Module):
    """Examples mixed by an operation between two layers: the batch mean subtracted."""

    def __init__(self):
        super().__init__()
        self.first, self.second = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x):
        h = self.first(x)
        return self.second(h - h.mean(0, keepdim=True))


class Contrastive(nn.Module):
    """Logits normalised over the batch, as in-batch contrastive heads do."""

    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(3, 2)

    def forward(self, x):
        z = self.layer(x)
        return z - z.logsumexp(0)


def _routed_tokens():
    signs = [[1, -1, -1], [1, 1, -1], [-1, 1, -1], [-1, -1, -1]]  # 1, 2, 1, 0 tokens routed
    x = torch.tensor(signs, dtype=torch.float64)[..., None] * torch.tensor([1.0, 0.5])
    return x, torch.randn(4, dtype=torch.float64), _squared


def _classes(*shape):
    return lambda: (
        torch.randn(*shape, dtype=torch.float64),
        torch.randint(0, 2, (shape[0],)),
        CROSS_ENTROPY,
    )


MOVED = {
    "routed tokens": (Routed, _routed_tokens),
    "experts": (Experts, _classes(5, 6, 4)),
    "a sorted batch": (Sorted, _classes(5, 3)),
    "windows": (Windows, _classes(3, 4, 4, 3)),
    "sequence first": (TimeFirst, _classes(4, 5, 3)),
}


@pytest.mark.parametrize("case", sorted(MOVED))
def test_rows_moved_between_examples_are_regrouped_by_example(case):
    make, data = MOVED[case]
    torch.manual_seed(0)
    model = make().double()
    x, y, loss_fn = data()
    sources = statistics(model, loss_fn, x, y)  # against one backward per example
    assert set(sources.values()) <= {"Linear", "LayerNorm"}, sources


@pytest.mark.parametrize("make", [Centered, Contrastive])
def test_an_operation_that_combines_examples_is_refused(make):
    torch.manual_seed(0)
    model = make().double()
    engine = pergrad.PerExample(model, CROSS_ENTROPY)
    with pytest.raises(pergrad.InputError, match="combines examples: aten.(mean|logsumexp)"):
        engine.backward(torch.randn(4, 3, dtype=torch.float64), torch.randint(0, 2, (4,)))
    assert all(p.grad is None for p in model.parameters())


@torch.library.custom_op("pergrad_tests::twice", mutates_args=())
def twice(x: torch.Tensor) -> torch.Tensor:
    return x * 2


twice.register_fake(lambda x: torch.empty_like(x))
twice.register_autograd(lambda ctx, grad: grad * 2, setup_context=lambda ctx, inputs, output: None)


class Wrapped(nn.Module):
    """``Linear → middle → Linear``."""

    def __init__(self, middle):
        super().__init__()
        self.first, self.second, self.middle = nn.Linear(3, 4), nn.Linear(4, 2), middle

    def forward(self, x):
        return self.second(self.middle(self.first(x)))


@pytest.mark.filterwarnings("ignore:.*mode='func' failed")  # the op has no vmap rule
def test_an_operation_pergrad_does_not_follow_sends_the_model_to_a_whole_model_mode():
    torch.manual_seed(0)
    model = Wrapped(twice).double()
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.randint(0, 2, (4,))
    with pytest.warns(pergrad.FallbackWarning, match="cannot follow .* pergrad_tests.twice"):
        sources = statistics(model, CROSS_ENTROPY, x, y)
    assert set(sources.values()) <= {"func", "hooks", "loop"}


# the tags themselves -----------------------------------------------------------------------

B, T, D = 4, 6, 3
PERMUTATION = torch.tensor([2, 0, 3, 1])
LAYER = nn.Linear(D, D).double()
GRU = nn.GRU(D, D, batch_first=True).double()
LSTM = nn.LSTM(D, D, num_layers=2, bidirectional=True).double()


def _packed_through_a_gru(x, longest=False):
    """Packed, through a GRU, padded back: past the longest sequence (``T + 1``, cut to ``T``),
    or, ``longest``, to the batch's longest, which depends on every example's length."""
    lengths = 1 + (10 * x[:, 0, 0].abs()).long() % T
    packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    out = GRU(packed)[0]
    if longest:
        out = nn.utils.rnn.pad_packed_sequence(out, batch_first=True)[0]
        return torch.cat([out, out.new_zeros(B, T - out.shape[1], D)], 1)
    return nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=T + 1)[0][:, :T]


OPERATIONS = {  # each (B, T, D) -> (B, T, D); True where it combines examples
    "flattened through a layer": (lambda x: LAYER(x.flatten(0, 1)).view(B, T, D), False),
    "batch permuted": (lambda x: x[PERMUTATION], False),
    "sorted by a feature": (lambda x: x[x[:, 0, 0].argsort()], False),
    "softmax over positions": (lambda x: x.softmax(1), False),
    "cumulative sum over positions": (lambda x: x.cumsum(1), False),
    "time first and back": (lambda x: (x.transpose(0, 1) * 2).transpose(0, 1), False),
    "rolled positions": (lambda x: x.roll(1, dims=1), False),
    "a constant row": (
        lambda x: torch.cat([torch.ones(B, 1, D, dtype=x.dtype), x], 1)[:, :T],
        False,
    ),
    "tokens routed": (
        lambda x: (
            torch.zeros(B * T, D, dtype=x.dtype)
            .index_add(
                0,
                (x.flatten(0, 1)[:, 0] > 0).nonzero()[:, 0],
                x.flatten(0, 1)[x.flatten(0, 1)[:, 0] > 0],
            )
            .view(B, T, D)
        ),
        False,
    ),
    "windows": (
        lambda x: x.view(B, 3, 2, D).reshape(B * 3, 2, D).flip(1).reshape(B, T, D),
        False,
    ),
    "packed, through a GRU, padded": (_packed_through_a_gru, False),
    "packed, through a GRU, padded to the longest": (
        lambda x: _packed_through_a_gru(x, longest=True),
        True,
    ),
    "through a time-first LSTM from a state": (
        lambda x: LSTM(x.transpose(0, 1), (x[:, :4].transpose(0, 1).contiguous(),) * 2)[
            0
        ].transpose(0, 1)[..., :D],
        False,
    ),
    "batch mean": (lambda x: x - x.mean(0), True),
    "batch softmax": (lambda x: x.softmax(0), True),
    "attention over the batch": (
        lambda x: torch.nn.functional.scaled_dot_product_attention(
            x.transpose(0, 1), x.transpose(0, 1), x.transpose(0, 1)
        ).transpose(0, 1),
        True,
    ),
}


def _tagged(f, x):
    tracker = provenance.Provenance()
    with tracker, Uses({}, len(x), tracker, record=None):  # recurrent kernels run whole
        tracker.set(x, provenance.batch(x.dim(), len(x)))
        out = f(x)
    return out, provenance.table(tracker.tag(out), tuple(out.shape)).expand(out.shape)


@settings(max_examples=40, deadline=None)
@given(
    names=st.lists(st.sampled_from(sorted(OPERATIONS)), min_size=1, max_size=4),
    seed=st.integers(0, 2**16),
)
def test_tags_name_every_example_a_value_depends_on(names, seed):
    """Perturbing example ``b`` changes only elements tagged ``b`` (or mixed); a chain of
    operations that never combines examples tags every element with one example or none.
    (The perturbation is small enough to leave every sort order and routing as it was: tags
    say whose row each is, for the order the batch gave.)"""
    torch.manual_seed(seed)

    def f(x):
        for name in names:
            x = OPERATIONS[name][0](x)
        return x

    x = torch.randn(B, T, D, dtype=torch.float64)
    out, tags = _tagged(f, x)
    for b in range(B):
        moved = x.clone()
        moved[b] += 1e-8 * torch.randn(T, D, dtype=torch.float64)
        changed = f(moved) != out
        assert bool(((tags[changed] == b) | (tags[changed] == provenance.MIXED)).all())
    if not any(OPERATIONS[name][1] for name in names):
        assert bool((tags != provenance.MIXED).all())


@settings(max_examples=60, deadline=None)
@given(
    batch=st.integers(1, 4),
    sizes=st.lists(st.integers(1, 4), min_size=1, max_size=3),
    data=st.data(),
)
def test_a_view_keeps_the_batch_as_a_digit_of_the_index(batch, sizes, data):
    """Viewing ``(B, …)`` as any shape: the example of every element is what the same view of
    the example ids gives."""
    shape = (batch, *sizes)
    numel = batch * int(torch.tensor(sizes).prod())
    factors = [d for d in range(1, numel + 1) if numel % d == 0]
    first = data.draw(st.sampled_from(factors))
    second = data.draw(st.sampled_from([d for d in factors if (numel // first) % d == 0]))
    after = (first, second, numel // first // second)
    tag = provenance.reshaped(provenance.batch(len(shape), batch), shape, after)
    expected = torch.arange(batch).view(batch, *[1] * len(sizes)).expand(shape).reshape(after)
    got = provenance.table(tag, after).expand(after) if not isinstance(tag, torch.Tensor) else tag
    assert torch.equal(got.expand(after), expected)


# never silently wrong: each of these either matches one backward per example or is refused --


def _data_alias(h):
    h = h.clone()
    h.data.copy_(h.data.roll(1, 0))  # through .data: no view, no shared version counter
    return h


def _chunk_written(h):
    left, right = h.clone().unsafe_chunk(2, 1)
    left.add_(left.roll(1, 0))  # a chunk written; its sibling read after
    return torch.cat([right, right], 1)


def _dtype_view_written(h):
    h = h.clone()
    as_float = h.view(torch.float32)
    as_float[1:].copy_(as_float[:-1].clone())
    return h


MIDDLES = {
    "a rank in the batch used as data": lambda h: h + h.argsort(0).argsort(0).to(h.dtype),
    "written through .data": _data_alias,
    "one chunk written, its sibling read": _chunk_written,
    "written through a view of another type": _dtype_view_written,
    "pixel_unshuffle of one sample": lambda h: torch.pixel_unshuffle(
        h.reshape(1, len(h), 2, 2), 2
    ).reshape(len(h), 4),
}


@pytest.mark.filterwarnings("ignore::pergrad.FallbackWarning")
@pytest.mark.parametrize("case", sorted(MIDDLES))
def test_rows_moved_by_aliases_or_ranks_are_never_silently_wrong(case):
    torch.manual_seed(0)
    model = Wrapped(MIDDLES[case]).double()
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    try:  # statistics() compares every number with one backward per example
        statistics(model, _squared, x, y, verify=False)
    except pergrad.InputError as error:
        assert "combines examples" in str(error)


@pytest.mark.parametrize("weighted", ["class weights", "pos_weight"])
def test_loss_weights_computed_from_the_batch_are_refused(weighted):
    def loss_fn(output, target):
        if weighted == "class weights":
            weight = 1 / (1 + torch.bincount(target, minlength=2).to(output.dtype))
            return nn.functional.cross_entropy(output, target, weight, reduction="none")
        positive = target.to(output.dtype)
        ratio = (1 - positive).sum() / (1 + positive.sum())
        return nn.functional.binary_cross_entropy_with_logits(
            output[:, 0], positive, pos_weight=ratio, reduction="none"
        )

    torch.manual_seed(0)
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 1])
    tracker = provenance.Provenance()
    with tracker:
        tracker.set(x, provenance.batch(2, 4))
        tracker.set(y, provenance.batch(1, 4))
        losses = loss_fn(nn.Linear(3, 2).double()(x), y)
    assert bool((provenance.table(tracker.tag(losses), (4,)) == provenance.MIXED).all())
    engine = pergrad.PerExample(nn.Linear(3, 2).double(), loss_fn, verify=False)
    with pytest.raises(pergrad.InputError, match="depends on the other examples|combines"):
        engine.backward(x, y)


def _families():
    """Small models of families the per-layer path was not written for, from configs."""
    transformers = pytest.importorskip("transformers")
    text = dict(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=32,
    )  # fmt: skip
    image = dict(image_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2)
    return {
        "roberta": lambda: transformers.RobertaModel(transformers.RobertaConfig(**text)),
        "t5": lambda: transformers.T5EncoderModel(
            transformers.T5Config(vocab_size=50, d_model=16, d_kv=8, d_ff=32, num_layers=1)
        ),
        "gpt_neox": lambda: transformers.GPTNeoXModel(transformers.GPTNeoXConfig(**text)),
        "mistral": lambda: transformers.MistralModel(
            transformers.MistralConfig(**text, num_key_value_heads=1)
        ),
        "phi": lambda: transformers.PhiModel(transformers.PhiConfig(**text)),
        "bloom": lambda: transformers.BloomModel(
            transformers.BloomConfig(vocab_size=50, hidden_size=16, n_layer=1, n_head=2)
        ),
        "deit": lambda: transformers.DeiTModel(
            transformers.DeiTConfig(**image, patch_size=8, intermediate_size=32)
        ),
        "segformer": lambda: transformers.SegformerModel(
            transformers.SegformerConfig(
                num_encoder_blocks=2,
                depths=[1, 1],
                sr_ratios=[2, 1],
                hidden_sizes=[8, 16],
                num_attention_heads=[1, 2],
            )  # fmt: skip
        ),
    }


@pytest.mark.parametrize(
    "family", ["roberta", "t5", "gpt_neox", "mistral", "phi", "bloom", "deit", "segformer"]
)
def test_hugging_face_families_are_followed_to_each_examples_output(family):
    torch.manual_seed(0)
    model = _families()[family]().double()
    b = 3
    if family in ("deit", "segformer"):
        x = {"pixel_values": torch.randn(b, 3, 32, 32, dtype=torch.float64)}
    else:
        mask = torch.ones(b, 8, dtype=torch.long)
        mask[1, -2:] = 0
        x = {"input_ids": torch.randint(3, 50, (b, 8)), "attention_mask": mask}
    tracker = provenance.Provenance()
    for tensor in x.values():
        tracker.set(tensor, provenance.batch(tensor.dim(), b))
    with tracker:
        per_example = model(**x).last_hidden_state.reshape(b, -1).sum(1)
    assert tracker.unknown == []
    tags = provenance.table(tracker.tag(per_example), (b,)).expand(b)
    assert torch.equal(tags, torch.arange(b))
