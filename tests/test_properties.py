"""Properties over random architectures, batch sizes, chunkings, orders and splits."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from zoo import ATOL, CROSS_ENTROPY, RTOL, assert_close_dicts, reference_grads

import pergrad

SETTINGS = settings(max_examples=20, deadline=None)


@st.composite
def mlps(draw):
    widths = draw(st.lists(st.integers(1, 6), min_size=2, max_size=4))
    layers: list[nn.Module] = []
    for fan_in, fan_out in zip(widths, widths[1:]):
        layers += [nn.Linear(fan_in, fan_out, bias=draw(st.booleans())), nn.Tanh()]
    layers.append(nn.Linear(widths[-1], 3))
    batch = draw(st.integers(1, 9))
    torch.manual_seed(draw(st.integers(0, 2**16)))
    return nn.Sequential(*layers).double(), torch.randn(batch, widths[0], dtype=torch.float64)


@st.composite
def cnns(draw):
    channels, groups = draw(st.sampled_from([(2, 1), (4, 2), (6, 3)]))
    size, kernel = draw(st.integers(4, 7)), draw(st.integers(1, 3))
    stride, padding = draw(st.integers(1, 2)), draw(st.integers(0, 1))
    conv = nn.Conv2d(2, channels, kernel, stride=stride, padding=padding)
    side = (size + 2 * padding - kernel) // stride + 1
    model = nn.Sequential(
        conv,
        nn.GroupNorm(groups, channels),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(channels * side**2, 3),
    )
    batch = draw(st.integers(1, 6))
    torch.manual_seed(draw(st.integers(0, 2**16)))
    return model.double(), torch.randn(batch, 2, size, size, dtype=torch.float64)


models = st.one_of(mlps(), cnns())


@SETTINGS
@given(models, st.sampled_from(["func", "hooks", "loop"]))
def test_random_architectures_match_one_backward_per_example(model_and_input, mode):
    model, x = model_and_input
    y = torch.randint(0, 3, (len(x),))
    grads = pergrad.PerExample(model, CROSS_ENTROPY, mode=mode).grads(x, y)
    assert_close_dicts(grads, reference_grads(model, CROSS_ENTROPY, x, y))


def _statistics(model):
    """``{name: (n, mean, mean of squares)}`` as ``backward`` left them."""
    return {
        n: (pergrad.grad_stats(p).count, p.grad.clone(), pergrad.grad_stats(p).sq_mean.clone())
        for n, p in model.named_parameters()
    }


def _assert_same_statistics(actual, expected):
    for name, (count, mean, sq_mean) in expected.items():
        assert actual[name][0] == count, name
        torch.testing.assert_close(actual[name][1], mean, rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(actual[name][2], sq_mean, rtol=RTOL, atol=ATOL)


@SETTINGS
@given(models, st.integers(1, 10), st.randoms(use_true_random=False))
def test_chunking_order_and_splits_never_change_the_statistics(model_and_input, chunk, rng):
    model, x = model_and_input
    y = torch.randint(0, 3, (len(x),))
    whole = pergrad.PerExample(model, CROSS_ENTROPY)
    whole.backward(x, y)
    expected = _statistics(model)
    whole.zero_grad()

    pergrad.PerExample(model, CROSS_ENTROPY, chunk_size=chunk).backward(x, y)
    _assert_same_statistics(_statistics(model), expected)
    whole.zero_grad()

    order = torch.tensor(rng.sample(range(len(x)), len(x)))
    whole.backward(x[order], y[order])
    _assert_same_statistics(_statistics(model), expected)
    whole.zero_grad()

    cuts = sorted(rng.sample(range(1, len(x)), rng.randint(0, len(x) - 1))) if len(x) > 1 else []
    for start, stop in zip([0, *cuts], [*cuts, len(x)]):
        whole.backward(x[start:stop], y[start:stop])
    _assert_same_statistics(_statistics(model), expected)
