"""FZOO (Dang et al. 2025, "FZOO: fast zeroth-order optimizer for fine-tuning large language models
towards Adam-scale speed"): a batch of one-sided Rademacher probes, the step normalised by the
spread of their losses."""

from __future__ import annotations

import statistics

import torch

from ..estimators.spsa import SPSA, GradientEstimate
from .base import ZOOptimizer, require


class FZOO(ZOOptimizer):
    """``N = n_queries`` one-sided probes ``f_j = f(x + eps u_j)`` with Rademacher ``u_j`` (+-1), and
    ``f_0 = f(x)``: ``N + 1`` forwards. The step

        x <- x - lr * (1/N) sum_j (f_j - f_0) / sigma * u_j        (plus weight decay)

    with ``sigma`` the standard deviation of the ``f_j``: the losses' own spread sets the step size,
    so each coordinate moves by about ``lr / sqrt(N)`` whatever the loss's scale (FZOO's adaptive,
    Adam-like step). The record holds ``g_j = (f_j - f_0) / eps``; ``sigma = eps * std(g)``, so a
    replay needs nothing more. A step whose probes all give the same loss does not move. The step's length
    does not shrink as the loss flattens: past its fit it walks at random (docs/convergence.md measures a
    4,050-forward run losing 5 points after 2,250), so a long run wants ``train.lr_schedule`` annealing or
    ``train.early_stop_patience`` with ``train.keep_best``.

    Args:
        n_queries: ``N``, probes per step (at least 2: the step divides by their spread; 8 by default).
        distribution: ``"rademacher"`` (FZOO's) or ``"gaussian"``.
        (the others as :class:`~zotune.optim.ZOSGD`; block-wise ZO is not offered.)
    """

    summary = "FZOO: a batch of one-sided Rademacher probes, the step divided by their losses' std (ICLR 2026)"

    forwards_per_query = 1
    normalised_step = True
    default_n_queries = 8
    default_distribution = "rademacher"
    # its step moves each coordinate by about lr / sqrt(N): the family's lr (1e-4) barely moves it; 3e-3 is
    # its sweep's pick on full fine-tuning (docs/sweeps.md: dev 0.812 at 450 forward passes), since version 4;
    # on LoRA-FA (B's entries, A frozen) 1e-1 in versions 9-17 (dev 0.781 at 225 forward passes), 3e-2 since 18,
    # measured at the fewer-forwards grid's length, where 1e-1 peaks early and walks off (docs/convergence.md)
    default_lr = {(4, "full"): 3e-3, (9, "lora-fa"): 1e-1, (18, "lora-fa"): 3e-2}
    elementwise = True

    def __init__(self, params, lr: float, eps: float = 1e-3, seed: int = 0, n_queries: int = default_n_queries,
                 distribution: str = default_distribution, weight_decay: float = 0.0, **options):
        require(isinstance(n_queries, int) and n_queries >= 2,
               f"FZOO needs n_queries >= 2 (its step divides by the spread of the probes' losses), got {n_queries!r}")
        require(not options.get("blockwise"), "FZOO does not offer block-wise ZO")
        super().__init__(params, lr=lr, eps=eps, seed=seed, n_queries=n_queries, distribution=distribution,
                         weight_decay=weight_decay, **options)
        self.estimator = SPSA(self.eps, n_queries, distribution, sampler=self.estimator.sampler, one_sided=True)

    def update_param(self, p: torch.Tensor, index: int, estimate: GradientEstimate, group: dict, state: dict) -> None:
        """FZOO: the step divided by the probes' spread (the standard deviation of the projected gradients); no move
        when it is 0."""
        spread = statistics.stdev(estimate.projected_grads)  # sigma / eps
        if spread == 0:
            return
        self.decay(p, group)
        flat, scale = p.view(-1), -group["lr"] / spread

        def step(start: int, stop: int, weight: float, z: torch.Tensor) -> None:
            if weight:
                flat[start:stop].add_(z, alpha=scale * weight)

        estimate.per_direction(index, p.numel(), step, p.device)
