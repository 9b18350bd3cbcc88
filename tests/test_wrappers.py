"""Models handed over inside wrappers: torch.compile and DistributedDataParallel are seen
through, with exact numbers; wrappers pergrad cannot see through are refused."""

import pytest
import torch
import torch.distributed as dist
from test_distributed import _group_of_one
from torch import nn
from zoo import CASES, CROSS_ENTROPY, assert_close_dicts, reference_grads, statistics

import pergrad


def _compiled(where: str, backend: str = "eager"):
    model, inputs, target = CASES["transformer"].build(5)
    if where == "whole":
        model = torch.compile(model, backend=backend)
    else:  # a user compiling one block of the model
        model.encoder = torch.compile(model.encoder, backend=backend)
    return model, inputs, target


@pytest.mark.parametrize("backend", ["eager", "inductor"])
@pytest.mark.parametrize("where", ["whole", "submodule"])
def test_a_compiled_model_gives_exact_numbers_on_every_call(where, backend):
    if backend == "inductor" and where == "submodule":
        pytest.skip("one inductor compilation is enough: it costs seconds")
    model, inputs, target = _compiled(where, backend)
    model(*inputs)  # the compiled graph has run before pergrad sees the model
    for _ in range(2):  # a second engine on the same model, after the first one's calls
        with pytest.warns(pergrad.FallbackWarning, match="compiled by torch.compile"):
            sources = statistics(model, CROSS_ENTROPY, inputs, target)
        assert set(sources) == {n for n, p in model.named_parameters() if p.requires_grad}
        assert "func" not in sources.values() and "loop" not in sources.values()
    model(*inputs).sum().backward()  # and the compiled model still runs as it is


class Counted:
    """A ``torch.compile`` backend that runs each graph as it is and counts the graphs it
    compiled and the times a compiled graph ran."""

    def __init__(self):
        self.compiled = self.ran = 0

    def __call__(self, graph, example_inputs):
        self.compiled += 1

        def run(*args):
            self.ran += 1
            return graph.forward(*args)

        return run


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 2)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_a_model_compiled_in_place_runs_compiled_after_pergrad():
    backend = Counted()
    model = Net()
    model.compile(backend=backend)  # in place, as PyTorch's docs suggest
    x, y = torch.randn(5, 4), torch.randint(0, 2, (5,))
    model(x)
    assert (backend.compiled, backend.ran) == (1, 1)
    with pytest.warns(pergrad.FallbackWarning, match="compiled by torch.compile"):
        engine = pergrad.PerExample(model, CROSS_ENTROPY)
        grads = engine.grads(x, y)
    assert set(engine.sources.values()) == {"Linear"}
    assert backend.compiled == 1  # pergrad's calls were not traced
    plain = Net()
    plain.load_state_dict(model.state_dict())
    assert_close_dicts(grads, reference_grads(plain, CROSS_ENTROPY, x, y), rtol=1e-5, atol=1e-6)
    model(x)
    other = Net()
    other.compile(backend=backend)
    other(x)  # another instance of the class too
    assert (backend.compiled, backend.ran) == (1, 3)


def test_a_compiled_model_warns_once_per_engine():
    model, inputs, target = _compiled("whole")
    with pytest.warns(pergrad.FallbackWarning, match="compiled") as caught:
        engine = pergrad.PerExample(model, CROSS_ENTROPY)
        for _ in range(3):
            engine.backward(inputs, target)
            engine.zero_grad()
    assert len([w for w in caught if "compiled" in str(w.message)]) == 1


def test_a_ddp_model_is_seen_through_with_its_names_and_its_group():
    model, inputs, target = CASES["mlp"].build(6)
    with _group_of_one() as group:
        wrapped = nn.parallel.DistributedDataParallel(model)
        engine = pergrad.PerExample(wrapped, CROSS_ENTROPY)
        assert engine.process_group is group
        sources = statistics(wrapped, CROSS_ENTROPY, inputs, target)
        assert set(sources) == {name for name, _ in wrapped.named_parameters()}
        assert all(name.startswith("module.") for name in sources)
        compiled = torch.compile(wrapped, backend="eager")  # a compiled DDP is seen through too
        with pytest.warns(pergrad.FallbackWarning, match="compiled"):
            assert pergrad.PerExample(compiled, CROSS_ENTROPY).process_group is group


class DeepSpeedEngine(nn.Module):
    """Stands for DeepSpeed's engine, which is refused by its type's name."""

    def __init__(self, module):
        super().__init__()
        self.module = module


class FullyShardedDataParallel(nn.Module):
    """Stands for FSDP's first version, refused by its type's name (FSDP2 is supported)."""

    def __init__(self, module):
        super().__init__()
        self.module = module


def _dtensor_parameter():
    from torch.distributed.tensor import DeviceMesh, distribute_tensor

    model = CASES["mlp"].make().double()
    mesh = DeviceMesh("cpu", [0])
    model[0].weight = nn.Parameter(distribute_tensor(model[0].weight.detach(), mesh))
    return model


REFUSED = {
    "DataParallel": (lambda: nn.DataParallel(CASES["mlp"].make()), "DistributedDataParallel"),
    "DDP inside a model": (
        lambda: nn.Sequential(nn.parallel.DistributedDataParallel(CASES["mlp"].make())),
        "Wrap the whole model in DDP",
    ),
    "DeepSpeed": (lambda: DeepSpeedEngine(CASES["mlp"].make()), "engine.module"),
    "FSDP's first version": (
        lambda: FullyShardedDataParallel(CASES["mlp"].make()),
        "fully_shard instead",
    ),
    "a DTensor parameter outside FSDP2": (_dtensor_parameter, "DTensor outside FSDP"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_a_wrapper_pergrad_cannot_see_through_is_refused_at_construction(case):
    make, message = REFUSED[case]
    with _group_of_one():
        model = make()
        with pytest.raises(pergrad.InputError, match=message):
            pergrad.PerExample(model, CROSS_ENTROPY)
    assert not dist.is_initialized()
