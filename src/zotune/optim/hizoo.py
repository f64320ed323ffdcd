"""HiZOO (Zhao et al. 2025, "Second-order fine-tuning without pain for LLMs: a Hessian informed
zeroth-order optimizer"): ZO-SGD preconditioned by a diagonal Hessian estimated from one more
forward per step."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..estimators.spsa import SPSA, GradientEstimate, direction_key
from ..models.offload import state_like
from .base import ZOOptimizer, release_all, require


class HiZOO(ZOOptimizer):
    """Probes along ``s = D^{-1/2} z``, ``D`` a running estimate of the Hessian's diagonal (1 at the
    start: the first step is ZO-SGD's), plus ``f(x)``: ``2q + 1`` forwards. With
    ``g_j = (f(x + eps s_j) - f(x - eps s_j)) / (2 eps)`` and the curvature
    ``delta_j = f(x + eps s_j) + f(x - eps s_j) - 2 f(x)``:

        x <- x - lr * (1/q) sum_j g_j s_j                          (plus weight decay)
        D <- (1 - alpha) D + alpha * (1/q) sum_j delta_j (z_j^2 - 1) D / (2 eps^2),  then D >= hessian_floor

    The second line is an unbiased estimate of the diagonal of the Hessian: on a quadratic,
    ``E[delta (z_i^2 - 1)] = 2 eps^2 H_ii / D_i``. (HiZOO's paper writes the same update with
    ``|delta|`` and ``z_i^2``, which keeps ``D`` positive but adds the trace of the Hessian to every
    entry; here the floor keeps ``D`` positive.) ``D`` is one float32 copy of the trainable
    weights; the step records ``delta_j`` beside ``g_j``, so a replay rebuilds ``D`` exactly.

    Args:
        alpha: the rate of the running Hessian estimate (HiZOO: small, e.g. 1e-6 for an LLM). 1e-5 is the
            sweep's pick on the default model (docs/sweeps.md: at 1e-3 every lr diverges); runs recorded
            before config version 5 keep 1e-3.
        hessian_floor: the smallest ``D`` (so the perturbation ``D^{-1/2} z`` stays bounded).
        (the others as :class:`~zotune.optim.ZOSGD`; block-wise ZO is not offered.)
    """

    summary = "HiZOO: probes preconditioned by a diagonal Hessian estimate, one more forward (ICLR 2025)"

    forwards_per_query = 2
    default_options = {(1, "*"): {"alpha": 1e-3}, (5, "*"): {"alpha": 1e-5}}
    # 21: LoRA-FA 1e-2, measured at the fewer-forwards grid's 450 steps on three seeds, where the family's 3e-2 (its
    # 100-step sweep's pick too) walks off on seed 2 (configs/bench/hizoo-lora-fa-lr.yaml); 23: full 3e-5, measured the
    # same way, where the family's 1e-4 diverges on seed 1 at step 358 as the Hessian estimate spreads
    # (configs/bench/hizoo-full-lr.yaml)
    default_lr = {(21, "lora-fa"): 1e-2, (23, "full"): 3e-5}

    def __init__(self, params, lr: float, eps: float = 1e-3, seed: int = 0, n_queries: int = 1,
                 distribution: str = "gaussian", weight_decay: float = 0.0, alpha: float = 1e-5,
                 hessian_floor: float = 1e-2, **options):
        require(isinstance(alpha, (int, float)) and 0 <= alpha <= 1, f"alpha must be in [0, 1], got {alpha!r}")
        require(isinstance(hessian_floor, (int, float)) and hessian_floor > 0,
               f"hessian_floor must be > 0, got {hessian_floor!r}")
        require(not options.get("blockwise"), "HiZOO does not offer block-wise ZO")
        super().__init__(params, lr=lr, eps=eps, seed=seed, n_queries=n_queries, distribution=distribution,
                         weight_decay=weight_decay, **options)
        self.alpha, self.hessian_floor = float(alpha), float(hessian_floor)
        self.estimator = SPSA(self.eps, n_queries, distribution, sampler=self.estimator.sampler, center=True)

    @property
    def extra_values_per_step(self) -> int:
        """HiZOO: the q curvatures ``delta_j``."""
        return self.n_queries

    def hessian(self, p: torch.Tensor) -> torch.Tensor:
        """The running estimate ``D`` of ``p``'s Hessian diagonal (float32, flat; ones until the first step)."""
        state = self.state[p]
        if "hessian" not in state:
            state["hessian"] = state_like(p, 1.0, shape=(p.numel(),))  # offloaded with p (models.offload)
        return state["hessian"]

    def direction_shape(self, index: int, p: torch.Tensor, state: dict) -> Callable[..., torch.Tensor]:
        """HiZOO: ``z D^{-1/2}``, with the ``D`` the step starts from."""
        d = self.hessian(p)

        def preconditioned(key: int, start: int, stop: int, device: torch.device, draw: Callable[[], torch.Tensor],
                           out: torch.Tensor) -> torch.Tensor:
            return torch.mul(draw(), d[start:stop].rsqrt(), out=out)

        return preconditioned

    def update(self, closure: Callable[[], Any], estimate: GradientEstimate, trainable: list) -> dict[str, Any]:
        """HiZOO: the step and the Hessian update; the curvatures go into the record (``values``)."""
        curvatures = [plus + minus - 2 * estimate.center for plus, minus in estimate.losses]
        self._move(estimate, trainable, curvatures)
        return {"values": curvatures}

    def replay_update(self, estimate: GradientEstimate, trainable: list, extra: dict[str, Any]) -> None:
        """HiZOO: the same move, from the recorded curvatures."""
        self._move(estimate, trainable, list(extra["values"]))

    def _move(self, estimate: GradientEstimate, trainable: list, curvatures: list[float]) -> None:
        """The step and the Hessian update, chunk by chunk, every direction read once per chunk."""
        sampler, coefficient = self.estimator.sampler, self.alpha / (2 * self.eps**2 * len(curvatures))
        for index, p, group in trainable:
            if group["lr"] == 0:
                continue
            self.decay(p, group)
            flat, d = p.view(-1), self.hessian(p)
            terms = [(direction_key(seed, index), w, delta) for (seed, w), delta in zip(estimate.terms(index), curvatures)]
            for chunk, start in enumerate(range(0, flat.numel(), sampler.chunk_size)):
                stop = min(start + sampler.chunk_size, flat.numel())
                scale, estimate_h = d[start:stop].rsqrt(), torch.zeros(stop - start, device=p.device)
                for key, w, delta in terms:
                    z = sampler.plain(key, chunk, stop - start, p.device)
                    flat[start:stop].add_(torch.mul(z, scale), alpha=-group["lr"] * w)  # s = z D^-1/2, as probed
                    estimate_h.add_(z.square() - 1, alpha=delta)
                estimate_h.mul_(d[start:stop]).mul_(coefficient)  # alpha x the estimate, from the D probed with
                d[start:stop].mul_(1 - self.alpha).add_(estimate_h).clamp_(min=self.hessian_floor)
            release_all(p, self.state[p])
