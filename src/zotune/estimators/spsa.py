"""SPSA (simultaneous perturbation) gradient estimate, as in MeZO (Malladi et al. 2023, Alg. 1).

For each of ``n_queries`` directions z_j (seeded, regenerated, never stored)::

    g_j = (f(x + eps*z_j) - f(x - eps*z_j)) / (2*eps)      # the projected gradient
    grad_hat = (1/q) * sum_j g_j * z_j

The estimate is kept implicit, as the scalars g_j and the seeds that name z_j: a whole
fine-tune is thus described by a few numbers per step (MeZO's trajectory storage). Update
rules read it back chunk by chunk (:meth:`GradientEstimate.apply`) or as a full tensor per
parameter (:meth:`GradientEstimate.materialize`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .directions import DirectionSampler, mix
from .lockstep import Lockstep
from .perturb import BufferPool, Perturbation
from .reduce import LOCAL, LossReducer


def loss_value(loss: object) -> float:
    """A closure's return value as a Python float."""
    if isinstance(loss, torch.Tensor):
        if loss.numel() != 1:
            raise ValueError(f"the closure must return a scalar loss, got shape {tuple(loss.shape)}")
        return float(loss.detach().float().item())
    return float(loss)  # type: ignore[arg-type]


def query_seeds(step_seed: int, n_queries: int) -> list[int]:
    """Seeds of a step's directions z_1..z_q."""
    return [mix(step_seed, j) for j in range(n_queries)]


def direction_key(query_seed: int, param_index: int) -> int:
    """Key of z for one parameter (by its index among the optimizer's parameters)."""
    return mix(query_seed, param_index)


@dataclass
class GradientEstimate:
    """An implicit gradient estimate, ``sum_j weights[j] * z(seeds[j])``: what SPSA returns, and
    ForwardGrad too (its ``losses`` are then ``(f, jvp)`` pairs). An update rule reads it direction
    by direction (:meth:`per_direction`) or summed, chunk by chunk (:meth:`summed`)."""

    seeds: list[int]
    projected_grads: list[float]
    loss: float
    losses: list[tuple[float, float]] = field(default_factory=list)  # per query: (f+, f-), (f+, f0) one-sided, or (f, jvp)
    sampler: DirectionSampler | None = None
    coverage: list[frozenset[int]] | None = None  # block-wise: the parameter indices each query perturbed
    center: float | None = None  # f(x) unperturbed, when the estimator measured it

    @property
    def finite(self) -> bool:
        """Whether every probe's loss (and ``f(x)``, when measured) is finite."""
        center = self.center if self.center is not None else 0.0
        return math.isfinite(center) and all(math.isfinite(a) and math.isfinite(b) for a, b in self.losses)

    def negated(self) -> GradientEstimate:
        """The estimate of the opposite direction (-grad_hat)."""
        return dataclasses.replace(self, projected_grads=[-g for g in self.projected_grads])

    def terms(self, param_index: int) -> list[tuple[int, float]]:
        """``(seed, weight)`` of every direction in one parameter's grad_hat: ``g_j / q`` over
        the q queries that perturbed it (all of them, unless block-wise)."""
        pairs = [
            (seed, g)
            for j, (seed, g) in enumerate(zip(self.seeds, self.projected_grads))
            if self.coverage is None or param_index in self.coverage[j]
        ]
        return [(seed, g / len(pairs)) for seed, g in pairs]

    def per_direction(
        self,
        param_index: int,
        numel: int,
        fn: Callable[[int, int, float, torch.Tensor], None],
        device: torch.device = torch.device("cpu"),
    ) -> None:
        """Call ``fn(start, stop, weight, z_chunk)`` for every direction and chunk of one
        parameter; chunks of one direction may run concurrently (each touches its own slice),
        directions run one after the other."""
        assert self.sampler is not None
        for seed, w in self.terms(param_index):
            self.sampler.apply(numel, direction_key(seed, param_index), lambda s, e, z, w=w: fn(s, e, w, z), device)

    def summed(
        self,
        param_index: int,
        numel: int,
        fn: Callable[[int, int, torch.Tensor], None],
        device: torch.device = torch.device("cpu"),
    ) -> None:
        """Call ``fn(start, stop, grad_chunk)`` with grad_hat of one parameter, chunk by chunk
        (float32, summed over its directions; chunks may run concurrently): an update rule
        that needs the whole estimate at each coordinate, with chunk-sized memory."""
        assert self.sampler is not None
        terms = [(direction_key(seed, param_index), w) for seed, w in self.terms(param_index)]
        self.sampler.apply_sum(numel, terms, fn, device)

    def materialize(self, param_index: int, out: torch.Tensor) -> torch.Tensor:
        """Write grad_hat for one parameter into ``out`` (float32, flat or shaped)."""
        flat = out.view(-1)
        self.summed(param_index, flat.numel(), lambda s, e, g: flat[s:e].copy_(g), out.device)
        return out


def block_coverage(blocks: list[list[int]], indices: list[int], n_queries: int) -> list[frozenset[int]] | None:
    """Block-wise ZO: the parameter indices each query perturbs (``n_queries`` per block, block
    after block); None when there is a single block (every query perturbs everything)."""
    if len(blocks) == 1:
        return None
    return [frozenset(indices[pos] for pos in b) for b in blocks for _ in range(n_queries)]


