"""Every mode against one autograd backward per example, on every model in the zoo."""

import warnings

import pytest
import torch
from zoo import ALL_MODES, CASES, CROSS_ENTROPY, assert_close_dicts, reference_grads

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
    assert_close_dicts(engine.grads(inputs, target), expected)
    assert engine.mode == mode


@pytest.mark.parametrize("case", list(CASES))
def test_auto_matches_one_backward_per_example(case):
    """``grads()`` in ``"auto"``: per-layer rules where they apply, and for every other
    parameter the fastest per-example mode that runs the model, each announced once."""
    spec = CASES[case]
    model, inputs, target = spec.build(4)
    engine = pergrad.PerExample(model, CROSS_ENTROPY)
    assert engine.mode == "auto"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", pergrad.FallbackWarning)
        grads = engine.grads(inputs, target)
    assert_close_dicts(grads, reference_grads(model, CROSS_ENTROPY, inputs, target))
    rest = {name for name, source in engine.sources.items() if source in ALL_MODES}
    assert {engine.sources[name] for name in rest} <= {spec.auto}
    assert engine.mode == spec.auto  # chosen on the first call, whether or not rules cover all
    messages = [str(w.message) for w in caught]
    assert any("no per-layer rule covers" in m for m in messages) == bool(rest)
    assert any(f"Using mode='{spec.auto}'" in m for m in messages) == (spec.auto != "func")


@pytest.mark.parametrize("case", ["item", "custom_function"])
def test_auto_uses_hooks_for_what_no_rule_covers_where_vmap_cannot_run(case):
    model, inputs, target = CASES[case].build(4)
    # RMSNorm: Opacus knows it, pergrad has no per-layer rule for it
    model.hidden = torch.nn.Sequential(model.hidden, torch.nn.RMSNorm(5).double())
    engine = pergrad.PerExample(model, CROSS_ENTROPY)
    with pytest.warns(pergrad.FallbackWarning) as record:
        grads = engine.grads(inputs, target)
    assert_close_dicts(grads, reference_grads(model, CROSS_ENTROPY, inputs, target))
    assert engine.sources["hidden.1.weight"] == engine.mode == "hooks"
    assert engine.sources["hidden.0.weight"] == "Linear"
    assert any("Using mode='hooks'" in str(w.message) for w in record)


def test_auto_warning_names_the_layer_and_decides_once():
    model, inputs, target = CASES["gru"].build(3)
    engine = pergrad.PerExample(model, CROSS_ENTROPY)
    with pytest.warns(pergrad.FallbackWarning) as record:
        engine.grads(inputs, target)
    messages = [str(w.message) for w in record]
    assert sum("mode='func' failed: in layer 'rnn' (GRU)" in m for m in messages) == 1
    assert sum("no per-layer rule for GRU" in m for m in messages) == 1
    engine.grads(inputs, target)  # no second warning: the filter turns one into an error
    assert engine.mode == "loop"


def test_auto_falls_back_from_hooks_when_random_layers_defeat_the_check():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(6, 5),
        torch.nn.Dropout(0.5),
        pergrad_item_guard(),
        torch.nn.RMSNorm(5),  # no per-layer rule: its weight needs a per-example mode
        torch.nn.Linear(5, 3),
    ).double()
    x, y = torch.randn(4, 6, dtype=torch.float64), torch.randint(0, 3, (4,))
    engine = pergrad.PerExample(model, CROSS_ENTROPY)
    with pytest.warns(pergrad.FallbackWarning) as record:
        engine.grads(x, y)
    assert any("differ from one backward per example" in str(w.message) for w in record)
    assert engine.mode == "loop" and engine.sources["3.weight"] == "loop"


class pergrad_item_guard(torch.nn.Module):  # noqa: N801 - reads as a layer in the Sequential
    def forward(self, h):
        assert torch.isfinite(h).all().item()
        return h


def test_func_mode_draws_a_dropout_mask_per_example():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(6, 50), torch.nn.Dropout(0.5), torch.nn.Linear(50, 3)
    )
    x = torch.randn(1, 6).expand(8, 6)  # eight copies of one example
    y = torch.zeros(8, dtype=torch.long)
    grads = pergrad.PerExample(model, CROSS_ENTROPY, mode="func").grads(x, y)["0.weight"]
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
    with pytest.warns(pergrad.FallbackWarning, match="tied weights"):
        grads = pergrad.PerExample(model, CROSS_ENTROPY).grads(inputs, target)
    assert "embed.weight" in grads and "out.weight" not in grads


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
    model, inputs, target = CASES["gru"].build(3)
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
