"""Forward gradient (Baydin et al. 2022; ZO-Bench's Forward-Grad): ``(grad f . z) z``.

The directional derivative ``grad f . z`` is computed exactly by forward-mode AD, one forward
pass carrying dual tensors (about 2-3x the cost of a plain forward), through the user's
unchanged closure: no backward pass and no stored activations. The weights are never
written. Like SPSA, the estimate is kept as its seeds and scalars.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.autograd.forward_ad as fwAD

from .directions import DirectionSampler
from .perturb import Tangents
from .reduce import LOCAL, LossReducer
from .spsa import GradientEstimate, direction_key, loss_value, query_seeds


class ForwardGradient:
    """``n_queries`` directions, each one JVP of the closure."""

    def __init__(self, n_queries: int = 1, distribution: str = "gaussian"):
        self.n_queries = n_queries
        self.sampler = DirectionSampler(distribution)
        self.materializations = 0

    def estimate(
        self, closure: Callable[[], object], params: list[torch.Tensor], indices: list[int], step_seed: int,
        reducer: LossReducer = LOCAL,
    ) -> GradientEstimate:
        """One JVP per query; ``reducer`` (see reduce.py) combines the q pairs ``(f, jvp)`` (both
        linear in the batch loss) in one call after all queries."""
        seeds = query_seeds(step_seed, self.n_queries)
        values: list[float] = []
        for seed, mine in zip(seeds, reducer.runs_here(len(seeds))):
            values.extend(self._jvp(closure, params, indices, seed) if mine else (0.0, 0.0))
        values = reducer.reduce(values)
        pairs = list(zip(values[0::2], values[1::2]))
        return GradientEstimate(seeds, [jvp for _, jvp in pairs], sum(f for f, _ in pairs) / len(pairs), pairs, self.sampler)

    def _jvp(
        self, closure: Callable[[], object], params: list[torch.Tensor], indices: list[int], seed: int
    ) -> tuple[float, float]:
        """``(f, grad f . z)`` along the direction named by ``seed``."""
        keys = [direction_key(seed, i) for i in indices]
        with fwAD.dual_level(), Tangents.along(params, keys, 1.0, self.sampler) as tangents:
            try:
                primal, tangent = fwAD.unpack_dual(closure())
            except NotImplementedError as err:
                raise NotImplementedError(
                    "an op of this model has no forward-mode AD rule (e.g. CPU flash attention); for "
                    "Hugging Face models call model.set_attn_implementation('eager') first. "
                    f"torch said: {str(err).splitlines()[0]}"
                ) from None
            f = loss_value(primal)
            jvp = loss_value(tangent) if tangent is not None else 0.0  # None: f ignores the params
        self.materializations += tangents.materializations
        return f, jvp
