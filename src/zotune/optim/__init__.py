"""``torch.optim``-style zeroth-order optimizers: an estimator plus an update rule.

Importing the package registers every optimizer (``zotune.optim.registry``), in this order."""

from .base import StepRecord, ZOOptimizer
from .sgd import ZOSGD
from .sign import ZOSGDSign
from .momentum import ZOSGDMomentum
from .conservative import ZOSGDConservative
from .adam import ZOAdam
from .forward_grad import ForwardGrad
from .jaguar import JaguarSignSGD
from .muon import ZOMuon, ZOMuonSubspace
from .sparse import SparseMeZO
from .fzoo import FZOO
from .hizoo import HiZOO
from .lozo import LOZO
from .newton_schulz import newton_schulz

__all__ = ["ZOOptimizer", "StepRecord", "ZOSGD", "ZOSGDSign", "ZOSGDMomentum", "ZOSGDConservative", "ZOAdam", "ForwardGrad", "JaguarSignSGD", "ZOMuon", "ZOMuonSubspace", "SparseMeZO", "FZOO", "HiZOO", "LOZO", "newton_schulz"]
