"""ZO-SGD-Cons (ZO-Bench): take the SPSA step only where it helps on the batch."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from ..estimators.perturb import Perturbation
from ..estimators.spsa import GradientEstimate, direction_key, loss_value
from .base import no_closure
from .sgd import ZOSGD


class ZOSGDConservative(ZOSGD):
    """Keep the best of ``{x, x - lr*grad_hat, x + lr*grad_hat}`` by the batch loss.

    After the SPSA probes it evaluates the closure at ``x`` and at both candidates (3 more
    forward passes per step; with several processes, a second loss exchange, as the candidates
    depend on the first) and moves to the candidate with the lowest loss, or stays. The
    candidates are evaluated as probes are (the weights come back bit for bit until the choice) and are
    bit-identical to the weights the chosen update writes, so a step never increases the batch
    loss. The step's record says which was taken (``accepted``: -1 descent, +1 ascent, 0 none).
    Weight decay is not offered: it would move ``x`` off the compared candidates.
    """

    summary = "ZO-SGD-Cons: keeps the best of x, x - lr g z, x + lr g z by the batch loss (ZO-Bench)"

    def __init__(self, params, lr: float, eps: float = 1e-3, seed: int = 0, weight_decay: float = 0.0, **options):
        if weight_decay:
            raise ValueError("ZOSGDConservative does not take weight_decay (its candidates are compared exactly)")
        super().__init__(params, lr=lr, eps=eps, seed=seed, **options)

    @property
    def forwards_per_step(self) -> int:
        """ZO-SGD-Cons: the probes plus 3 (``x`` and both candidates)."""
        return super().forwards_per_step + 3  # the probes, then x and both candidates

    def update(
        self, closure: Callable[[], Any], estimate: GradientEstimate, trainable: list[tuple[int, torch.Tensor, dict]]
    ) -> dict[str, Any]:
        """ZO-SGD-Cons: the losses at ``x`` and both candidates, then the candidate with the lowest finite loss if
        it beats ``x``; records ``accepted`` and the three losses."""
        candidates = {0: None, -1: estimate, 1: estimate.negated()}
        mine = self.loss_reducer.runs_here(len(candidates))
        values = [self._loss_at(closure, c, trainable) if m else 0.0 for c, m in zip(candidates.values(), mine)]
        losses = dict(zip(candidates, self.loss_reducer.reduce(values)))  # several processes: a 2nd exchange
        finite = {k: v for k, v in losses.items() if math.isfinite(v)}
        accepted = min(finite, key=lambda k: (finite[k], k != -1, k != 1)) if finite else 0
        if accepted == -1 and finite[-1] < losses[0]:
            super().update(closure, estimate, trainable)
        elif accepted == 1 and finite[1] < losses[0]:
            super().update(closure, estimate.negated(), trainable)
        else:
            accepted = 0
        return {"accepted": accepted, "candidate_losses": [losses[0], losses[-1], losses[1]]}

    def _loss_at(
        self, closure: Callable[[], Any], candidate: GradientEstimate | None, trainable: list[tuple[int, torch.Tensor, dict]]
    ) -> float:
        """The closure's loss at ``x`` (None) or at the weights ``candidate``'s update writes."""
        if candidate is None:
            return loss_value(closure())
        # the same terms, in the same order, as ZOSGD.update_param writes for `candidate`
        terms = [
            [(direction_key(seed, index), -group["lr"] * w) for seed, w in candidate.terms(index)]
            if group["lr"] != 0 else []
            for index, _, group in trainable
        ]
        with Perturbation([p for _, p, _ in trainable], terms, self.estimator.sampler):
            return loss_value(closure())

    def replay_update(
        self, estimate: GradientEstimate, trainable: list[tuple[int, torch.Tensor, dict]], extra: dict[str, Any]
    ) -> None:
        """Take the candidate the record says was accepted (-1 descent, +1 ascent, 0 none)."""
        accepted = int(extra["accepted"])
        if accepted:
            super().update(no_closure, estimate if accepted == -1 else estimate.negated(), trainable)
