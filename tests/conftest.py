"""Every engine the tests build checks each call against autograd (``pergrad.verify``),
unless a test turns it off: a wrong per-example gradient anywhere in the suite fails it.

Hypothesis draws the same examples on every run (the ``ci`` profile: derandomized, no
database of earlier failures), so that the suite cannot pass on one run and fail on the
next. ``HYPOTHESIS_PROFILE=explore`` draws new examples each run, to look for failures."""

import os

import pytest
from hypothesis import settings

os.environ.setdefault("PERGRAD_VERIFY", "1")
VERIFIED = os.environ["PERGRAD_VERIFY"]

settings.register_profile("ci", derandomize=True, database=None, deadline=None)
settings.register_profile("explore", derandomize=False, database=None, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True)
def _verification_stays_as_set():
    """A test that changes the switch for the tests after it fails."""
    yield
    assert os.environ.get("PERGRAD_VERIFY") == VERIFIED, "the test changed PERGRAD_VERIFY"


def pytest_terminal_summary(terminalreporter):
    """The count of PyTorch's module samples on the per-layer path (test_torch_modules.py)."""
    import sys

    tally = getattr(sys.modules.get("torch_modules"), "TALLY", None)
    if tally:
        counts = ", ".join(f"{count} {kind}" for kind, count in tally.most_common())
        terminalreporter.write_line(f"PyTorch's module_db: {sum(tally.values())} samples, {counts}")
