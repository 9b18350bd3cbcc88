"""What per-example statistics cost, as ratios to a plain ``loss.mean().backward()``.

    python benchmarks/per_example_cost.py            # B = 32, 256, 1024
    python benchmarks/per_example_cost.py --quick    # B = 32, 256, fewer repeats

For three model families (an MLP, a CNN, a small transformer), every method runs the same
step on the same batch, each in a fresh process, so that its peak memory is its own:

- ``plain``: ``loss.mean().backward()``, the reference (its time and extra memory are 1×);
- ``auto``, ``func``, ``hooks``, ``loop``: ``pergrad.PerExample(mode=…).backward``, which
  leaves ``p.grad`` and ``Σ_b g_b²`` (``auto`` computes them layer by layer);
- ``grads()``: ``pergrad.PerExample().grads``, all per-example gradients materialized;
- ``opacus``: Opacus's ``GradSampleModule`` (``grad_sample``), then ``Σ_b g_b²`` from it;
- ``backpack``: BackPACK's ``SumGradSquared``, where it is installed
  (``pip install --no-deps backpack-for-pytorch einops unfoldNd``).

Time is the median over the repeats; extra memory is the process's peak resident memory
during two steps, less what it held before them (both after one warm-up step; memory in a
separate process where glibc returns every freed block of 64 KiB or more). Writes
``results.md`` (two tables) and ``results.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
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

METHODS = ("plain", "auto", "func", "hooks", "loop", "grads()", "opacus", "backpack")
LOOP_LIMIT = 256
"""``loop`` runs one backward per example; beyond this batch size it is not timed."""


class Transformer(nn.Module):
    """Embedding + one TransformerEncoderLayer + Linear over the mean of a 32-token sequence."""

    def __init__(self, vocabulary: int = 100, width: int = 64):
        super().__init__()
        self.embed = nn.Embedding(vocabulary, width)
        self.block = nn.TransformerEncoderLayer(width, 4, 2 * width, dropout=0.0, batch_first=True)
        self.head = nn.Linear(width, 10)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(self.block(self.embed(tokens)).mean(1))


def mlp() -> tuple[nn.Module, Callable[[int], Tensor]]:
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU())
    model.append(nn.Linear(256, 10))
    return model, lambda b: torch.randn(b, 64)


def cnn() -> tuple[nn.Module, Callable[[int], Tensor]]:
    model = nn.Sequential(
        nn.Conv2d(1, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 4 * 4, 10),
    )  # fmt: skip
    return model, lambda b: torch.randn(b, 1, 28, 28)


def transformer() -> tuple[nn.Module, Callable[[int], Tensor]]:
    return Transformer(), lambda b: torch.randint(0, 100, (b, 32))


MODELS = {
    "MLP 64-256-256-10": mlp,
    "CNN (2 conv + linear, 28×28)": cnn,
    "Transformer (Embedding + TransformerEncoderLayer + Linear, seq 32)": transformer,
}


def make_step(method: str, model: nn.Module, x: Tensor, y: Tensor) -> Callable[[], object]:
    """One training step's worth of work for ``method`` on this batch."""
    import pergrad

    loss_fn = nn.CrossEntropyLoss(reduction="none")
    if method == "plain":

        def step():
            model.zero_grad(set_to_none=True)
            loss_fn(model(x), y).mean().backward()

        return step
    if method in ("auto", "func", "hooks", "loop"):
        engine = pergrad.PerExample(model, loss_fn, mode=method)

        def step():
            engine.zero_grad()
            engine.backward(x, y)

        return step
    if method == "grads()":
        engine = pergrad.PerExample(model, loss_fn)
        return lambda: engine.grads(x, y)
    if method == "opacus":
        from opacus import GradSampleModule

        wrapped = GradSampleModule(model, loss_reduction="mean")

        def step():
            wrapped.zero_grad(set_to_none=True)
            loss_fn(wrapped(x), y).mean().backward()
            return [p.grad_sample.square().sum(0) for p in model.parameters()]

        return step
    if method == "backpack":
        from backpack import backpack, extend
        from backpack.extensions import SumGradSquared

        extended, mean_loss = extend(model), extend(nn.CrossEntropyLoss())

        def step():
            extended.zero_grad(set_to_none=True)
            with backpack(SumGradSquared()):
                mean_loss(extended(x), y).backward()
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


def measure_one(model_name: str, batch: int, method: str, repeats: int) -> dict:
    """Median time of ``repeats`` steps, and their peak extra memory, after one warm-up step
    (whose one-time allocations, such as lazily loaded kernels, are not counted)."""
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    model, inputs = MODELS[model_name]()
    x, y = inputs(batch), torch.randint(0, 10, (batch,))
    step = make_step(method, model, x, y)
    step()
    _reset_peak()
    before = _memory_bytes("VmRSS")
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    peak = _memory_bytes("VmHWM")
    return {"seconds": statistics.median(times), "extra_bytes": max(peak - before, 0)}


