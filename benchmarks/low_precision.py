"""The mean of squares of Hugging Face GPT-2 in float32 and under bfloat16 autocast: how many
entries of ``sq_mean`` are negative, and how far the lowest falls below ``p.grad²``.

    python benchmarks/low_precision.py                    # GPT-2 small: 12 layers, width 768
    python benchmarks/low_precision.py --layers 2 --width 64

Few positions (``T = 4``) make the per-layer rules take the position-pair expansion, whose
terms have both signs. The ``pergrad`` imported is the first on the path (``PYTHONPATH=../old``
measures an older checkout). Prints one JSON object per precision.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time

import torch
import transformers

import pergrad


def measure(layers: int, width: int, batch: int, length: int, autocast: bool) -> dict:
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=layers, n_embd=width, n_head=max(1, width // 64), n_positions=64
    )
    model = transformers.GPT2LMHeadModel(config)
    tokens = torch.randint(0, config.vocab_size, (batch, length))
    engine = pergrad.PerExample(model, pergrad.losses.causal_lm, verify=False)
    context = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    started = time.perf_counter()
    with context:
        engine.backward({"input_ids": tokens}, tokens)
    negative, below = 0, 0.0
    for p in model.parameters():
        sq_mean, square = p.grad_stats.sq_mean.double(), p.grad.double().square()
        negative += int((sq_mean < 0).sum())
        below = max(below, float(((square - sq_mean) / square.clamp(min=1e-300)).max()))
    return {
        "precision": "bfloat16 autocast" if autocast else "float32",
        "negative sq_mean entries": negative,
        "largest (grad² - sq_mean) / grad²": below,
        "seconds": round(time.perf_counter() - started, 1),
    }


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=4)
    args = parser.parse_args(argv)
    found = [measure(args.layers, args.width, args.batch, args.length, on) for on in (False, True)]
    for row in found:
        print(json.dumps(row))
    return found


if __name__ == "__main__":
    main()
