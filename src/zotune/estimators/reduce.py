"""Where a step's loss evaluations run, and how their values become the step's losses.

An estimator evaluates the closure ``n`` times per step (SPSA: ``f(x+eps z_j)``, ``f(x-eps z_j)``
for every query; ForwardGrad: ``(f, grad f . z_j)``; ZO-SGD-Cons: its three candidates). It asks
its :class:`LossReducer` which evaluations to run here (:meth:`LossReducer.mine`), writes 0.0
for the others, and hands all the values over in one :meth:`LossReducer.reduce` call, *before*
any parameter moves. One process is the identity; several processes (``zotune.distributed``)
combine them in one collective: the weighted mean of the shards' losses (data parallel) or the
sum of disjoint parts (query parallel). The estimate is then formed from the combined values,
identically on every process.
"""

from __future__ import annotations


class LossReducer:
    """The identity: this process runs every evaluation and its values are the step's."""

    def runs_here(self, n: int) -> list[bool]:
        """Which of ``n`` evaluations this process runs."""
        return [True] * n

    def reduce(self, values: list[float]) -> list[float]:
        """The step's values from this process's (0.0 where :meth:`mine` said no)."""
        return values


LOCAL = LossReducer()
