"""ZO-SGD-Sign (ZO-Bench): step along the sign of the SPSA estimate."""

from __future__ import annotations

import torch

from ..estimators.spsa import GradientEstimate
from .base import ZOOptimizer


class ZOSGDSign(ZOOptimizer):
    """``x <- x - lr * sign(grad_hat)`` (plus weight decay).

    Every coordinate moves by exactly ``lr``, so ``lr`` is an absolute step size and is much
    smaller than for ZOSGD (ZO-Bench uses ~1e-7 for full fine-tuning of OPT).
    """

    summary = "ZO-SGD-Sign: x -= lr * sign(g * z) (ZO-Bench, Zhang et al. 2024)"

    normalised_step = True  # each coordinate moves by about lr
    # the sweeps' picks on the default model (docs/sweeps.md): full since version 6, LoRA-FA since 9
    default_lr = {(6, "full"): 1e-3, (9, "lora-fa"): 1e-2}

    elementwise = True

    def update_param(
        self, p: torch.Tensor, index: int, estimate: GradientEstimate, group: dict, state: dict
    ) -> None:
        """ZO-SGD-Sign: weight decay, then ``-lr * sign(grad_hat)``, chunk by chunk."""
        flat = p.view(-1)

        def chunk(start: int, stop: int, g: torch.Tensor) -> None:
            self.decay(flat[start:stop], group)
            flat[start:stop].add_(g.sign_(), alpha=-group["lr"])

        self.summed(estimate, index, p, state, chunk)
