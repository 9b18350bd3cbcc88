"""What pergrad costs inside the training stack: a ``torch.compile``'d model, and
``PerExampleTrainer`` (Hugging Face's ``Trainer``) over the engine it drives.

    python benchmarks/training_stack.py            # 20 steps a cell
    python benchmarks/training_stack.py --quick    # 5

Rows, each timed in this process with its methods taking turns step by step (as
``per_example_cost.py`` does), median over the repeats:

- compiled models (the benchmark's MLP and transformer at B = 256): a plain eager step, a
  plain step of ``torch.compile(model)``, and ``PerExample.backward`` on each (pergrad runs a
  compiled model uncompiled), as ratios to the plain compiled step;
- the integration (GPT-2 of ``examples/real_models.py``'s benchmark size, B = 32):
  ``PerExampleTrainer.training_step`` against ``PerExample.backward`` on the same batch.

Records the thread count and the machine's load before and after; writes ``stack.md`` to
``--out``.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
import per_example_cost as cost  # noqa: E402
from cli import DefaultsWhereSet  # noqa: E402
from real_models import SIZES  # noqa: E402

import pergrad  # noqa: E402

COMPILED = {"MLP 64-256-256-10": cost.mlp, "Transformer (seq 32)": cost.transformer}
COMPILED_BATCH, TRAINER_BATCH = 256, 32


def compiled_row(build, repeats: int) -> dict:
    """Median seconds of plain and pergrad steps on the model eager and compiled."""

    def maker(compiled: bool, per_example: bool):
        def make():
            torch.manual_seed(0)
            model, x, y, loss_fn = build(COMPILED_BATCH)
            model, x, y = model.to(cost.DEVICE), x.to(cost.DEVICE), y.to(cost.DEVICE)
            run = torch.compile(model) if compiled else model
            if per_example:
                engine = pergrad.PerExample(run, loss_fn, verify=False)

                def step():
                    engine.zero_grad()
                    engine.backward(x, y)

                return step

            def step():
                model.zero_grad(set_to_none=True)
                loss_fn(run(x), y).mean().backward()

            return step

        return make

    return cost.median_times(
        {
            "plain compiled": maker(True, False),
            "plain eager": maker(False, False),
            "pergrad, compiled model": maker(True, True),
            "pergrad, eager model": maker(False, True),
        },
        repeats,
    )


def trainer_row(repeats: int, out: Path) -> dict:
    """Median seconds of ``PerExampleTrainer.training_step`` and of ``PerExample.backward``
    on the same GPT-2 batch."""
    import transformers

    from pergrad.integrations.transformers import PerExampleTrainer

    def gpt2():
        torch.manual_seed(0)
        size = SIZES["bench"]
        config = transformers.GPT2Config(
            n_layer=2, n_head=size["heads"], n_embd=size["width"], n_positions=size["length"],
            vocab_size=size["vocab"], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
            bos_token_id=0, eos_token_id=0,
        )  # fmt: skip
        model = transformers.GPT2LMHeadModel(config).to(cost.DEVICE)
        ids = torch.randint(0, size["vocab"], (TRAINER_BATCH, size["length"]), device=cost.DEVICE)
        return model, ids

    def engine_step():
        model, ids = gpt2()
        engine = pergrad.PerExample(model, pergrad.losses.causal_lm, verify=False)

        def step():
            engine.zero_grad()
            engine.backward({"input_ids": ids}, ids)

        return step

    def trainer_step():
        import optim

        model, ids = gpt2()
        arguments = transformers.TrainingArguments(
            output_dir=str(out / "trainer"), report_to=[], disable_tqdm=True,
            use_cpu=cost.DEVICE.type == "cpu",
        )  # fmt: skip
        opt = optim.Adam(model.parameters(), lr=1e-4)
        trainer = PerExampleTrainer(
            model=model, args=arguments, per_example_loss=pergrad.losses.causal_lm,
            optimizers=(opt, None), engine_options={"verify": False},
        )  # fmt: skip
        trainer.current_gradient_accumulation_steps = 1  # what the training loop sets

        def step():
            opt.zero_grad()
            trainer.training_step(model, {"input_ids": ids, "labels": ids})

        return step

    return cost.median_times(
        {"PerExample.backward": engine_step, "PerExampleTrainer.training_step": trainer_step},
        repeats,
    )


def table(rows: dict) -> str:
    out = [
        "### torch.compile: time per step as a ratio to a plain step of the compiled model",
        "",
    ]
    for name, row in rows.items():
        if name == "trainer":
            continue
        reference = row["plain compiled"]
        if not out[-1].startswith("|"):
            methods = [m for m in row if m not in ("threads", "_machine")]
            out += [
                "| model | B | " + " | ".join(methods) + " | threads, load before → after |",
                "|---" * (len(methods) + 3) + "|",
            ]
        cells = []
        for method in methods:
            r = row[method]
            if "error" in r:
                cells.append(f"fails ({r['error'][:40]})")
            elif r is reference:
                cells.append(f"{1e3 * r['seconds']:.3g} ms")
            else:
                cells.append(f"{r['seconds'] / reference['seconds']:.2f}×")
        load = " → ".join(f"{x:.1f}" for x in row["_machine"])
        out.append(
            f"| {name} | {COMPILED_BATCH} | " + " | ".join(cells) + f" | {row['threads']}, {load} |"
        )
    trainer = rows.get("trainer")
    if trainer:
        engine, step = trainer["PerExample.backward"], trainer["PerExampleTrainer.training_step"]
        load = " → ".join(f"{x:.1f}" for x in trainer["_machine"])
        if "error" in engine or "error" in step:
            ratio = f"fails ({(engine.get('error') or step.get('error'))[:60]})"
        else:
            ratio = f"{step['seconds'] / engine['seconds']:.3f}×"
        out += [
            "",
            "### PerExampleTrainer over the engine it drives (GPT-2, B = 32)",
            "",
            "| PerExample.backward | training_step / backward | threads, load before → after |",
            "|---|---|---|",
            f"| {1e3 * engine.get('seconds', float('nan')):.3g} ms | {ratio} | "
            f"{trainer['threads']}, {load} |",
        ]
    return "\n".join(out) + "\n"


def parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=DefaultsWhereSet
    )
    parser.add_argument(
        "--repeats", type=int, help="timed steps per cell [default: 20; --quick: 5]"
    )
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--device", default="cpu", help="where the models run: cpu, cuda, ...")
    parser.add_argument("--out", type=Path, default=Path("runs/benchmarks"), help="output folder")
    args = parser.parse_args(argv)
    args.repeats = args.repeats or (5 if args.quick else 20)
    return args


def main(argv=None) -> dict:
    args = parse(argv)
    cost.DEVICE = torch.device(args.device)
    warnings.filterwarnings("ignore")
    args.out.mkdir(parents=True, exist_ok=True)
    rows = {}
    for name, build in COMPILED.items():
        before = os.getloadavg()[0]
        rows[name] = compiled_row(build, args.repeats)
        rows[name]["_machine"] = (before, os.getloadavg()[0])
    before = os.getloadavg()[0]
    rows["trainer"] = trainer_row(args.repeats, args.out)
    rows["trainer"]["_machine"] = (before, os.getloadavg()[0])
    text = table(rows)
    (args.out / "stack.md").write_text(text)
    print(text)
    return rows


if __name__ == "__main__":
    main()
