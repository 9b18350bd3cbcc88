"""The device-independent checks again on a GPU, where one is present (skipped otherwise):
models of the zoo and from Hugging Face against one backward per example, the optimizers
against their CPU steps, values sent to the host per step, and a one-GPU nccl group."""

import pytest
import torch
from test_distributed import run_data_parallel_example
from test_host_syncs import CountToHost
from zoo import CASES, CROSS_ENTROPY, statistics

import optim
import pergrad

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
CUDA = torch.device("cuda")


@pytest.mark.parametrize(
    "case", ["mlp", "cnn2d_groupnorm", "embedding_layernorm", "tied", "transformer"]
)
def test_a_zoo_model_on_the_gpu_matches_one_backward_per_example(case):
    model, inputs, target = CASES[case].build(6)
    model = model.to(CUDA)
    statistics(model, CROSS_ENTROPY, tuple(x.to(CUDA) for x in inputs), target.to(CUDA))


def test_a_hugging_face_model_on_the_gpu_matches_one_backward_per_example():
    from test_hugging_face import _causal, _padded

    model = _causal("llama").to(CUDA)
    ids, mask = (t.to(CUDA) for t in _padded())
    statistics(model, pergrad.losses.causal_lm, {"input_ids": ids, "attention_mask": mask}, ids)


@pytest.mark.parametrize("options", [{}, {"foreach": True}, {"batch_scaling": "gain"}])
def test_an_optimizer_step_on_the_gpu_is_the_cpu_step(options):
    steps = {}
    for device in ("cpu", CUDA):
        torch.manual_seed(0)
        model = CASES["mlp"].build(8)[0].to(device)
        _, inputs, target = CASES["mlp"].build(8)
        engine = pergrad.PerExample(model, CROSS_ENTROPY)
        opt = optim.Adam(model.parameters(), lr=1e-2, **options)
        for _ in range(3):
            opt.zero_grad()
            engine.backward(tuple(x.to(device) for x in inputs), target.to(device))
            opt.step()
        steps[str(device)] = [p.detach().cpu() for p in model.parameters()]
    for p, q in zip(steps["cuda"], steps["cpu"]):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)


def test_a_gain_step_on_the_gpu_sends_one_value_to_the_host():
    model = CASES["mlp"].build(8)[0].to(CUDA)
    _, inputs, target = CASES["mlp"].build(8)
    inputs, target = tuple(x.to(CUDA) for x in inputs), target.to(CUDA)
    engine = pergrad.PerExample(model, CROSS_ENTROPY, verify=False)  # as users run it
    opt = optim.Adam(model.parameters(), lr=1e-3, batch_scaling="gain")
    for _ in range(2):
        opt.zero_grad()
        engine.backward(inputs, target)
        opt.step()
    with CountToHost() as counter:
        opt.zero_grad()
        engine.backward(inputs, target)
        opt.step()
    assert counter.count <= 3


def test_one_gpu_in_an_nccl_group():
    run_data_parallel_example(1)
