"""LOZO (Chen et al. 2025, "Enhancing zeroth-order fine-tuning for language models with low-rank
structures"): low-rank perturbations of the weight matrices, their row space refreshed lazily."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ..estimators.directions import mix
from .base import require
from .low_rank import gaussian, low_rank_shape
from .sgd import ZOSGD

LOZO_TAG = 0x4C4F5A4F  # names LOZO's factors among a key's draws


class LOZO(ZOSGD):
    """ZO-SGD whose direction for a weight matrix ``W`` (m x n) is ``Z = U V^T / sqrt(r)``, of rank
    ``r``: ``U`` (m x r) new with every direction, ``V`` (n x r) drawn once every ``refresh``
    steps (LOZO's lazy sampling: the steps of a period move ``W`` within one row space). Entries
    of ``Z`` have unit variance, as MeZO's ``z``, so the learning rates compare. Other parameters
    (vectors: norms, biases) take MeZO's dense ``z``.

        x <- x - lr * (1/q) sum_j g_j Z_j                             (plus weight decay)

    ``U`` comes from the direction's key and ``V`` from (seed, parameter, period), so a replay
    rebuilds both; nothing is stored but the two factors of the step's directions while it runs.
    The update is ZO-SGD's, along these directions.

    Args:
        rank: ``r`` (LOZO: 2 to 8).
        refresh: ``nu``, steps between two draws of ``V`` (LOZO: 50 to 100).
        (the others as :class:`~zotune.optim.ZOSGD`.)
    """

    summary = "LOZO: low-rank directions U V^T with V refreshed every few steps (ICLR 2025)"
    # 10: its LoRA-FA sweep's pick (docs/sweeps.md); full: the family's 1e-4 until 17, then 3e-5, measured at the
    # fewer-forwards grid's 675 steps, where 1e-4 diverges (docs/convergence.md)
    default_lr = {(10, "lora-fa"): 1e-2, (17, "full"): 3e-5}

    def __init__(self, params, lr: float, eps: float = 1e-3, seed: int = 0, n_queries: int = 1,
                 distribution: str = "gaussian", weight_decay: float = 0.0, rank: int = 2, refresh: int = 50,
                 **options):
        require(isinstance(rank, int) and rank >= 1, f"rank must be an int >= 1, got {rank!r}")
        require(isinstance(refresh, int) and refresh >= 1, f"refresh must be an int >= 1, got {refresh!r}")
        super().__init__(params, lr=lr, eps=eps, seed=seed, n_queries=n_queries, distribution=distribution,
                         weight_decay=weight_decay, **options)
        self.rank, self.refresh = rank, refresh

    def direction_shape(self, index: int, p: torch.Tensor, state: dict) -> Callable[..., torch.Tensor] | None:
        """LOZO: ``U V^T / sqrt(r)`` (``V`` of the current period) for a matrix larger than the rank; None (dense z)
        otherwise."""
        if p.dim() != 2 or min(p.shape) <= self.rank:
            return None  # a vector (or a matrix no larger than the rank): dense z
        m, n = p.shape
        period = mix(self.seed, index, self.steps_done // self.refresh)
        v = gaussian(period, n, self.rank, p.device, LOZO_TAG) / math.sqrt(self.rank)
        return low_rank_shape(n, lambda key: gaussian(key, m, self.rank, p.device, LOZO_TAG), lambda key: v.T)
