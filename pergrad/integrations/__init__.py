"""pergrad inside trainers: :mod:`pergrad.integrations.transformers` for Hugging Face's
``Trainer``. Each module imports its framework; ``import pergrad`` imports none of them."""
