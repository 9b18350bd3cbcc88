"""Data-parallel statistics: two ``gloo`` processes on 127.0.0.1, each with a share of every
batch, against one process on the whole batch."""

import functools
import socket
import subprocess
import sys
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import optim
import pergrad

STEPS, BATCH = 4, 16
SPLITS = {"halves": 8, "uneven": 3, "rank 0 empty": 0}
"""How many of each batch's examples rank 0 holds; rank 1 holds the rest."""
DDP_OPTIONS = {"ddp": {}, "ddp find_unused": {"find_unused_parameters": True}}
"""DistributedDataParallel wrappers, handed to pergrad with no process_group."""
CROSS_ENTROPY = nn.CrossEntropyLoss(reduction="none")
ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def _group_of_one():
    """A ``gloo`` process group of this process alone, destroyed on leaving."""
    init = f"tcp://127.0.0.1:{_free_port()}"
    dist.init_process_group("gloo", init_method=init, rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()


def _batches() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(STEPS, BATCH, 5, generator=gen, dtype=torch.float64)
    return x, torch.randint(0, 3, (STEPS, BATCH), generator=gen)


class WithUnused(nn.Module):
    """The test model beside a layer the forward pass never uses."""

    def __init__(self):
        super().__init__()
        self.used, self.unused = _model(), nn.Linear(2, 2).double()

    def forward(self, x):
        return self.used(x)


def _train(
    process_group=None, share=slice(None), ddp: dict | None = None, fsdp: bool = False
) -> list[torch.Tensor]:
    """``STEPS`` steps of ``optim.Adam`` on this process's share of every batch; with ``ddp``,
    the model wrapped in ``DistributedDataParallel(**ddp)`` and the share taken in two
    micro-batches, the first under ``no_sync`` as gradient accumulation does; with ``fsdp``,
    the model sharded by FSDP2 per layer and at the root. Returns the parameters and their
    last ``sq_mean``, whole."""
    model = WithUnused() if ddp is not None and ddp.get("find_unused_parameters") else _model()
    if ddp is not None:
        model = nn.parallel.DistributedDataParallel(model, **ddp)
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        for layer in (model[0], model[2], model):
            fully_shard(layer)
    engine = pergrad.PerExample(model, CROSS_ENTROPY, process_group=process_group)
    opt = optim.Adam(model.parameters(), lr=1e-2, grad_horizon=20, sq_horizon=200)
    for x, y in zip(*_batches()):
        opt.zero_grad()
        x, y = x[share], y[share]
        if ddp is None:
            engine.backward(x, y)
        else:
            with model.no_sync():
                engine.backward(x[:2], y[:2])
            engine.backward(x[2:], y[2:])
        opt.step()
    trained = [p for name, p in model.named_parameters() if "unused" not in name]
    found = [p.detach() for p in trained] + [p.grad_stats.sq_mean for p in trained]
    return [t.full_tensor() if hasattr(t, "full_tensor") else t.clone() for t in found]


def _fsdp_checkpoint(rank: int, out: Path) -> list[torch.Tensor]:
    """Two steps of a sharded model with gain scaling, saved with torch.distributed.checkpoint,
    loaded into a fresh sharded model and optimizer, and one more step: the parameters and
    sq_mean, whole, against the same three steps without the interruption."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )
    from torch.distributed.fsdp import fully_shard

    def build():
        model = _model()
        for layer in (model[0], model[2], model):
            fully_shard(layer)
        opt = optim.Adam(model.parameters(), lr=1e-2, sq_horizon=50, batch_scaling="gain")
        return model, pergrad.PerExample(model, CROSS_ENTROPY), opt

    def step(engine, opt, x, y):
        opt.zero_grad()
        engine.backward(x[rank::2], y[rank::2])
        opt.step()

    xs, ys = _batches()
    model, engine, opt = build()
    for x, y in list(zip(xs, ys))[:2]:
        step(engine, opt, x, y)
    dcp.save(
        {"model": model.state_dict(), "optim": get_optimizer_state_dict(model, opt)},
        checkpoint_id=out / "dcp",
    )
    step(engine, opt, xs[2], ys[2])
    model2, engine2, opt2 = build()
    state = {"model": model2.state_dict(), "optim": get_optimizer_state_dict(model2, opt2)}
    dcp.load(state, checkpoint_id=out / "dcp")
    model2.load_state_dict(state["model"])
    set_optimizer_state_dict(model2, opt2, state["optim"])
    step(engine2, opt2, xs[2], ys[2])
    whole = []
    for ran in (model, model2):
        whole += [p.detach().full_tensor() for p in ran.parameters()]
        whole += [p.grad_stats.sq_mean.full_tensor() for p in ran.parameters()]
    return whole


def _fsdp_mixed_precision(rank: int | None, reduce_dtype: torch.dtype | None):
    """One backward of a float32 model sharded by FSDP2 with bfloat16 parameters for the
    pass and ``reduce_dtype`` for the reduction, each rank half of the first batch (``rank``
    ``None``: the whole batch, unsharded, in float32): ``p.grad`` and ``sq_mean`` whole, and
    the dtypes pergrad all-reduced."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    model = _model().float()
    x, y = _batches()
    x, y = x[0].float(), y[0]
    if rank is not None:
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=reduce_dtype)
        for layer in (model[0], model[2], model):
            fully_shard(layer, mp_policy=policy)
        x, y = x[rank::2], y[rank::2]
    seen, original = [], dist.all_reduce

    def recording(tensor, *args, **kwargs):
        seen.append(tensor.dtype)
        return original(tensor, *args, **kwargs)

    dist.all_reduce = recording
    try:
        pergrad.PerExample(model, CROSS_ENTROPY).backward(x, y)
    finally:
        dist.all_reduce = original
    found = [t for p in model.parameters() for t in (p.grad, p.grad_stats.sq_mean)]
    return [t.full_tensor() if hasattr(t, "full_tensor") else t for t in found], set(seen)


