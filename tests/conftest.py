"""Every engine the tests build checks each call against autograd (``pergrad.verify``),
unless a test turns it off: a wrong per-example gradient anywhere in the suite fails it."""

import os

os.environ.setdefault("PERGRAD_VERIFY", "1")
