"""optim: batch-size-invariant optimizers that consume ``pergrad``'s per-example statistics.

Hyperparameters are per example: ``lr`` is the learning rate for one example and horizons
count examples; each step reads its batch size from the statistics. See docs/MATH.md.
"""

from optim import convert, functional
from optim.adaptive import Adam, RMSprop
from optim.base import PerExampleOptimizer
from optim.batch_size import AdaptiveBatchSampler, BatchSizeSchedule
from optim.sgd import SGD
from optim.training import TrainingStep

__all__ = [
    "SGD",
    "Adam",
    "AdaptiveBatchSampler",
    "BatchSizeSchedule",
    "PerExampleOptimizer",
    "RMSprop",
    "TrainingStep",
    "convert",
    "functional",
]