def _picky(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if bool((target < 0).any()):
        raise pergrad.InputError("a negative target")
    return CROSS_ENTROPY(output, target)


def _one_rank_raises(rank: int, engine_type=pergrad.PerExample) -> str:
    """Rank 1's share makes its loss raise: every rank must raise, none wait, nothing change."""
    model = _model()
    engine = engine_type(model, _picky, process_group=dist.group.WORLD)
    x, y = _batches()
    target = y[0][rank::2].clone()
    if rank == 1:
        target[0] = -1
    try:
        engine.backward(x[0][rank::2], target)
    except Exception as error:  # noqa: BLE001 - what each rank raised is the result
        assert all(p.grad is None for p in model.parameters())
        engine.backward(x[1][rank::2], y[1][rank::2])  # and the ranks go on together
        return f"{type(error).__name__}: {error}"
    return "nothing raised"


def _micro_batches(process_group=None, rank: int | None = None) -> list[torch.Tensor]:
    """``MicroBatches(size=2)`` statistics of the first batch, on a BatchNorm network: the
    whole batch here, or, with a group, this rank's half (the same micro-batches)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.Tanh(), nn.Linear(7, 3))
    model = model.double()
    x, y = _batches()
    half = slice(None) if rank is None else slice(rank * BATCH // 2, (rank + 1) * BATCH // 2)
    micro = pergrad.MicroBatches(model, CROSS_ENTROPY, size=2, process_group=process_group)
    micro.backward(x[0][half], y[0][half])
    return [t for p in model.parameters() for t in (p.grad, p.grad_stats.sq_mean)]


def _batch_sizes(rank: int) -> list[int]:
    """A BatchSizeSchedule over the group on statistics that differ between the ranks (each
    its own data, no all-reduce): every rank takes the first rank's proposals."""
    torch.manual_seed(rank)
    model = nn.Linear(5, 1).double()
    opt = optim.SGD(model.parameters(), lr=0.01)
    schedule = optim.BatchSizeSchedule(
        opt, min_size=4, max_size=256, horizon=50, process_group=dist.group.WORLD
    )
    engine = pergrad.PerExample(model, lambda out, y: (out.squeeze(-1) - y) ** 2)
    sizes = []
    for _ in range(15):
        x = torch.randn(schedule.size, 5, dtype=torch.float64)
        opt.zero_grad()
        engine.backward(x, x.sum(1) * (1 + rank) + torch.randn(len(x), dtype=torch.float64))
        opt.step()
        sizes.append(schedule.step())
    return sizes


def _worker(rank: int, port: int, out: Path) -> None:
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=2,
        timeout=timedelta(seconds=60),
    )
    results = {}
    for name, first in SPLITS.items():
        results[name] = _train(
            dist.group.WORLD, slice(0, first) if rank == 0 else slice(first, None)
        )
        results[f"fsdp {name}"] = _train(
            None, slice(0, first) if rank == 0 else slice(first, None), fsdp=True
        )
        for name_, ddp in DDP_OPTIONS.items():
            results[f"{name_} {name}"] = _train(
                None, slice(0, first) if rank == 0 else slice(first, None), ddp
            )
    results["micro-batches"] = _micro_batches(dist.group.WORLD, rank)
    results["batch sizes"] = _batch_sizes(rank)
    results["fsdp checkpoint"] = _fsdp_checkpoint(rank, out)
    for dtype in (torch.float32, None):
        results[f"fsdp mixed precision {dtype}"] = _fsdp_mixed_precision(rank, dtype)
    results["one rank raises"] = _one_rank_raises(rank)
    micro = functools.partial(pergrad.MicroBatches, size=1)
    results["one rank raises, micro-batches"] = _one_rank_raises(rank, micro)
    subgroup = dist.new_group([0])  # every rank takes part in making it and the wrapper
    wrapped = nn.parallel.DistributedDataParallel(_model())
    if rank == 0:
        try:
            pergrad.PerExample(wrapped, CROSS_ENTROPY, process_group=subgroup)
        except pergrad.InputError as error:
            results["other group"] = str(error)
    engine = pergrad.PerExample(_model(seed=rank), CROSS_ENTROPY, process_group=dist.group.WORLD)
    x, y = _batches()
    try:
        engine.backward(x[0], y[0])
        results["different start"] = None
    except RuntimeError as error:
        results["different start"] = str(error)
    torch.save(results, out / f"rank{rank}.pt")
    dist.barrier()  # no rank tears its connections down while another still uses them
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("ranks")
    context = mp.start_processes(
        _worker, args=(_free_port(), out), nprocs=2, start_method="spawn", join=False
    )
    for _ in range(120):  # at most two minutes
        if context.join(timeout=1):
            break
    else:
        for process in context.processes:
            process.kill()
        pytest.fail("the two gloo workers did not finish within two minutes")
    return [torch.load(out / f"rank{rank}.pt") for rank in range(2)]


