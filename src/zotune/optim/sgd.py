"""ZO-SGD: MeZO's update, x <- x - lr * (grad_hat + weight_decay * x)."""

from __future__ import annotations

import torch

from ..estimators.spsa import GradientEstimate
from .base import ZOOptimizer


class ZOSGD(ZOOptimizer):
    """MeZO / ZO-SGD (Malladi et al. 2023, Algorithm 1).

    ``grad_hat = (1/q) sum_j g_j z_j`` with ``g_j = (f(x+eps z_j) - f(x-eps z_j)) / (2 eps)``.
    The update streams z chunk by chunk into the parameter: no parameter-sized temporary.

    Args:
        params: parameters or param groups (``lr`` and ``weight_decay`` per group).
        lr: learning rate (MeZO full fine-tuning: 1e-6 / 1e-7).
        eps: perturbation scale (MeZO: 1e-3), shared by all groups.
        seed: names every random direction of the run.
        n_queries: directions per step (n-SPSA), averaged.
        distribution: ``"gaussian"`` or ``"rademacher"``.
        weight_decay: L2 penalty folded into the update, as in MeZO.
    """

    summary = "MeZO / ZO-SGD: SPSA along a seeded Gaussian z, x -= lr * g * z (Malladi et al. 2023)"

    # 19: its LoRA-FA lr, 1e-2 where the family's is 3e-2: at the fewer-forwards grid's 675 steps 3e-2 overfits
    # or walks off and 1e-2 holds on all three seeds (configs/bench/zosgd-lora-fa-lr.yaml, docs/convergence.md)
    default_lr = {(19, "lora-fa"): 1e-2}

    elementwise = True

    def update_param(
        self, p: torch.Tensor, index: int, estimate: GradientEstimate, group: dict, state: dict
    ) -> None:
        """ZO-SGD: weight decay, then ``-lr * g_j * z_j`` for every direction, z streamed chunk by chunk."""
        lr = group["lr"]
        self.decay(p, group)
        flat = p.view(-1)

        def step(start: int, stop: int, weight: float, z: torch.Tensor) -> None:
            if weight:
                flat[start:stop].add_(z, alpha=-lr * weight)

        estimate.per_direction(index, p.numel(), step, p.device)
