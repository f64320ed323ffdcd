"""``torch.optim``-style zeroth-order optimizers: an estimator plus an update rule."""

from .adam import ZOAdam
from .base import StepRecord, ZOOptimizer
from .conservative import ZOSGDConservative
from .forward_grad import ForwardGrad
from .jaguar import JaguarSignSGD
from .momentum import ZOSGDMomentum
from .muon import ZOMuon
from .newton_schulz import newton_schulz
from .sgd import ZOSGD
from .sign import ZOSGDSign

__all__ = ["ZOOptimizer", "StepRecord", "ZOSGD", "ZOSGDSign", "ZOSGDMomentum", "ZOSGDConservative", "ZOAdam", "ForwardGrad", "JaguarSignSGD", "ZOMuon", "newton_schulz"]