class SPSA:
    """SPSA with ``n_queries`` directions, perturbing on the fly or in place (see perturb.py).

    Two-sided by default, ``g_j = (f(x + eps z_j) - f(x - eps z_j)) / (2 eps)``. ``one_sided``:
    ``g_j = (f(x + eps z_j) - f(x)) / eps`` (FZOO), ``q + 1`` forwards. ``center`` (two-sided): also
    ``f(x)`` itself, one more forward (HiZOO's curvature). The step's loss is ``f(x)`` when measured."""

    def __init__(self, eps: float, n_queries: int = 1, distribution: str = "gaussian", sampler: DirectionSampler | None = None,
                 one_sided: bool = False, center: bool = False):
        self.eps = eps
        self.n_queries = n_queries
        self.one_sided = one_sided
        self.center = center or one_sided
        self.sampler = sampler if sampler is not None else DirectionSampler(distribution)
        self._pool = BufferPool()
        self._reuse: frozenset[int] = frozenset()  # params read by several ops (tied weights)
        self._order: tuple[int, ...] = ()  # params in the order the last probe first used them
        self.materializations = 0
        self.lockstep: Lockstep | None = None  # the dual forward: a query's two probes in one pass (lockstep.py)

    def estimate(
        self,
        closure: Callable[[], object],
        params: list[torch.Tensor],
        indices: list[int],
        step_seed: int,
        blocks: list[list[int]] | None = None,
        reducer: LossReducer = LOCAL,
    ) -> GradientEstimate:
        """Probe the closure at x +- eps*z_j for every query. The weights come back bit for bit
        (never written, or, for a small set, written and restored from saved bits: see perturb.py).

        ``blocks`` (block-wise ZO, ZO-Bench): lists of positions in ``params``; each block gets
        its own ``n_queries`` queries, which perturb that block only. ``reducer``: which probes
        run here and how the 2q losses combine (see reduce.py), in one call after all probes."""
        blocks = blocks if blocks is not None else [list(range(len(params)))]
        seeds = query_seeds(step_seed, self.n_queries * len(blocks))
        block_of_query = [b for b in blocks for _ in range(self.n_queries)]
        scales = (self.eps,) if self.one_sided else (self.eps, -self.eps)
        mine = iter(reducer.runs_here(len(scales) * len(seeds) + self.center))
        values: list[float] = []
        if self.center:  # f(x): the closure on the weights as they are
            values.append(loss_value(closure()) if next(mine) else 0.0)
        for seed, block in zip(seeds, block_of_query):
            chosen = set(block)
            keys = [direction_key(seed, i) for i in indices]
            here = [next(mine) for _ in scales]
            if self.lockstep is not None and len(scales) == 2 and all(here) and not Perturbation.writes_in_place(
                    [p for pos, p in enumerate(params) if pos in chosen]):
                values += self._dual_probe(closure, params, keys, chosen)
                continue
            for scale, run in zip(scales, here):
                values.append(self._probe(closure, params, keys, chosen, scale) if run else 0.0)
        values = reducer.reduce(values)
        center = values.pop(0) if self.center else None
        if self.one_sided:
            losses = [(plus, center) for plus in values]
            grads = [(plus - center) / self.eps for plus in values]
        else:
            losses = list(zip(values[0::2], values[1::2]))
            grads = [(plus - minus) / (2 * self.eps) for plus, minus in losses]
        loss = center if center is not None else sum(a + b for a, b in losses) / (2 * len(losses))
        return GradientEstimate(seeds, grads, loss, losses, self.sampler, block_coverage(blocks, indices, self.n_queries), center)

    def _perturbation(self, params: list[torch.Tensor], keys: list[int], chosen: set[int], scale: float) -> Perturbation:
        """x + scale*z on the parameters at positions ``chosen``."""
        terms = [[(k, scale)] if pos in chosen else [] for pos, k in enumerate(keys)]
        return Perturbation(params, terms, self.sampler, self._pool, self._reuse, self._order)

    def _probe(
        self, closure: Callable[[], object], params: list[torch.Tensor], keys: list[int], chosen: set[int], scale: float
    ) -> float:
        """The closure's loss at x + scale*z on the parameters at positions ``chosen``."""
        with self._perturbation(params, keys, chosen, scale) as pert:
            loss = loss_value(closure())
        self._learn(pert)
        return loss

    def _dual_probe(
        self, closure: Callable[[], object], params: list[torch.Tensor], keys: list[int], chosen: set[int]
    ) -> list[float]:
        """``[f(x + eps z), f(x - eps z)]`` in one pass, layer by layer (the dual forward), under the
        perturbation mode as each probe would run alone. A set small enough to be written in place is probed
        one probe after the other instead: in place, one probe would see the other's perturbation, and under
        the mode its kernels would see the weights at other addresses (the last bits may differ)."""
        assert self.lockstep is not None
        perturbations = [self._perturbation(params, keys, chosen, scale) for scale in (self.eps, -self.eps)]

        def probe(pert: Perturbation) -> float:
            with pert:
                return loss_value(closure())

        self.sampler.reuse_keys = frozenset(keys[pos] for pos in chosen)  # not a pending update's (fused.py)
        try:
            plus, minus = self.lockstep.run(lambda: probe(perturbations[0]), lambda: probe(perturbations[1]))
        finally:
            self.sampler.end_reuse_once()
        self._learn(perturbations[0])
        self.materializations += perturbations[1].materializations
        return [plus, minus]

    def _learn(self, pert: Perturbation) -> None:
        """Count a finished probe's materialisations and keep what it saw of the closure (the parameters
        read by several ops, the order of first use) for the next probe."""
        self.materializations += pert.materializations
        if pert.in_place:  # no ops were seen: keep what the last probe under the mode learned
            return
        self._reuse = frozenset(pid for pid, n in pert.uses.items() if n > 1)
        self._order = tuple(pert.first_use)


# The earlier names, kept for update rules written against them: ``SPSAEstimate`` (the class, which
# ForwardGrad returns too), ``apply`` (per direction) and ``stream`` (summed).
SPSAEstimate = GradientEstimate
GradientEstimate.apply = GradientEstimate.per_direction
GradientEstimate.stream = GradientEstimate.summed
