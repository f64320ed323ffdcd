"""Learning-rate schedules: a factor of the configured lr for each step, from the step alone.

A schedule holds no state: the factor is a pure function of (step, total steps, warm-up), so a
resumed run sets the same lr as an uninterrupted one, and every ZO step's record carries the lr
it used (replay needs nothing else). Shapes as in transformers' ``get_*_schedule_with_warmup``:

* ``constant``: 1 after the warm-up;
* ``linear``: from 1 down to 0 at the last step;
* ``cosine``: half a cosine from 1 down to 0 at the last step.

During ``warmup_steps`` the factor rises linearly from ``1 / (warmup + 1)`` to 1.
"""

from __future__ import annotations

import math

import torch

from ..config import SCHEDULES


def lr_factor(schedule: str, step: int, total: int, warmup: int = 0) -> float:
    """The factor for 0-based ``step`` of ``total`` steps."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown lr schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


class Schedule:
    """Sets each param group's lr to its base lr (the lr when the schedule was made) times
    :func:`lr_factor`, before a step. Groups are found by position at every step, as
    ``load_state_dict`` replaces the group dicts on a resume."""

    def __init__(self, optimizers: list[torch.optim.Optimizer], schedule: str, total: int, warmup: int = 0):
        lr_factor(schedule, 0, total, warmup)  # validates the name
        self.schedule, self.total, self.warmup = schedule, total, warmup
        self.base = [(opt, [group["lr"] for group in opt.param_groups]) for opt in optimizers]

    def set(self, step: int) -> None:
        """Set every param group's lr to its base lr times the factor for 0-based ``step``."""
        factor = lr_factor(self.schedule, step, self.total, self.warmup)
        for opt, lrs in self.base:
            for group, lr in zip(opt.param_groups, lrs):
                group["lr"] = lr * factor
