"""ZO-Adam (MeZO appendix, ZO-Bench): Adam moments on the SPSA estimate."""

from __future__ import annotations

import math

import torch

from ..estimators.spsa import GradientEstimate
from .base import ZOOptimizer


class ZOAdam(ZOOptimizer):
    """Adam on ``grad_hat``: ``m, v`` (float32) with bias correction,
    ``x <- x - lr * m_hat / (sqrt(v_hat) + adam_eps)`` (plus weight decay, decoupled).

    Memory: weights + two float32 moments, nothing more: the estimate and Adam's denominator
    are formed chunk by chunk. ``eps`` stays the perturbation scale; Adam's own epsilon is
    ``adam_eps``.
    """

    summary = "ZO-Adam: Adam's moments on the SPSA estimate (ZO-Bench)"

    normalised_step = True  # each coordinate moves by about lr
    # Adam's step: larger than SGD's on full; 1e-3 since version 7, its sweep's pick past the first grid's edge
    # (docs/sweeps.md: dev 0.719, test 0.695, against 1e-4's 0.562 / 0.515); on LoRA-FA 1e-2 since version 9
    default_lr = {(1, "full"): 1e-5, (3, "full"): 1e-4, (7, "full"): 1e-3, (9, "lora-fa"): 1e-2}

    elementwise = True

    def __init__(
        self,
        params,
        lr: float,
        eps: float = 1e-3,
        seed: int = 0,
        betas: tuple[float, float] = (0.9, 0.999),
        adam_eps: float = 1e-8,
        **options,
    ):
        b1, b2 = betas
        if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
            raise ValueError(f"betas must be in [0, 1), got {betas!r}")
        if adam_eps <= 0:
            raise ValueError(f"adam_eps must be > 0, got {adam_eps!r}")
        super().__init__(params, lr=lr, eps=eps, seed=seed, defaults=dict(betas=(b1, b2), adam_eps=adam_eps), **options)

    def update_param(
        self, p: torch.Tensor, index: int, estimate: GradientEstimate, group: dict, state: dict
    ) -> None:
        """ZO-Adam: the moments from ``grad_hat`` and the bias-corrected Adam step, chunk by chunk."""
        b1, b2 = group["betas"]
        m, v = self.buffer(state, "exp_avg", p).view(-1), self.buffer(state, "exp_avg_sq", p).view(-1)
        state["step"] = state.get("step", 0) + 1
        step_size = group["lr"] / (1 - b1 ** state["step"])
        bias2 = math.sqrt(1 - b2 ** state["step"])
        flat = p.view(-1)

        def chunk(start: int, stop: int, g: torch.Tensor) -> None:
            mc, vc, pc = m[start:stop], v[start:stop], flat[start:stop]
            mc.mul_(b1).add_(g, alpha=1 - b1)
            vc.mul_(b2).addcmul_(g, g, value=1 - b2)
            denom = vc.sqrt().div_(bias2).add_(group["adam_eps"])
            self.decay(pc, group)
            pc.addcdiv_(mc, denom, value=-step_size)

        self.summed(estimate, index, p, state, chunk)
