"""What per-example statistics cost, as ratios to a plain ``loss.mean().backward()``.

    python benchmarks/per_example_cost.py            # B = 32, 256, 1024
    python benchmarks/per_example_cost.py --quick    # B = 32, 256, fewer repeats

For three toy families (an MLP, a CNN, a small transformer) and the models people train
(``examples/real_models.py``: GPT-2, BERT, Llama and ViT from Hugging Face configs, nanoGPT,
ResNet-18 with GroupNorm; 2 layers of width 128 on sequences of 64), every method runs the
same step on the same batch, from the same weights:

- ``plain``: ``loss.mean().backward()``, the reference (its time and extra memory are 1×);
- ``auto``, ``func``, ``hooks``, ``loop``: ``pergrad.PerExample(mode=…).backward``, which
  leaves ``p.grad`` and ``Σ_b g_b²`` (``auto`` computes them layer by layer);
- ``grads()``: ``pergrad.PerExample().grads``, all per-example gradients materialized;
- ``opacus``: Opacus's ``GradSampleModule`` (``grad_sample``), then ``Σ_b g_b²`` from it;
- ``backpack``: BackPACK's ``SumGradSquared``, where it is installed
  (``pip install --no-deps backpack-for-pytorch einops unfoldNd``).

Time is the median over the repeats, all methods of a row timed in one fresh process and
taking turns step by step, so that the machine's changing load reaches them alike. Extra
memory is a fresh process's peak resident memory during two steps, less what it held before
them, after a warm-up step, with glibc returning every freed block of 64 KiB or more.
Each row records the thread count and the machine's load average before and after it.
Writes ``results.md`` (two tables) and ``results.png`` to ``--out``.

``--device cuda`` runs every step on the GPU, synchronizing before each clock reading; extra
memory is then the peak of ``torch.cuda.max_memory_allocated`` over what was allocated
before the two steps.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
from cli import DefaultsWhereSet  # noqa: E402
from real_models import REAL_MODELS  # noqa: E402

METHODS = ("plain", "auto", "func", "hooks", "loop", "grads()", "opacus", "backpack")
LOOP_LIMIT = 256
"""``loop`` runs one backward per example; beyond this batch size, and on the real models, it
is not timed."""


class Transformer(nn.Module):
    """Embedding + one TransformerEncoderLayer + Linear over the mean of a 32-token sequence."""

    def __init__(self, vocabulary: int = 100, width: int = 64):
        super().__init__()
        self.embed = nn.Embedding(vocabulary, width)
        self.block = nn.TransformerEncoderLayer(width, 4, 2 * width, dropout=0.0, batch_first=True)
        self.head = nn.Linear(width, 10)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(self.block(self.embed(tokens)).mean(1))


class RecurrentLM(nn.Module):
    """Embedding (1000 tokens, width 128), one recurrent layer, a head: next-token logits on
    sequences of 64."""

    def __init__(self, cell: type[nn.RNNBase]):
        super().__init__()
        self.embed = nn.Embedding(1000, 128)
        self.rnn = cell(128, 128, batch_first=True)
        self.head = nn.Linear(128, 1000)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(self.rnn(self.embed(tokens))[0])


def next_token_loss(logits: Tensor, tokens: Tensor) -> Tensor:
    """Per-example mean cross-entropy of predicting token ``t + 1`` from the logits at ``t``."""
    shifted = logits[:, :-1].transpose(1, 2)
    return nn.functional.cross_entropy(shifted, tokens[:, 1:], reduction="none").mean(1)


class PackedClassifier(nn.Module):
    """Embedding (1000 tokens, width 128), a GRU on packed sequences of the lengths the tokens
    say (token 0 pads), in no order, its final state classified into ten classes."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(1000, 128, padding_idx=0)
        self.rnn = nn.GRU(128, 128, batch_first=True)
        self.head = nn.Linear(128, 10)

    def forward(self, tokens: Tensor) -> Tensor:
        lengths = (tokens != 0).sum(1).clamp(min=1)
        packed = nn.utils.rnn.pack_padded_sequence(
            self.embed(tokens), lengths, batch_first=True, enforce_sorted=False
        )
        return self.head(self.rnn(packed)[1][0])


