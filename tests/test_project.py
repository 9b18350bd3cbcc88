"""The project's own promises: CI runs the README's test line; the public names exist."""

import re
from pathlib import Path

import optim
import pergrad

ROOT = Path(__file__).resolve().parent.parent


def test_ci_runs_the_test_line_written_in_the_readme():
    ci_line = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci_line in (ROOT / "README.md").read_text()


def test_readme_python_blocks_run_as_written_each_on_its_own():
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)
    assert blocks
    rules = dict(pergrad.rules.RULES)
    try:
        for block in blocks:
            exec(compile(block, "README.md", "exec"), {})  # a fresh namespace: no leftovers
    finally:  # the README registers a rule of its own
        pergrad.rules.RULES.clear()
        pergrad.rules.RULES.update(rules)


def test_public_names():
    assert {"PerExample", "GradStats", "FallbackWarning", "zero_grad", "grad_stats"} <= set(
        pergrad.__all__
    )
    assert all(hasattr(pergrad, name) for name in pergrad.__all__)
    assert all(hasattr(optim, name) for name in optim.__all__)


def test_the_fallback_warning_keeps_its_old_address():
    from pergrad.auto import FallbackWarning

    assert FallbackWarning is pergrad.FallbackWarning