def test_every_rank_takes_the_same_batch_size(two_ranks):
    first, second = (ranks["batch sizes"] for ranks in two_ranks)
    assert first == second and len(set(first)) > 1


def test_micro_batches_on_two_ranks_are_those_of_the_whole_batch(two_ranks):
    alone = _micro_batches()
    for rank in two_ranks:
        for p, q in zip(rank["micro-batches"], alone):
            torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("split", sorted(SPLITS))
def test_two_ranks_train_as_one_process_on_the_whole_batch(two_ranks, split):
    alone = _train()
    for rank in two_ranks:
        for p, q in zip(rank[split], alone):
            torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("split", sorted(SPLITS))
@pytest.mark.parametrize("wrapper", sorted(DDP_OPTIONS))
def test_a_ddp_wrapped_model_trains_as_one_process_on_the_whole_batch(two_ranks, split, wrapper):
    """No process_group is passed: pergrad takes the wrapper's. Parameters and sq_mean equal
    the one-process run; an unused layer and no_sync change nothing."""
    alone = _train()
    for rank in two_ranks:
        assert len(rank[f"{wrapper} {split}"]) == len(alone)
        for p, q in zip(rank[f"{wrapper} {split}"], alone):
            torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("reduce_dtype", [torch.float32, None])
def test_fsdp2_mixed_precision_reduces_the_sums_in_its_reduce_dtype(two_ranks, reduce_dtype):
    """bfloat16 parameters in the pass: the statistics are formed in float32 and summed over
    the ranks in the policy's ``reduce_dtype`` (unset: bfloat16, as FSDP reduces gradients),
    within bfloat16's rounding of the whole batch's in float32."""
    alone, _ = _fsdp_mixed_precision(None, None)
    for rank in two_ranks:
        found, reduced = rank[f"fsdp mixed precision {reduce_dtype}"]
        sums = reduced - {torch.float64}  # the count and the loss travel in float64
        assert sums == {reduce_dtype or torch.bfloat16}
        for p, q in zip(found, alone):
            assert p.dtype == torch.float32
            torch.testing.assert_close(p, q, rtol=3e-2, atol=3e-2 * float(q.abs().max()))
        for grad, sq_mean in zip(found[::2], found[1::2]):  # but by bfloat16's rounding
            assert bool((sq_mean >= 0).all()) and bool((sq_mean >= 0.98 * grad.square()).all())


@pytest.mark.parametrize("split", sorted(SPLITS))
def test_an_fsdp2_sharded_model_trains_as_one_process_on_the_whole_batch(two_ranks, split):
    """Sharded per layer and at the root, no process_group passed: the parameters and
    sq_mean, gathered whole, equal the one-process run's."""
    alone = _train()
    for rank in two_ranks:
        assert len(rank[f"fsdp {split}"]) == len(alone)
        for p, q in zip(rank[f"fsdp {split}"], alone):
            torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