def packed(batch: int) -> tuple:
    lengths = torch.randint(8, 65, (batch, 1))
    tokens = torch.randint(1, 1000, (batch, 64)) * (torch.arange(64) < lengths)
    return _classifier(PackedClassifier(), lambda b: tokens)(batch)


def recurrent(cell: type[nn.RNNBase]) -> Callable[[int], tuple]:
    def build(batch: int) -> tuple:
        tokens = torch.randint(0, 1000, (batch, 64))
        return RecurrentLM(cell), tokens, tokens, next_token_loss

    return build


def _classifier(model: nn.Module, inputs: Callable[[int], Tensor]) -> Callable[[int], tuple]:
    """A toy model's builder: ``batch -> (model, inputs, target, loss_fn)``, ten classes."""
    return lambda b: (model, inputs(b), torch.randint(0, 10, (b,)), CROSS_ENTROPY)


def tiny(batch: int) -> tuple:
    """A 2-layer MLP small enough that pergrad's per-call work is all there is to measure."""
    model = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 10))
    return _classifier(model, lambda b: torch.randn(b, 16))(batch)


def mlp(batch: int) -> tuple:
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU())
    model.append(nn.Linear(256, 10))
    return _classifier(model, lambda b: torch.randn(b, 64))(batch)


def cnn(batch: int) -> tuple:
    model = nn.Sequential(
        nn.Conv2d(1, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 4 * 4, 10),
    )  # fmt: skip
    return _classifier(model, lambda b: torch.randn(b, 1, 28, 28))(batch)


def transformer(batch: int) -> tuple:
    return _classifier(Transformer(), lambda b: torch.randint(0, 100, (b, 32)))(batch)


def _real(name: str) -> Callable[[int], tuple]:
    """A model of ``examples/real_models.py`` at its benchmark size, in float32."""
    return lambda b: REAL_MODELS[name](b, dtype=torch.float32, size="bench")


CROSS_ENTROPY = nn.CrossEntropyLoss(reduction="none")

OVERHEAD = "overhead: MLP 16-16-10"
"""The row whose difference to ``plain`` is pergrad's per-call work (hooks, checks, merging),
measured at :data:`OVERHEAD_BATCH` only."""
OVERHEAD_BATCH = 8

TOY_MODELS = {
    OVERHEAD: tiny,
    "MLP 64-256-256-10": mlp,
    "CNN (2 conv + linear, 28×28)": cnn,
    "Transformer (Embedding + TransformerEncoderLayer + Linear, seq 32)": transformer,
}
REAL = {
    "GPT-2 (HF, tied head)": "gpt2",
    "BERT (HF, padded)": "bert",
    "Llama (HF, GQA)": "llama",
    "Falcon (HF, in-place residual)": "falcon",
    "OPT (HF, flattened tokens)": "opt",
    "Mixtral (HF, 4 experts, eager)": "mixtral",
    "Qwen2-MoE (HF, 4 experts + shared, eager)": "qwen2_moe",
    "Mamba (HF, PyTorch path)": "mamba",
    "Swin (HF, windows)": "swin",
    "ViT (HF)": "vit",
    "nanoGPT (tied head)": "nanogpt",
    "ResNet-18 GroupNorm (32×32)": "resnet18_gn",
}
RECURRENT = {
    "LSTM language model (width 128, seq 64)": recurrent(nn.LSTM),
    "GRU language model (width 128, seq 64)": recurrent(nn.GRU),
    "GRU on packed sequences (width 128, seq 8-64)": packed,
}
MODELS = {**TOY_MODELS, **{label: _real(name) for label, name in REAL.items()}, **RECURRENT}
"""Each model's builder, ``batch -> (model, inputs, target, loss_fn)``: the toy families,
then the models of ``examples/real_models.py`` (2 layers, width 128, sequences of 64, a
vocabulary of 1000; ResNet-18 as published) and recurrent language models, both timed at
``--real-batch-sizes``."""


