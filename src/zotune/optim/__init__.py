"""``torch.optim``-style zeroth-order optimizers: an estimator plus an update rule."""

from .base import StepRecord, ZOOptimizer
from .sgd import ZOSGD

__all__ = ["ZOOptimizer", "ZOSGD", "StepRecord"]