MEMORY_ENVIRONMENT = {"MALLOC_MMAP_THRESHOLD_": "65536"}
"""For the memory run: glibc maps every block of 64 KiB or more on its own and gives it back
when freed, so resident memory follows the live tensors instead of a pool kept from earlier
steps. It slows allocation, so times come from a separate run without it."""


def measure(model_name: str, batch: int, method: str, repeats: int) -> dict:
    """Time (in a fresh process) and peak extra memory (in another, with
    :data:`MEMORY_ENVIRONMENT`); ``{"error": reason}`` where the method fails."""
    if method == "loop" and batch > LOOP_LIMIT:
        return {"error": f"not timed beyond B={LOOP_LIMIT}"}
    results = []
    for count, extra_env in ((repeats, {}), (2, MEMORY_ENVIRONMENT)):
        command = [sys.executable, __file__, "--one", model_name, str(batch), method, str(count)]
        done = subprocess.run(
            command, capture_output=True, text=True, env={**os.environ, **extra_env}
        )
        if done.returncode != 0:
            lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
            return {"error": lines[-1][:120] if lines else f"exit status {done.returncode}"}
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    timed, sized = results
    return {"seconds": timed["seconds"], "extra_bytes": sized["extra_bytes"]}


def available(method: str) -> bool:
    if method != "backpack":
        return True
    try:
        import backpack  # noqa: F401
    except ImportError:
        return False
    return True


def cell(result: dict, plain: dict, key: str) -> str:
    if "error" in result:
        return "fails" if not result["error"].startswith("not timed") else "—"
    return f"{result[key] / plain[key]:.2g}×" if plain[key] else "n/a"


def tables(results: dict, methods: list[str]) -> str:
    """Two markdown tables: time per step and peak extra memory, as ratios to ``plain``."""
    out = []
    for title, key, unit in (
        ("Median time per step", "seconds", lambda r: f"{1e3 * r['seconds']:.3g} ms"),
        ("Peak extra memory", "extra_bytes", lambda r: f"{r['extra_bytes'] / 2**20:.3g} MiB"),
    ):
        out += [f"### {title}, as a ratio to plain backward", ""]
        out.append("| model | B | plain | " + " | ".join(methods[1:]) + " |")
        out.append("|---" * (len(methods) + 2) + "|")
        for (model_name, batch), row in results.items():
            plain = row["plain"]
            cells = [cell(row[m], plain, key) for m in methods[1:]]
            out.append(f"| {model_name} | {batch} | {unit(plain)} | " + " | ".join(cells) + " |")
        out.append("")
    out.append("`fails`: the method cannot run the model. `—`: not measured (see the script).")
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
            r = row[method]
            if "error" not in r:
                ax.bar(
                    i + (j - len(shown) / 2 + 0.5) * width,
                    r["seconds"] / row["plain"]["seconds"],
                    width,
                    color=f"C{j}",
                    label=None if method in labeled else method,
                )
                labeled.add(method)
    ax.axhline(1, color="black", linewidth=0.8)
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
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument(
        "--batch-sizes", type=int, nargs="+", help="[default: 32 256 1024; --quick: 32 256]"
    )
    parser.add_argument(
        "--repeats", type=int, help="timed steps per cell [default: 20; --quick: 3]"
    )
    parser.add_argument(
        "--models", nargs="+", choices=list(MODELS), default=list(MODELS), metavar="MODEL",
        help=f"model families, from: {'; '.join(MODELS)}",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path("runs/benchmarks"), help="output folder")
    parser.add_argument("--quick", action="store_true", help="fewer batch sizes and repeats")
    parser.add_argument("--one", nargs=4, help=argparse.SUPPRESS)  # internal: one measurement
    args = parser.parse_args(argv)
    args.batch_sizes = args.batch_sizes or ([32, 256] if args.quick else [32, 256, 1024])
    args.repeats = args.repeats or (3 if args.quick else 20)
    return args


def main(argv=None) -> dict:
    args = parse(argv)
    if args.one:
        model_name, batch, method, repeats = args.one
        print(json.dumps(measure_one(model_name, int(batch), method, int(repeats))))
        return {}
    from tqdm.auto import tqdm

    methods = [m for m in METHODS if available(m)]
    cells = [(m, b) for m in args.models for b in args.batch_sizes]
    results: dict = {}
    with tqdm(total=len(cells) * len(methods), unit="run") as bar:
        for model_name, batch in cells:
            row = results.setdefault((model_name, batch), {})
            for method in methods:
                bar.set_description(f"{model_name.split(' ')[0]} B={batch} {method}")
                row[method] = measure(model_name, batch, method, args.repeats)
                bar.update()
    args.out.mkdir(parents=True, exist_ok=True)
    text = tables(results, methods)
    (args.out / "results.md").write_text(text + "\n")
    plot(results, methods, args.out / "results.png")
    print(text)
    print(f"wrote {args.out / 'results.md'} and {args.out / 'results.png'}")
    return results


if __name__ == "__main__":
    main()
