"""Bad input gets a clear error that says what was wrong and what to do."""

import pytest
import torch
from torch import nn
from zoo import CASES, CROSS_ENTROPY

import pergrad


@pytest.fixture
def mlp():
    model, (x,), y = CASES["mlp"].build(4)
    return model, x, y


@pytest.mark.parametrize("mode", ["auto", "func", "hooks", "loop"])
def test_a_loss_reduced_over_the_batch_is_refused(mlp, mode):
    model, x, y = mlp
    engine = pergrad.PerExample(model, nn.CrossEntropyLoss(), mode=mode)
    with pytest.raises(ValueError, match=r"one loss per example.*reduction='none'"):
        engine.backward(x, y)
    assert engine.mode == mode  # a user error never counts against a mode


@pytest.mark.parametrize("mode", ["auto", "func", "loop"])
def test_a_loss_of_shape_b_by_1_is_reported_with_the_batch_passed(mode):
    model = nn.Linear(3, 1).double()
    loss = lambda out, y: (out - y).square()  # noqa: E731  (B, 1): one dimension too many
    engine = pergrad.PerExample(model, loss, mode=mode)
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 1, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"\(5,\)|batch of 5") as error:
        engine.backward(x, y)
    assert "flatten(1)" in str(error.value)


@pytest.mark.parametrize("mode", ["func", "hooks", "loop"])
def test_a_loss_with_extra_dimensions_is_refused(mode):
    model = nn.Linear(3, 2).double()
    engine = pergrad.PerExample(model, nn.MSELoss(reduction="none"), mode=mode)
    with pytest.raises(ValueError, match=r"got shape \(.*2\).*flatten\(1\)"):
        engine.backward(torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 2).double())


def test_inputs_and_target_must_agree_on_the_batch_size(mlp):
    model, x, y = mlp
    with pytest.raises(ValueError, match=r"disagree on the batch size.*inputs\[0\]: 4.*target: 3"):
        pergrad.PerExample(model, CROSS_ENTROPY).backward(x, y[:3])


def test_several_inputs_must_agree_too():
    model, (x, z), y = CASES["two_inputs"].build(4)
    with pytest.raises(ValueError, match=r"inputs\[1\]: 2"):
        pergrad.PerExample(model, CROSS_ENTROPY).grads((x, z[:2]), y)


def test_an_empty_batch_is_refused(mlp):
    model, x, y = mlp
    with pytest.raises(ValueError, match="empty"):
        pergrad.PerExample(model, CROSS_ENTROPY).backward(x[:0], y[:0])


@pytest.mark.parametrize("bad", [[[1.0] * 6] * 4, 3.0, "x"], ids=["list", "float", "str"])
def test_non_tensor_inputs_are_refused(mlp, bad):
    model, _, y = mlp
    with pytest.raises(TypeError, match="Tensor"):
        pergrad.PerExample(model, CROSS_ENTROPY).backward(bad, y)


def test_a_non_tensor_target_is_refused(mlp):
    model, x, _ = mlp
    with pytest.raises(TypeError, match="target is a list"):
        pergrad.PerExample(model, CROSS_ENTROPY).backward(x, [0, 1, 2, 0])


def test_zero_dimensional_inputs_are_refused(mlp):
    model, _, y = mlp
    with pytest.raises(ValueError, match="0-dimensional"):
        pergrad.PerExample(model, CROSS_ENTROPY).backward(torch.tensor(1.0), y)


def test_batchnorm_in_training_mode_is_refused_by_name():
    model = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.Linear(5, 3))
    with pytest.raises(
        ValueError, match=r"layer '1' \(BatchNorm1d\).*model\[1\]\.eval\(\).*GroupNorm"
    ):
        pergrad.PerExample(model, CROSS_ENTROPY).backward(torch.randn(4, 6), torch.zeros(4).long())


def test_a_model_with_nothing_to_differentiate_is_refused():
    model = nn.Embedding(5, 3)
    model.weight.requires_grad_(False)
    loss = lambda out, y: out.sum(-1)  # noqa: E731
    with pytest.raises(ValueError, match="no trainable floating-point parameter"):
        pergrad.PerExample(model, loss).backward(torch.tensor([1, 2]), torch.zeros(2))


def test_integer_only_models_are_refused():
    class Counter(nn.Module):
        def __init__(self):
            super().__init__()
            self.table = nn.Parameter(torch.arange(5), requires_grad=False)

        def forward(self, x):
            return self.table[x].float()

    with pytest.raises(ValueError, match="nothing to differentiate"):
        pergrad.PerExample(Counter(), lambda o, y: o).backward(torch.tensor([1, 2]), torch.zeros(2))


@pytest.mark.parametrize("mode", ["func", "hooks", "loop"])
def test_non_finite_gradients_are_reported_and_nothing_is_accumulated(mlp, mode):
    model, x, y = mlp
    x = x.clone()
    x[2, 0] = float("nan")
    engine = pergrad.PerExample(model, CROSS_ENTROPY, mode=mode)
    with pytest.raises(FloatingPointError, match="non-finite.*0.weight"):
        engine.backward(x, y)
    assert all(p.grad is None and pergrad.grad_stats(p) is None for p in model.parameters())
    with pytest.raises(FloatingPointError, match="per-example gradients"):
        engine.grads(x, y)


def test_a_grad_not_computed_by_pergrad_is_refused(mlp):
    model, x, y = mlp
    CROSS_ENTROPY(model(x), y).mean().backward()
    with pytest.raises(ValueError, match=r"did not compute.*zero_grad"):
        pergrad.PerExample(model, CROSS_ENTROPY).backward(x, y)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mode": "vmap"}, "Invalid mode"),
        ({"chunk_size": 0}, "Invalid chunk_size"),
        ({"chunk_size": True}, "Invalid chunk_size"),
        ({"chunk_size": 2.5}, "Invalid chunk_size: 2.5; use None or an int >= 1"),
        ({"chunk_size": "4"}, "Invalid chunk_size: '4'; use None or an int >= 1"),
    ],
)
def test_invalid_arguments_are_refused_at_construction(mlp, kwargs, match):
    with pytest.raises(ValueError, match=match):
        pergrad.PerExample(mlp[0], CROSS_ENTROPY, **kwargs)


def test_the_model_and_loss_must_be_what_they_say():
    with pytest.raises(TypeError, match="nn.Module"):
        pergrad.PerExample(lambda x: x, CROSS_ENTROPY)
    with pytest.raises(TypeError, match="callable"):
        pergrad.PerExample(nn.Linear(2, 2), "cross_entropy")


def test_a_bug_in_the_model_surfaces_as_the_model_raises_it():
    model = nn.Linear(6, 3).double()
    engine = pergrad.PerExample(model, CROSS_ENTROPY)
    with pytest.raises(RuntimeError, match="mat1 and mat2 shapes cannot be multiplied"):
        engine.backward(torch.randn(4, 5, dtype=torch.float64), torch.zeros(4).long())
    assert engine.mode == "auto"
