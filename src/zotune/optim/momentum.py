"""ZO-SGD-MMT (ZO-Bench): heavy-ball momentum on the SPSA estimate."""

from __future__ import annotations

from typing import Any

import torch

from ..estimators.spsa import GradientEstimate
from .base import ZOOptimizer


class ZOSGDMomentum(ZOOptimizer):
    """``m <- momentum * m + grad_hat;  x <- x - lr * m`` (plus weight decay).

    The momentum buffer is float32 whatever the parameter's dtype (ZO estimates are small and
    noisy; a half-precision buffer would round them away): one extra float32 copy of the
    trainable parameters.
    """

    summary = "ZO-SGD with heavy-ball momentum on the SPSA estimate (ZO-Bench)"

    elementwise = True
    # the sweeps' picks (docs/sweeps.md): on full the family's 1e-4 diverges through momentum; on LoRA-FA 3e-3
    default_lr = {(6, "full"): 3e-6, (12, "lora-fa"): 3e-3}

    def __init__(
        self, params, lr: float, eps: float = 1e-3, seed: int = 0, momentum: float = 0.9,
        *, defaults: dict[str, Any] | None = None, **options,
    ):
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
        super().__init__(params, lr=lr, eps=eps, seed=seed, defaults=dict(momentum=momentum, **(defaults or {})), **options)

    def accumulate(self, p: torch.Tensor, index: int, estimate: GradientEstimate, group: dict, state: dict) -> torch.Tensor:
        """``m <- momentum * m + grad_hat`` for one parameter; returns m (float32)."""
        m = self.buffer(state, "momentum_buffer", p)
        flat = m.view(-1)
        self.summed(estimate, index, p, state, lambda s, e, g: flat[s:e].mul_(group["momentum"]).add_(g))
        return m

    def update_param(
        self, p: torch.Tensor, index: int, estimate: GradientEstimate, group: dict, state: dict
    ) -> None:
        """Heavy ball: ``m`` accumulated, then ``x <- x - lr * m``."""
        m = self.accumulate(p, index, estimate, group, state)
        self.decay(p, group)
        p.add_(m, alpha=-group["lr"])
