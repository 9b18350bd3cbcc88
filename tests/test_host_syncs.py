"""What a GPU punishes, counted on the CPU: values sent from the device to the host. Per step,
``backward`` and ``step()`` send a number of them that does not grow with the number of
parameters, whatever the optimizer's options."""

import pytest
import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from zoo import CROSS_ENTROPY

import optim
import pergrad

TO_HOST = {
    Tensor.item, Tensor.tolist, Tensor.numpy,
    Tensor.__float__, Tensor.__int__, Tensor.__bool__, Tensor.__index__,
}  # fmt: skip
"""The calls that wait for the device and copy a value to the host."""


class CountToHost(TorchFunctionMode):
    """Counts the calls of :data:`TO_HOST` made while it is entered."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.count += func in TO_HOST
        return func(*args, **(kwargs or {}))


def _syncs_per_step(depth: int, kind, options: dict) -> int:
    torch.manual_seed(0)
    layers = [nn.Linear(6, 6) for _ in range(depth)]
    model = nn.Sequential(*layers, nn.Linear(6, 3)).double()
    engine = pergrad.PerExample(model, CROSS_ENTROPY, verify=False)  # as users run it
    opt = kind(model.parameters(), lr=1e-3, **options)
    x, y = torch.randn(8, 6, dtype=torch.float64), torch.randint(0, 3, (8,))
    for _ in range(2):  # the first call learns the model's structure
        opt.zero_grad()
        engine.backward(x, y)
        opt.step()
    counter = CountToHost()
    with counter:
        opt.zero_grad()
        engine.backward(x, y)
        opt.step()
    return counter.count


def test_the_counter_sees_what_it_counts():
    with CountToHost() as counter:
        float(torch.ones(()))
        torch.ones(2).sum().item()
        bool(torch.ones(()))
    assert counter.count == 3


CASES = [
    (optim.SGD, {}),
    (optim.SGD, {"batch_scaling": "gain"}),
    (optim.RMSprop, {"batch_scaling": "gain", "centered": True}),
    (optim.Adam, {}),
    (optim.Adam, {"batch_scaling": "gain"}),
    (optim.Adam, {"second_moment": "batch", "batch_scaling": "gain", "foreach": True}),
]


@pytest.mark.parametrize(("kind", "options"), CASES, ids=[f"{k.__name__}-{o}" for k, o in CASES])
def test_a_step_sends_as_many_values_to_the_host_whatever_the_number_of_parameters(kind, options):
    shallow, deep = _syncs_per_step(1, kind, options), _syncs_per_step(12, kind, options)
    assert shallow == deep
    assert deep <= 2 + (options.get("batch_scaling") == "gain")
