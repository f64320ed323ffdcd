"""Two readings of a run's dev curve at its length: where it ends up (the late score) and how far it fell
from its best. On issue 24's lr grids (docs/sweeps.md, "Do the picks hold in a longer run?") the late score
picked the better-testing lr where the best dev score did not, and every run whose lr was too long (it walked
off or diverged) fell 0.145-0.199 while every run that held fell 0.012-0.056. A fall over 0.1 also marks runs
that only end below an early peak: on the fewer-forwards grid, the lowest-testing seed of four rows."""

from __future__ import annotations

from collections.abc import Sequence

FELL_FAR = 0.1  # a dev fall (best to late score) over this: every run here whose lr was too long fell further


def late_score(scores: Sequence[float]) -> float | None:
    """The mean of the last half of the dev scores, in step order (None without any): where the run ends up,
    less noisy than one evaluation and blind to an early peak."""
    late = list(scores)[len(scores) // 2:]
    return sum(late) / len(late) if late else None


def dev_fall(scores: Sequence[float]) -> float | None:
    """How far the dev score fell from its best to :func:`late_score` (None without scores)."""
    late = late_score(scores)
    return None if late is None else max(scores) - late


def fell_far(scores: Sequence[float]) -> bool:
    """Whether the dev score fell more than :data:`FELL_FAR` from its best to its late score."""
    fall = dev_fall(scores)
    return fall is not None and fall > FELL_FAR
