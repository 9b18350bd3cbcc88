"""The project's own promises: CI runs the README's test line; the public names exist."""

import re
from pathlib import Path

import optim
import pergrad

ROOT = Path(__file__).resolve().parent.parent


def test_ci_runs_the_test_line_written_in_the_readme():
    ci_line = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci_line in (ROOT / "README.md").read_text()


def test_the_readme_stays_short_and_for_users():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 200
    assert not re.search(r"\b(issue|session|lent)\b", text, flags=re.IGNORECASE)


def test_public_names():
    assert {"PerExample", "GradStats", "FallbackWarning", "zero_grad", "grad_stats"} <= set(
        pergrad.__all__
    )
    assert all(hasattr(pergrad, name) for name in pergrad.__all__)
    assert all(hasattr(optim, name) for name in optim.__all__)


def test_the_fallback_warning_keeps_its_old_address():
    from pergrad.auto import FallbackWarning

    assert FallbackWarning is pergrad.FallbackWarning
