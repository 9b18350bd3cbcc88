"""optim: batch-size-invariant optimizers that consume ``pergrad``'s per-example statistics."""

__all__: list[str] = []
