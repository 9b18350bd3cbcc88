"""Every engine the tests build checks each call against autograd (``pergrad.verify``),
unless a test turns it off: a wrong per-example gradient anywhere in the suite fails it."""

import os

import pytest

os.environ.setdefault("PERGRAD_VERIFY", "1")
VERIFIED = os.environ["PERGRAD_VERIFY"]


@pytest.fixture(autouse=True)
def _verification_stays_as_set():
    """A test that changes the switch for the tests after it fails."""
    yield
    assert os.environ.get("PERGRAD_VERIFY") == VERIFIED, "the test changed PERGRAD_VERIFY"
