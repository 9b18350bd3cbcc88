"""Every mode against one autograd backward per example, on every model in the zoo."""

import warnings

import pytest
import torch
from zoo import (
    ALL_MODES,
    CASES,
    CROSS_ENTROPY,
    TimesTransposed,
    assert_close_dicts,
    reference_grads,
)

import pergrad

PAIRS = [(case, mode) for case in CASES for mode in sorted(ALL_MODES)]


@pytest.mark.parametrize(("case", "mode"), PAIRS, ids=[f"{c}-{m}" for c, m in PAIRS])
@pytest.mark.parametrize("batch_size", [1, 5])
def test_mode_matches_one_backward_per_example(case, mode, batch_size):
    spec = CASES[case]
    model, inputs, target = spec.build(batch_size)
    engine = pergrad.PerExample(model, CROSS_ENTROPY, mode=mode)
    if mode not in spec.modes:
        with pytest.raises(pergrad.ModeError, match=f"mode='{mode}' cannot run this model"):
            engine.grads(inputs, target)
        return
    expected = reference_grads(model, CROSS_ENTROPY, inputs, target)
    grads = engine.grads(inputs, target)
    assert_close_dicts(grads, expected)
    assert not any(g.requires_grad for g in grads.values())  # plain numbers, no graph kept
    assert engine.mode == mode


@pytest.mark.parametrize("case", list(CASES))
def test_auto_matches_one_backward_per_example(case):
    """``grads()`` in ``"auto"``: per-layer rules and layer-local ``torch.func`` where they
    apply, and for every other parameter the first whole-model mode that runs the model,
    announced once; no whole-model mode runs where nothing needs it."""
    spec = CASES[case]
    model, inputs, target = spec.build(4)
    engine = pergrad.PerExample(model, CROSS_ENTROPY)
    assert engine.mode == "auto"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", pergrad.FallbackWarning)
        grads = engine.grads(inputs, target)
    assert_close_dicts(grads, reference_grads(model, CROSS_ENTROPY, inputs, target))
    assert not any(g.requires_grad for g in grads.values())  # whole-model modes' too
    rest = {name for name, source in engine.sources.items() if source in ALL_MODES}
    assert {engine.sources[name] for name in rest} <= {spec.auto}
    assert engine.mode == spec.auto
    messages = [str(w.message) for w in caught]
    assert any("the layer-local path covers" in m for m in messages) == bool(rest)
    assert any(f"Using mode='{spec.auto}'" in m for m in messages) == (
        spec.auto not in ("layerwise", "func")
    )


class OutsideUse(torch.nn.Module):
    """``.item()`` control flow (no ``vmap``), and a weight also used outside its layer, by a
    custom autograd Function."""

    def __init__(self):
        super().__init__()
        self.hidden = torch.nn.Linear(6, 5)
        self.out = torch.nn.Linear(5, 3)

    def forward(self, x):
        h = torch.tanh(self.hidden(x))
        assert torch.isfinite(h).all().item()
        return self.out(h) + TimesTransposed.apply(h, self.hidden.weight[:3, :5])


def test_auto_sends_what_the_layers_leave_to_a_whole_model_mode_that_runs_it():
    torch.manual_seed(0)
    model = OutsideUse().double()
    x, y = torch.randn(4, 6, dtype=torch.float64), torch.randint(0, 3, (4,))
    engine = pergrad.PerExample(model, CROSS_ENTROPY)
    with pytest.warns(pergrad.FallbackWarning) as record:
        grads = engine.grads(x, y)
    assert_close_dicts(grads, reference_grads(model, CROSS_ENTROPY, x, y))
    messages = " ".join(str(w.message) for w in record)
    assert "'hidden.weight': used outside the Linear layer that owns it" in messages
    assert "mode='func' failed" in messages
    assert engine.sources["hidden.weight"] == engine.mode != "func"
    assert engine.sources["out.weight"] == "Linear"


def test_auto_warning_names_the_layer_and_decides_once():
    model, inputs, target = CASES["no_vmap"].build(3)
    engine = pergrad.PerExample(model, CROSS_ENTROPY)
    with pytest.warns(pergrad.FallbackWarning) as record:
        engine.grads(inputs, target)
    messages = [str(w.message) for w in record]
    assert sum("mode='func' failed" in m for m in messages) == 1
    assert (
        sum("'cubed.weight': CubedScale: torch.func cannot replay it" in m for m in messages) == 1
    )
    engine.grads(inputs, target)  # no second warning: the filter turns one into an error
    assert engine.mode == "loop"


def test_hooks_refuses_per_example_gradients_in_the_wrong_order(monkeypatch):
    """The weighted check ``Σ_b c_b g_b = ∇ Σ_b c_b ℓ_b`` catches a permutation, which the sum
    check cannot (Opacus's DP RNNs return packed sequences' samples sorted by length)."""
    model, inputs, target = CASES["mlp"].build(4)
    engine = pergrad.PerExample(model, CROSS_ENTROPY, mode="hooks")
    assert_close_dicts(
        engine.grads(inputs, target), reference_grads(model, CROSS_ENTROPY, inputs, target)
    )
    monkeypatch.setattr(
        pergrad.modes.hooks.HooksMode,
        "_grad_sample",
        _flipped(pergrad.modes.hooks.HooksMode._grad_sample),
    )
    with pytest.raises(pergrad.ModeError, match="permuted or mixed between examples"):
        engine.grads(inputs, target)


def _flipped(grad_sample):
    def wrapped(self, name, p, total, size):
        p.grad_sample = p.grad_sample.flip(0)
        return grad_sample(self, name, p, total, size)

    return wrapped