def make_step(method: str, model: nn.Module, x, y: Tensor, loss_fn) -> Callable[[], object]:
    """One training step's worth of work for ``method`` on this batch (``x``: a Tensor or a
    tuple of them, passed as ``model(*x)``)."""
    import pergrad

    inputs = x if isinstance(x, tuple) else (x,)
    if method == "plain":

        def step():
            model.zero_grad(set_to_none=True)
            loss_fn(model(*inputs), y).mean().backward()

        return step
    if method in ("auto", "func", "hooks", "loop"):
        engine = pergrad.PerExample(model, loss_fn, mode=method, verify=False)

        def step():
            engine.zero_grad()
            engine.backward(x, y)

        return step
    if method == "grads()":
        engine = pergrad.PerExample(model, loss_fn, verify=False)
        return lambda: engine.grads(x, y)
    if method == "opacus":
        from opacus import GradSampleModule

        wrapped = GradSampleModule(model, loss_reduction="mean")

        def step():
            wrapped.zero_grad(set_to_none=True)
            loss_fn(wrapped(*inputs), y).mean().backward()
            return [p.grad_sample.square().sum(0) for p in model.parameters()]

        return step
    if method == "backpack":
        from backpack import backpack, extend
        from backpack.extensions import SumGradSquared

        if loss_fn is not CROSS_ENTROPY:
            raise RuntimeError("BackPACK needs a mean loss it knows; this model's is its own")
        extended, mean_loss = extend(model), extend(nn.CrossEntropyLoss())

        def step():
            extended.zero_grad(set_to_none=True)
            with backpack(SumGradSquared()):
                mean_loss(extended(*inputs), y).backward()
            missing = [n for n, p in model.named_parameters() if not hasattr(p, "sum_grad_squared")]
            if missing:  # BackPACK skips layers it does not know
                raise RuntimeError(f"no sum_grad_squared for {', '.join(missing)}")

        return step
    raise ValueError(f"unknown method {method!r}; choose from {METHODS}")


