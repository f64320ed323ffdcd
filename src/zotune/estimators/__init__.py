"""Gradient estimators: how random directions and loss differences become an estimate."""

from .directions import DISTRIBUTIONS, DirectionSampler, mix
from .perturb import Perturbation
from .spsa import SPSA, GradientEstimate, SPSAEstimate

__all__ = ["DISTRIBUTIONS", "DirectionSampler", "mix", "Perturbation", "SPSA", "GradientEstimate", "SPSAEstimate"]
