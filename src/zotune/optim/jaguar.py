"""ZO Sign-JAGUAR: coordinate-block finite differences into a gradient memory, sign-SGD on it."""

from __future__ import annotations

import math

import torch

from ..estimators.directions import DirectionSampler
from ..estimators.spsa import SPSA, GradientEstimate, direction_key
from .base import ZOOptimizer
from .scratch import scratch


class JaguarSignSGD(ZOOptimizer):
    """Each step draws a random block of coordinates (``coord_fraction`` of every parameter's
    entries, or ``block_size`` coordinates in all, seeded by the step), probes ``f`` at
    ``x +- tau`` on that block only (``tau`` is ``eps``), writes ``sign(f+ - f-) * tau`` into a
    persistent float32 gradient memory ``h`` at those coordinates, and steps
    ``x <- x - lr * sign(h)`` (``variant="sign"``) or ``x <- x - lr * h`` (``"plain"``).

    Coordinates never drawn have ``h = 0`` and do not move. The memory is part of
    ``state_dict``; the blocks are a function of (seed, step), so they replay exactly.
    """

    summary = "ZO Sign-JAGUAR: sign step with coordinate momentum on a random block (Veprikov et al. 2025)"

    normalised_step = True  # each coordinate moves by about lr
    # 9: its LoRA-FA sweep's pick, 1e-2 (docs/sweeps.md); 16: 1e-3, measured at the fewer-forwards grid's 675 steps,
    # where 1e-2 and 3e-3 walk off (docs/convergence.md); full: the family's 1e-4 until 17, then 3e-5, measured
    # the same way (1e-4 peaks early and walks off)
    default_lr = {(9, "lora-fa"): 1e-2, (16, "lora-fa"): 1e-3, (17, "full"): 3e-5}

    takes_noise_table = False  # its directions are coordinate masks, not values

    def __init__(
        self,
        params,
        lr: float,
        eps: float = 1e-3,
        seed: int = 0,
        coord_fraction: float | None = None,
        block_size: int | None = None,
        variant: str = "sign",
        n_queries: int = 1,
        distribution: str = "gaussian",
        weight_decay: float = 0.0,
    ):
        if distribution != "gaussian":
            raise ValueError("JaguarSignSGD perturbs blocks of coordinates by +-tau; it takes no distribution")
        if variant not in ("sign", "plain"):
            raise ValueError(f"variant must be 'sign' or 'plain', got {variant!r}")
        if coord_fraction is not None and block_size is not None:
            raise ValueError("give coord_fraction or block_size, not both")
        super().__init__(params, lr=lr, eps=eps, seed=seed, n_queries=n_queries, weight_decay=weight_decay,
                         defaults=dict(variant=variant))
        if block_size is not None:
            total = sum(p.numel() for _, p, _ in self.trainable())
            if not isinstance(block_size, int) or not 1 <= block_size <= total:
                raise ValueError(f"block_size must be an int in [1, {total}], got {block_size!r}")
            coord_fraction = block_size / total
        coord_fraction = 0.01 if coord_fraction is None else coord_fraction
        sampler = DirectionSampler("coordinates", fraction=coord_fraction)  # validates the fraction
        self.coord_fraction = coord_fraction
        self.estimator = SPSA(self.eps, n_queries, sampler=sampler)

    def update_param(
        self, p: torch.Tensor, index: int, estimate: GradientEstimate, group: dict, state: dict
    ) -> None:
        """JAGUAR: ``sign(g) * tau`` into the memory at the step's coordinates, then the step along the whole memory
        (its sign under ``variant="sign"``)."""
        memory = self.buffer(state, "memory", p).view(-1)
        for seed, g in estimate.terms(index):  # g / q: the sign is what counts
            value = math.copysign(self.eps, g) if g != 0 else 0.0  # sign(f+ - f-) * tau

            def write(start: int, stop: int, mask: torch.Tensor, value: float = value) -> None:
                memory[start:stop].masked_fill_(mask.bool(), value)

            self.estimator.sampler.apply(p.numel(), direction_key(seed, index), write, p.device)
        self.decay(p, group)
        flat, size = p.view(-1), self.estimator.sampler.chunk_size
        for start in range(0, flat.numel(), size):  # chunk by chunk: no parameter-sized sign()
            step = memory[start : start + size]
            if group["variant"] == "sign":
                step = torch.sign(step, out=scratch("jaguar-sign", step.numel(), step.dtype, step.device))
            flat[start : start + size].add_(step, alpha=-group["lr"])