def _memory_bytes(field: str) -> int:
    """``VmRSS`` (resident now) or ``VmHWM`` (its peak) of this process, from /proc."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def _reset_peak() -> None:
    """Start ``VmHWM`` again from the current resident size (Linux ≥ 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


DEVICE = torch.device("cpu")
"""Where the models run (``--device``)."""


def _batch(model_name: str, batch: int, method: str):
    """A fresh model (the same weights for every method), a batch, and ``method``'s step, on
    :data:`DEVICE`."""
    torch.manual_seed(0)
    model, x, y, loss_fn = MODELS[model_name](batch)
    move = lambda t: t.to(DEVICE)  # noqa: E731
    x = tuple(map(move, x)) if isinstance(x, tuple) else move(x)
    return make_step(method, model.to(DEVICE), x, move(y), loss_fn)


def _synchronize() -> None:
    """Wait for the device, so that a clock reading counts the work queued before it."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def take_turns(steps: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """The seconds of each of ``repeats`` calls of every step, the steps taking turns."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            _synchronize()
            start = time.perf_counter()
            step()
            _synchronize()
            times[name].append(time.perf_counter() - start)
    return times


def time_steps(model_name: str, batch: int, methods: list[str], repeats: int) -> dict:
    """Median time per step of every method, in this process, the methods taking turns step
    by step so that a change in the machine's load reaches all of them alike."""
    warnings.filterwarnings("ignore")
    makers = {method: functools.partial(_batch, model_name, batch, method) for method in methods}
    return median_times(makers, repeats)


def median_times(makers: dict[str, Callable[[], Callable[[], object]]], repeats: int) -> dict:
    """``{name: {"seconds"} or {"error"}}`` and the thread count: each step built by its
    maker and run once (the warm-up), then all of them taking turns (:func:`take_turns`)."""
    steps, results = {}, {}
    for name, make in makers.items():
        try:
            steps[name] = make()
            steps[name]()
        except Exception as error:  # noqa: BLE001 - a method that cannot run this model, or
            steps.pop(name, None)  # an optimizer this build lacks (fused)
            results[name] = {"error": f"{type(error).__name__}: {error}"[:120]}
    times = take_turns(steps, repeats)
    results.update({name: {"seconds": statistics.median(t)} for name, t in times.items()})
    results["threads"] = torch.get_num_threads()
    return results


def peak_memory(model_name: str, batch: int, method: str) -> dict:
    """Peak extra resident memory of two steps, after a warm-up step (whose one-time
    allocations, such as lazily loaded kernels, are not counted)."""
    warnings.filterwarnings("ignore")
    step = _batch(model_name, batch, method)
    step()
    if DEVICE.type == "cuda":
        _synchronize()
        torch.cuda.reset_peak_memory_stats(DEVICE)
        before = torch.cuda.memory_allocated(DEVICE)
        for _ in range(2):
            step()
        _synchronize()
        return {"extra_bytes": max(torch.cuda.max_memory_allocated(DEVICE) - before, 0)}
    _reset_peak()
    before = _memory_bytes("VmRSS")
    for _ in range(2):
        step()
    return {"extra_bytes": max(_memory_bytes("VmHWM") - before, 0)}


OPTIMIZER_TENSORS = (24, 144, 1000)
"""Parameter tensors of the optimizer-step rows: a small model's, a GPT-2-small-sized
count, and a large one's."""
OPTIMIZER_SHAPES = ((64, 64), (64,), (256, 64), (256,))
"""The shapes the tensors cycle through: a transformer layer's matrices and vectors."""


def optimizer_steps(count: int, repeats: int) -> dict:
    """Median time of one ``step()`` of ``optim.Adam`` (loop and ``foreach``) and of
    ``torch.optim.Adam`` (loop, ``foreach``, ``fused``) on ``count`` parameter tensors with
    gradients (and, for ours, per-example statistics), taking turns step by step."""
    import optim
    import pergrad

    def parameters() -> list[nn.Parameter]:
        torch.manual_seed(0)
        found = []
        for i in range(count):
            shape = OPTIMIZER_SHAPES[i % len(OPTIMIZER_SHAPES)]
            p = nn.Parameter(torch.randn(shape, device=DEVICE))
            p.grad = torch.randn_like(p)
            p.grad_stats = pergrad.GradStats(32, p.grad.square() + 1)
            found.append(p)
        return found

    optimizers = {
        "optim.Adam": lambda p: optim.Adam(p, lr=1e-4),
        "optim.Adam foreach": lambda p: optim.Adam(p, lr=1e-4, foreach=True),
        "torch.optim.Adam": lambda p: torch.optim.Adam(p, lr=1e-3, foreach=False),
        "torch foreach": lambda p: torch.optim.Adam(p, lr=1e-3, foreach=True),
        "torch fused": lambda p: torch.optim.Adam(p, lr=1e-3, fused=True),
    }
    makers = {name: lambda make=make: make(parameters()).step for name, make in optimizers.items()}
    return median_times(makers, repeats)  # the warm-up step creates the state


def optimizer_table(results: dict) -> str:
    """Median ``step()`` time of each optimizer, ``torch.optim.Adam``'s in ms, the others as
    a ratio to it."""
    names = [n for n in next(iter(results.values())) if n not in ("threads", "_machine")]
    reference = "torch.optim.Adam"
    out = [
        "### Optimizer step: torch.optim.Adam's time, the others' as a ratio to it",
        "",
        "| tensors | " + " | ".join(names) + " | threads, load before → after |",
        "|---" * (len(names) + 2) + "|",
    ]
    for count, row in results.items():
        cells = []
        for name in names:
            r = row[name]
            if "error" in r:
                cells.append("fails")
            elif name == reference:
                cells.append(f"{1e3 * r['seconds']:.3g} ms")
            else:
                cells.append(f"{r['seconds'] / row[reference]['seconds']:.2g}×")
        load = " → ".join(f"{x:.1f}" for x in row["_machine"]["load"])
        out.append(f"| {count} | " + " | ".join(cells) + f" | {row['threads']}, {load} |")
    return "\n".join(out + [""])


MEMORY_ENVIRONMENT = {"MALLOC_MMAP_THRESHOLD_": "65536"}
"""For the memory runs: glibc maps every block of 64 KiB or more on its own and gives it back
when freed, so resident memory follows the live tensors instead of a pool kept from earlier
steps. It slows allocation, so times come from a run without it."""


def _run(*arguments: str, env: dict | None = None) -> dict:
    """This script, in a fresh process, with ``arguments``; its last line of JSON."""
    command = [sys.executable, __file__, *arguments, "--device", str(DEVICE)]
    done = subprocess.run(
        command, capture_output=True, text=True, env={**os.environ, **(env or {})}
    )
    if done.returncode != 0:
        lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
        return {"error": lines[-1][:120] if lines else f"exit status {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(model_name: str, batch: int, methods: list[str], repeats: int) -> dict:
    """``{method: {"seconds", "extra_bytes"} or {"error"}}`` for one model and batch size:
    times in one fresh process, memory in a fresh process per method."""
    untimed = {"loop"} if batch > LOOP_LIMIT or model_name not in TOY_MODELS else set()
    timed = [m for m in methods if m not in untimed]
    row = {m: {"error": "not timed"} for m in methods if m not in timed}
    tries, moved = 0, True
    while moved and tries <= RETRIES:  # again while the machine's load moved under the row
        tries += 1
        before = os.getloadavg()[0]
        times = _run("--times", model_name, str(batch), str(repeats), *timed)
        after = os.getloadavg()[0]
        moved = abs(after - before) > LOAD_CHANGE
    row["_machine"] = {"threads": times.get("threads"), "load": (before, after), "tries": tries}
    for method in timed:
        result = times.get(method, times)  # the whole run failed: its error for everyone
        if "error" not in result:
            memory = _run("--memory", model_name, str(batch), method, env=MEMORY_ENVIRONMENT)
            result = {**result, **memory}
        row[method] = result
    return row


LOAD_CHANGE = 0.5
"""A row is timed again, up to :data:`RETRIES` times, when the 1-minute load average moved by
more than this while it ran: another process started or stopped, and the ratios of the row's
methods, which take turns, may still be fair, but its absolute times are not."""
RETRIES = 2


def available(method: str) -> bool:
    if method != "backpack":
        return True
    try:
        import backpack  # noqa: F401
    except ImportError:
        return False
    return True


def _missing(result: dict) -> str | None:
    """The cell of a method that did not run: ``fails``, or ``—`` where it was not timed."""
    if "error" not in result:
        return None
    return "—" if result["error"] == "not timed" else "fails"


def _time(result: dict, plain: dict) -> str:
    if "error" in result:
        return _missing(result)
    if result is plain:
        return f"{1e3 * result['seconds']:.3g} ms"
    return f"{result['seconds'] / plain['seconds']:.2g}×"


def _memory(result: dict, plain: dict) -> str:
    return _missing(result) or f"{result['extra_bytes'] / 2**20:.3g}"


def tables(results: dict, methods: list[str]) -> str:
    """Two markdown tables: time per step as a ratio to ``plain``, and peak extra memory."""
    out = []
    for title, text in (
        ("Median time per step: plain backward's, the others' as a ratio to it", _time),
        ("Peak extra memory, MiB", _memory),
    ):
        header = (
            "| model | B | " + " | ".join(methods) + " | threads, load before → after (tries) |"
        )
        out += [f"### {title}", "", header, "|---" * (len(methods) + 3) + "|"]
        for (model_name, batch), row in results.items():
            cells = [text(row[method], row["plain"]) for method in methods]
            machine = row.get("_machine", {})
            load = " → ".join(f"{x:.1f}" for x in machine.get("load", ()))
            cells.append(f"{machine.get('threads')}, {load} ({machine.get('tries', 1)})")
            out.append(f"| {model_name} | {batch} | " + " | ".join(cells) + " |")
        out.append("")
    overhead = [(b, row) for (name, b), row in results.items() if name == OVERHEAD]
    for batch, row in overhead:
        plain = row["plain"]
        cells = [
            f"{1e6 * (row[m]['seconds'] - plain['seconds']):.0f} µs" if "error" not in row[m]
            else _missing(row[m]) for m in methods[1:]
        ]  # fmt: skip
        out += [
            f"### Per-call overhead: time per step less plain backward's ({OVERHEAD}, B = {batch})",
            "",
            "| plain | " + " | ".join(methods[1:]) + " |",
            "|---" * len(methods) + "|",
            f"| {1e6 * plain['seconds']:.0f} µs | " + " | ".join(cells) + " |",
            "",
        ]
    out.append("`fails`: the method cannot run the model. `—`: not measured (see the script).")
    if "backpack" not in methods:
        out.append(
            "BackPACK is not installed, so it has no column "
            "(`pip install --no-deps backpack-for-pytorch einops unfoldNd`)."
        )
    return "\n".join(out)


def plot(results: dict, methods: list[str], path: Path) -> None:
    """Grouped bars: time ratio to plain backward, one group per (model, B), log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = methods[1:]
    fig, ax = plt.subplots(figsize=(12, 4.5))
    width = 0.8 / len(shown)
    labels, labeled = [], set()
    for i, ((model_name, batch), row) in enumerate(results.items()):
        labels.append(f"{model_name.split(' ')[0]}\nB={batch}")
        for j, method in enumerate(shown):
            r, x = row[method], i + (j - len(shown) / 2 + 0.5) * width
            if "error" not in r:
                ax.bar(
                    x,
                    r["seconds"] / row["plain"]["seconds"],
                    width,
                    color=f"C{j}",
                    label=None if method in labeled else method,
                )
                labeled.add(method)
            elif _missing(r) == "fails":  # a method that cannot run the model: a cross
                ax.plot(x, 1, marker="x", color=f"C{j}", markersize=6)
    ax.axhline(1, color="black", linewidth=0.8)
    ax.set_title("Time per step over a plain backward (× at 1: the method cannot run the model)")
    ax.set_yscale("log")
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax.set_ylabel("time per step / plain backward")
    ax.legend(ncol=len(shown), fontsize=8, loc="upper left")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=DefaultsWhereSet
    )
    parser.add_argument(
        "--batch-sizes", type=int, nargs="+", help="[default: 32 256 1024; --quick: 32 256]"
    )
    parser.add_argument(
        "--repeats", type=int, help="timed steps per cell [default: 20; --quick: 3]"
    )
    parser.add_argument(
        "--real-batch-sizes", type=int, nargs="+", default=[32],
        help="batch sizes of the real models (examples/real_models.py), timed with half "
        "of the repeats",
    )  # fmt: skip
    parser.add_argument(
        "--models", nargs="+", choices=list(MODELS), default=list(MODELS), metavar="MODEL",
        help=f"model families, from: {'; '.join(MODELS)}",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path("runs/benchmarks"), help="output folder")
    parser.add_argument("--quick", action="store_true", help="fewer batch sizes and repeats")
    parser.add_argument("--device", default="cpu", help="where the models run: cpu, cuda, ...")
    # internal: one process's measurements
    parser.add_argument("--times", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--memory", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--optimizer", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument(
        "--optimizer-tensors", type=int, nargs="*", default=list(OPTIMIZER_TENSORS),
        help="parameter tensors of the optimizer-step rows (none: skip them)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    args.batch_sizes = args.batch_sizes or ([32, 256] if args.quick else [32, 256, 1024])
    args.repeats = args.repeats or (3 if args.quick else 20)
    return args


def main(argv=None) -> dict:
    global DEVICE
    args = parse(argv)
    DEVICE = torch.device(args.device)
    if args.times:
        model_name, batch, repeats, *methods = args.times
        print(json.dumps(time_steps(model_name, int(batch), methods, int(repeats))))
        return {}
    if args.memory:
        model_name, batch, method = args.memory
        print(json.dumps(peak_memory(model_name, int(batch), method)))
        return {}
    if args.optimizer:
        count, repeats = map(int, args.optimizer)
        print(json.dumps(optimizer_steps(count, repeats)))
        return {}
    from tqdm.auto import tqdm

    methods = [m for m in METHODS if available(m)]

    def batch_sizes(model_name: str) -> list[int]:
        if model_name == OVERHEAD:
            return [OVERHEAD_BATCH]
        return args.batch_sizes if model_name in TOY_MODELS else args.real_batch_sizes

    def repeats(model_name: str) -> int:
        if model_name == OVERHEAD:  # microseconds: many more steps for a steady median
            return 10 * args.repeats
        return args.repeats if model_name in TOY_MODELS else max(3, args.repeats // 2)

    cells = [(m, b, repeats(m)) for m in args.models for b in batch_sizes(m)]
    results: dict = {}
    for model_name, batch, repeats in tqdm(cells, unit="cell", desc="model × batch size"):
        results[(model_name, batch)] = measure(model_name, batch, methods, repeats)
    optimizers = {}
    for count in args.optimizer_tensors:
        before = os.getloadavg()[0]
        optimizers[count] = _run("--optimizer", str(count), str(args.repeats))
        optimizers[count]["_machine"] = {"load": (before, os.getloadavg()[0])}
    args.out.mkdir(parents=True, exist_ok=True)
    text = tables(results, methods) + ("\n\n" + optimizer_table(optimizers) if optimizers else "")
    (args.out / "results.md").write_text(text + "\n")
    plot(results, methods, args.out / "results.png")
    print(text)
    print(f"wrote {args.out / 'results.md'} and {args.out / 'results.png'}")
    return results


if __name__ == "__main__":
    main()
