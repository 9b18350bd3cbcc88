"""The runnable examples of pergrad inside the stacks researchers train with, each on two CPU
processes: Hugging Face's Trainer and a hand-written Accelerate loop under ``accelerate
launch``, and a Lightning module under its DDP strategy. Every rank must end with the same
parameters (the examples check it across ranks)."""

import os
import shutil
import sys
from pathlib import Path

import pytest
from test_distributed import launch

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SAME = "identical parameters on all 2 ranks: True"


def _run(command) -> str:
    """Run ``command(port)`` in ``examples/`` (:func:`test_distributed.launch`)."""
    environment = {**os.environ, "PYTHONPATH": str(EXAMPLES)}
    return launch(command, SAME, timeout=300, cwd=EXAMPLES, env=environment)


@pytest.mark.parametrize("example", ["hf_trainer.py", "accelerate_loop.py"])
def test_an_example_under_accelerate_launch_keeps_the_ranks_identical(example):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    launcher = shutil.which("accelerate")
    if launcher is None:
        pytest.skip("the accelerate command is not on PATH")
    stdout = _run(lambda port: [
        launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", port, str(EXAMPLES / example), "--steps", "3",
    ])  # fmt: skip
    assert SAME in stdout


def test_the_lightning_example_keeps_the_ranks_identical():
    pytest.importorskip("lightning")
    pytest.importorskip("transformers")
    command = [sys.executable, str(EXAMPLES / "lightning_module.py"), "--steps", "3"]
    stdout = _run(lambda port: [*command, "--devices", "2"])  # Lightning picks its own port
    assert SAME in stdout