def test_an_fsdp2_run_resumed_from_a_distributed_checkpoint_continues_alike(two_ranks):
    for rank in two_ranks:
        whole = rank["fsdp checkpoint"]
        through, resumed = whole[: len(whole) // 2], whole[len(whole) // 2 :]
        for p, q in zip(resumed, through):
            torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("engine", ["", ", micro-batches"])
def test_an_error_on_one_rank_is_raised_on_every_rank_and_none_waits(two_ranks, engine):
    assert two_ranks[1][f"one rank raises{engine}"] == "InputError: a negative target"
    assert two_ranks[0][f"one rank raises{engine}"].startswith(
        "RuntimeError: 1 other rank(s) raised"
    )


def test_a_process_group_that_disagrees_with_the_wrapper_is_refused(two_ranks):
    assert "spans ranks [0]" in two_ranks[0]["other group"]
    assert "wrapper's spans [0, 1]" in two_ranks[0]["other group"]


def test_parameters_that_differ_between_ranks_are_reported_on_every_rank(two_ranks):
    for rank in two_ranks:
        assert "differ between ranks" in rank["different start"]
        assert "0.weight" in rank["different start"]


def test_a_process_group_without_torch_distributed_initialized():
    with pytest.raises(RuntimeError, match="torch.distributed is not initialized"):
        pergrad.PerExample(_model(), CROSS_ENTROPY, process_group=object())


TEARDOWN_ABORT = "terminate called without an active exception"
"""What a gloo rank sometimes prints (and then aborts, exit code -6) when its worker threads
outlive the interpreter's teardown, after the example's work is done
(pytorch/pytorch#179291)."""


def launch(command, done_when: str, **options) -> str:
    """Run ``command(port)``; again, on a fresh port, only where the first try did all its
    work (printed ``done_when``) and a rank then aborted in the interpreter's teardown.
    Returns what it printed."""
    for _ in range(2):
        done = subprocess.run(command(str(_free_port())), capture_output=True, text=True, **options)
        output = done.stdout + done.stderr
        teardown = TEARDOWN_ABORT in output or "exitcode: -6" in output  # SIGABRT
        if done.returncode == 0 or not (done_when in done.stdout and teardown):
            break
    assert done.returncode == 0, output[-3000:]
    return done.stdout


def run_data_parallel_example(processes: int) -> None:
    """``examples/data_parallel.py`` under ``torchrun``: every rank ends with the same
    parameters (``nccl`` where there is a GPU, else ``gloo``)."""
    same = f"identical parameters on all {processes} ranks: True"

    def command(port: str) -> list[str]:
        return [
            sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
            f"--master_port={port}", str(ROOT / "examples" / "data_parallel.py"), "--steps", "5",
        ]  # fmt: skip

    assert same in launch(command, same, timeout=180, cwd=ROOT)


def test_the_data_parallel_example_runs_with_torchrun():
    pytest.importorskip("sklearn")
    run_data_parallel_example(2)


def test_the_count_travels_exactly_whatever_the_gradients_dtype():
    """301 is not a bfloat16 number (it rounds to 300): the count rides in float64."""
    from pergrad.stats import Sums

    w = torch.zeros(3, dtype=torch.bfloat16)
    sums = Sums({"w": w})
    ones = torch.ones(3, dtype=torch.bfloat16)
    sums.add({"w": (ones.clone(), ones.clone())}, torch.full((301,), 2.5 / 301).bfloat16())
    with _group_of_one() as group:
        sums.all_reduce(group)
    assert sums.count == 301 and sums.loss_sum.dtype == torch.float64
    assert sums.loss_sum == sums.last_losses.double().sum()
    assert torch.equal(sums.grad["w"], ones)


def test_the_mean_loss_of_half_precision_losses_is_formed_in_float64():
    """1,024 losses of 100 sum to 102,400, beyond float16's 65,504: the mean must not be inf."""
    from pergrad.stats import Sums

    w = torch.zeros(3, dtype=torch.float16)
    sums = Sums({"w": w})
    sums.add({"w": (torch.ones_like(w), torch.ones_like(w))}, torch.full((1024,), 100.0).half())
    with _group_of_one() as group:
        sums.all_reduce(group)
    assert sums.mean_loss.dtype == torch.float16 and sums.mean_loss == 100
