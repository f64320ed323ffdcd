"""ZO-Muon: Muon's orthogonalised momentum on the SPSA estimate."""

from __future__ import annotations

import math

import torch

from ..estimators.spsa import SPSAEstimate
from .momentum import ZOSGDMomentum
from .newton_schulz import newton_schulz


class ZOMuon(ZOSGDMomentum):
    """``M <- momentum * M + grad_hat``; for a matrix ``W <- W - lr * scale * NS(M)`` with
    ``scale = sqrt(max(1, rows / cols))`` and ``NS`` five Newton-Schulz iterations; parameters
    of other shapes (norms, biases) take the momentum step ``W <- W - lr * M``.

    The SPSA estimate ``g * z`` is a random matrix scaled by ``g``; orthogonalised, every
    singular value of the step is about ``lr * scale`` whatever the size of ``g``: the step
    length is fixed, as in a sign method. ``M`` is float32.
    """

    def __init__(
        self, params, lr: float, eps: float = 1e-3, seed: int = 0, momentum: float = 0.95, ns_steps: int = 5, **options
    ):
        if not isinstance(ns_steps, int) or ns_steps < 1:
            raise ValueError(f"ns_steps must be an int >= 1, got {ns_steps!r}")
        super().__init__(params, lr=lr, eps=eps, seed=seed, momentum=momentum, defaults=dict(ns_steps=ns_steps), **options)

    def update_param(
        self, p: torch.Tensor, index: int, estimate: SPSAEstimate, group: dict, state: dict
    ) -> None:
        if p.ndim != 2:  # norms, biases: momentum SGD
            super().update_param(p, index, estimate, group, state)
            return
        m = self.accumulate(p, index, estimate, group, state)
        self.decay(p, group)
        scale = math.sqrt(max(1.0, p.shape[0] / p.shape[1]))
        p.add_(newton_schulz(m, group["ns_steps"]), alpha=-group["lr"] * scale)