def test_func_mode_draws_a_dropout_mask_per_example():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(6, 50), torch.nn.Dropout(0.5), torch.nn.Linear(50, 3)
    )
    x = torch.randn(1, 6).expand(8, 6)  # eight copies of one example
    y = torch.zeros(8, dtype=torch.long)
    random = pergrad.PerExample(model, CROSS_ENTROPY, mode="func", verify=False)  # no reference
    grads = random.grads(x, y)["0.weight"]
    distinct = {tuple(g.flatten().ne(0).tolist()) for g in grads}
    assert len(distinct) == 8, "every example must get its own dropout mask"
    model.eval()
    grads = pergrad.PerExample(model, CROSS_ENTROPY, mode="func").grads(x, y)["0.weight"]
    torch.testing.assert_close(grads, grads[:1].expand_as(grads))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("mode", sorted(ALL_MODES))
def test_every_float_dtype(dtype, mode):
    model, (x,), y = CASES["mlp"].build(4)
    model = model.to(dtype)
    x = x.to(dtype)
    expected = reference_grads(model, CROSS_ENTROPY, x, y)
    grads = pergrad.PerExample(model, CROSS_ENTROPY, mode=mode).grads(x, y)
    tolerance = {"rtol": 2e-2, "atol": 2e-2} if dtype == torch.bfloat16 else {}
    assert all(g.dtype == dtype for g in grads.values())
    assert_close_dicts(grads, expected, **tolerance)


def test_tied_parameter_appears_once_with_the_sum_of_both_uses():
    model, inputs, target = CASES["tied"].build(3)
    engine = pergrad.PerExample(model, CROSS_ENTROPY)
    grads = engine.grads(inputs, target)
    assert "embed.weight" in grads and "out.weight" not in grads
    assert engine.sources["embed.weight"] == "Embedding+Linear"


def test_frozen_parameters_are_left_out():
    model, inputs, target = CASES["frozen"].build(3)
    grads = pergrad.PerExample(model, CROSS_ENTROPY).grads(inputs, target)
    assert set(grads) == {"0.bias", "2.weight", "2.bias"}


@pytest.mark.parametrize("mode", sorted(ALL_MODES))
def test_the_model_is_left_as_it_was_found(mode):
    model, inputs, target = CASES["cnn1d_groupnorm"].build(3)
    before_modules = {name: dict(vars(m)) for name, m in model.named_modules()}
    before_params = {name: dict(vars(p)) for name, p in model.named_parameters()}
    pergrad.PerExample(model, CROSS_ENTROPY, mode=mode).grads(inputs, target)
    for name, m in model.named_modules():
        assert vars(m).keys() == before_modules[name].keys(), name
        assert not m._forward_hooks and not m._backward_hooks and not m._forward_pre_hooks
    for name, p in model.named_parameters():
        assert vars(p).keys() == before_params[name].keys(), name
        assert p.grad is None


@pytest.mark.parametrize("mode", sorted(ALL_MODES))
def test_the_model_is_left_clean_when_a_mode_fails(mode):
    model, inputs, target = CASES["no_vmap"].build(3)
    before = {name: dict(vars(m)).keys() for name, m in model.named_modules()}
    engine = pergrad.PerExample(model, CROSS_ENTROPY, mode=mode)
    if mode == "loop":
        engine.grads(inputs, target)
    else:
        with pytest.raises(pergrad.ModeError):
            engine.grads(inputs, target)
    for name, m in model.named_modules():
        assert dict(vars(m)).keys() == before[name], name
        assert not m._forward_hooks and not m._backward_hooks
    for p in model.parameters():
        assert not [a for a in vars(p) if "grad_sample" in a or "forward_counter" in a]


def test_parameters_are_not_copied():
    model, inputs, target = CASES["mlp"].build(3)
    engine = pergrad.PerExample(model, CROSS_ENTROPY)
    engine.backward(inputs, target)
    assert engine.model is model
    assert all(p.grad is not None for p in model.parameters())


def test_fallback_warning_points_at_the_callers_line():
    model, inputs, target = CASES["no_vmap"].build(3)
    engine = pergrad.PerExample(model, CROSS_ENTROPY)
    with pytest.warns(pergrad.FallbackWarning) as record:
        engine.grads(inputs, target)
    assert {w.filename for w in record if w.category is pergrad.FallbackWarning} == {__file__}


def test_grads_come_in_each_parameters_dtype_under_autocast():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.LayerNorm(6), torch.nn.Linear(6, 3))
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        grads = pergrad.PerExample(model, CROSS_ENTROPY).grads(x, y)
    assert {g.dtype for g in grads.values()} == {torch.float32}


class TimeFirst(torch.nn.Module):
    """A Linear on ``(T, B, 2)``: Opacus takes ``T`` for the batch."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(2, 1)

    def forward(self, x):
        return self.linear(x.transpose(0, 1)).sum((0, 2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_hooks_refuses_rows_of_other_examples_in_half_precision_too(dtype):
    """T = B = 8: Opacus's per-example gradients are those of the time steps; the weighted
    check, in float32 whatever the gradients' dtype, sees it in float16 too."""
    torch.manual_seed(0)
    size = 8
    x = torch.rand(size, size, 2) * torch.arange(1, size + 1).view(size, 1, 1)
    model, x = TimeFirst().to(dtype), (1500 * x / size).to(dtype)
    engine = pergrad.PerExample(model, lambda out, y: out - y, mode="hooks")
    with pytest.raises(pergrad.ModeError, match="not each example's own"):
        engine.grads(x, torch.zeros(size, dtype=dtype))
