"""ZO-Muon: Muon's orthogonalised step on the SPSA estimate, over the full matrix or, as in ZO-Muon's
paper, within a random subspace."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ..estimators.spsa import SPSA, GradientEstimate, direction_key
from ..estimators.directions import mix
from .base import require
from .low_rank import gaussian, low_rank_shape, orthonormal_basis
from .momentum import ZOSGDMomentum
from .newton_schulz import NS_FORMS, newton_schulz

COEFFICIENTS_TAG = 0x4D554F4E  # names ZO-Muon's r x n factors among a key's draws
UPDATE_CHUNK = 1 << 20  # values of W written at once by a subspace step (rows of P @ O)


class ZOMuon(ZOSGDMomentum):
    """ZO-Muon as Veprikov et al. 2025 define it ("Leveraging coordinate momentum in SignSGD and Muon:
    memory-optimized zero-order"; DESIGN.md), with the subspace of Lang et al. 2026 as an option.

    **Full rank** (``rank=None``, the default):
    ``M <- momentum * M + grad_hat``; for a matrix ``W <- W - lr * scale * NS(M)`` with
    ``scale = sqrt(max(1, rows / cols))`` and ``NS`` five Newton-Schulz iterations; parameters
    of other shapes (norms, biases) take the momentum step ``W <- W - lr * M``, and so do the
    matrices of a param group with ``orthogonalize: False``: as in Muon, the token embeddings
    and the LM head are not hidden layers (``param_groups_for`` puts them in such a group;
    orthogonalising a 49152 x 576 embedding would also cost more than the two forwards).
    The SPSA estimate ``g * z`` is a random matrix scaled by ``g``; orthogonalised, every
    singular value of the step is about ``lr * scale`` whatever the size of ``g``: the step
    length is fixed, as in a sign method. ``M`` is float32. That step length suits no plain
    momentum step, so those parameters take ``plain_lr`` when given (as Muon pairs itself with
    AdamW at its own lr); otherwise ``lr``.
    ``ns_form``: how ``NS`` is computed (:func:`newton_schulz`): ``iterative`` (Muon's matmuls), ``spectral``
    (the same map through one ``eigh``, 2-3x faster on a CPU) or ``auto`` (spectral on a CPU, iterative
    elsewhere; full fine-tuning's default since config version 24).

    **Subspace** (``rank=r``; :class:`ZOMuonSubspace` has its paper's settings): a matrix ``W`` (m x n,
    both sides larger than ``r``) is perturbed along ``P U_j`` with ``P`` (m x r) a random
    orthonormal basis drawn anew every ``refresh`` steps and ``U_j`` (r x n) Gaussian, one per
    query. The estimate stays in the subspace and is orthogonalised there (an r x n
    Newton-Schulz, cheap at any size, so embeddings are treated like every other matrix):

        G = (1/q) sum_j g_j U_j;   M <- momentum * M + G  (M reset when P is);   W <- W - lr * P NS(M)

    ``one_sided``: ``g_j = (f(x + eps z_j) - f(x)) / eps``, ``q + 1`` forwards. Other parameters
    (vectors, smaller matrices) take the full-rank rule with dense ``z``. ``P`` comes from (seed,
    parameter, period) and ``U_j`` from the direction's key: a replay rebuilds both.
    """

    summary = "ZO-Muon: Newton-Schulz on the momentum of the full SPSA estimate (Veprikov et al. 2025)"
    normalised_step = True  # each coordinate moves by about lr
    # 14: its LoRA-FA sweep's pick, 1e-2; 15: its full sweep's, 3e-3 with the embeddings and norms at plain_lr 5e-6
    # (x 20 through momentum 0.95: ZO-SGD's 1e-4), as in that sweep (docs/sweeps.md); the family's 1e-4 before
    # 16: LoRA-FA 3e-3, measured at the fewer-forwards grid's 675 steps (1e-2 walks off there; docs/convergence.md)
    default_lr: dict[tuple[int, str], float] = {(14, "lora-fa"): 1e-2, (15, "full"): 3e-3, (16, "lora-fa"): 3e-3}
    # 24: on full fine-tuning, Newton-Schulz in its spectral form on a CPU (the same map, 2-3x faster there: the
    # iteration cost 1.6 ZO-SGD steps on the default model; newton_schulz)
    default_options: dict[tuple[int, str], dict] = {(15, "full"): {"plain_lr": 5e-6},
                                                    (24, "full"): {"plain_lr": 5e-6, "ns_form": "auto"}}

    elementwise = False  # Newton-Schulz: matrix maths on torch's own threads

    def __init__(
        self, params, lr: float, eps: float = 1e-3, seed: int = 0, momentum: float = 0.95, ns_steps: int = 5,
        plain_lr: float | None = None, rank: int | None = None, refresh: int = 100, one_sided: bool = False,
        ns_form: str = "iterative", **options,
    ):
        require(isinstance(ns_steps, int) and ns_steps >= 1, f"ns_steps must be an int >= 1, got {ns_steps!r}")
        require(ns_form in NS_FORMS, f"ns_form must be one of {', '.join(NS_FORMS)}, got {ns_form!r}")
        require(plain_lr is None or (isinstance(plain_lr, (int, float)) and plain_lr >= 0),
                f"plain_lr must be a number >= 0, got {plain_lr!r}")
        require(rank is None or (isinstance(rank, int) and rank >= 1),
                f"rank must be an int >= 1 or None, got {rank!r}")
        require(isinstance(refresh, int) and refresh >= 1, f"refresh must be an int >= 1, got {refresh!r}")
        require(not (one_sided and options.get("blockwise")), "one-sided ZO-Muon does not offer block-wise ZO")
        super().__init__(params, lr=lr, eps=eps, seed=seed, momentum=momentum,
                         defaults=dict(ns_steps=ns_steps, ns_form=ns_form, orthogonalize=True, plain_lr=plain_lr), **options)
        self.rank, self.refresh = rank, refresh
        if one_sided:  # q probes f(x + eps z_j) and f(x): q + 1 forwards
            self.estimator = SPSA(self.eps, self.n_queries, sampler=self.estimator.sampler, one_sided=True)
            self.forwards_per_query = 1
        self._bases: dict[int, torch.Tensor] = {}  # this step's P of each subspace matrix, by parameter index

    @classmethod
    def param_groups_for(cls, model: torch.nn.Module, params: list) -> list:
        """``params`` (tensors or param groups) with the model's input and output embeddings
        moved into groups of their own with ``orthogonalize: False``."""
        embeddings = {id(m.weight) for m in (model.get_input_embeddings(), model.get_output_embeddings())
                      if m is not None and getattr(m, "weight", None) is not None}
        groups = params if params and isinstance(params[0], dict) else [{"params": list(params)}]
        out = []
        for group in groups:
            hidden = [p for p in group["params"] if id(p) not in embeddings]
            embedding = [p for p in group["params"] if id(p) in embeddings]
            out += [{**group, "params": hidden}] if hidden else []
            out += [{**group, "params": embedding, "orthogonalize": False}] if embedding else []
        return out

    @classmethod
    def coordinate_sizes(cls, shape: torch.Size, options: dict) -> tuple[float, float]:
        """A matrix's entries move far less than lr: an orthogonalised step (singular values 1) of m x n has entries
        of about ``1 / sqrt(max(m, n))`` (times ``scale``); in the subspace, ``sqrt(r / (m n))``, and the probe
        ``P U`` has entries of about ``sqrt(r / m)``. Vectors: (1, 1)."""
        rank = options.get("rank")
        if len(shape) != 2:
            return 1.0, 1.0
        m, n = shape
        if rank is not None and min(m, n) > rank:
            return math.sqrt(rank / m), math.sqrt(rank / (m * n))
        return 1.0, math.sqrt(max(1.0, m / n)) / math.sqrt(max(m, n))

    @property
    def takes_fused_update(self) -> bool:
        """Full rank only: a subspace step's directions are its own."""
        return self.rank is None and super().takes_fused_update

    def in_subspace(self, p: torch.Tensor) -> bool:
        """Whether ``p`` takes the subspace rule: a matrix both of whose sides exceed the rank."""
        return self.rank is not None and p.ndim == 2 and min(p.shape) > self.rank

    def direction_shape(self, index: int, p: torch.Tensor, state: dict) -> Callable[..., torch.Tensor] | None:
        """``P U_j`` for a subspace matrix (``P`` of the current period, kept for the step's update); None (dense z)
        otherwise."""
        if not self.in_subspace(p):
            return None
        m, n = p.shape
        basis = orthonormal_basis(mix(self.seed, index, self.steps_done // self.refresh), m, self.rank, p.device)
        self._bases[index] = basis
        return low_rank_shape(n, lambda key: basis, lambda key: self.coefficients(key, n, p.device))

    def coefficients(self, key: int, n: int, device: torch.device) -> torch.Tensor:
        """``U`` (r x n) of the direction named by ``key``."""
        return gaussian(key, self.rank, n, device, COEFFICIENTS_TAG)

    def update_param(
        self, p: torch.Tensor, index: int, estimate: GradientEstimate, group: dict, state: dict
    ) -> None:
        """ZO-Muon: the subspace step for a subspace matrix; ``lr * scale * NS(M)`` for a matrix of an
        orthogonalised group; the momentum step (at ``plain_lr`` when given) for every other parameter."""
        if self.in_subspace(p):
            self.subspace_step(p, index, estimate, group, state)
            return
        m = self.accumulate(p, index, estimate, group, state)
        self.decay(p, group)
        if p.ndim != 2 or not group["orthogonalize"]:  # norms, biases, embeddings: momentum SGD
            p.add_(m, alpha=-(group["lr"] if group["plain_lr"] is None else group["plain_lr"]))
            return
        scale = math.sqrt(max(1.0, p.shape[0] / p.shape[1]))
        p.add_(newton_schulz(m, group["ns_steps"], form=group["ns_form"]), alpha=-group["lr"] * scale)

    def subspace_step(self, p: torch.Tensor, index: int, estimate: GradientEstimate, group: dict, state: dict) -> None:
        """``W <- W - lr * P NS(M)``, ``M`` (r x n, float32) the momentum of ``G = sum_j w_j U_j`` in this period's
        subspace (just ``G`` without momentum); ``P NS(M)`` is written a block of rows at a time."""
        basis = self._bases.pop(index)
        n = p.shape[1]
        g = torch.zeros(self.rank, n, device=p.device)
        for seed, weight in estimate.terms(index):
            g.add_(self.coefficients(direction_key(seed, index), n, p.device), alpha=weight)
        if group["momentum"]:
            if self.steps_done % self.refresh == 0 or "subspace_momentum" not in state:
                state["subspace_momentum"] = torch.zeros_like(g)  # a new basis: the old momentum is in another space
            g = state["subspace_momentum"].mul_(group["momentum"]).add_(g)
        step = newton_schulz(g, group["ns_steps"], form=group["ns_form"])
        self.decay(p, group)
        rows = max(1, UPDATE_CHUNK // n)
        for start in range(0, p.shape[0], rows):
            p[start : start + rows].add_((basis[start : start + rows] @ step).to(p.dtype), alpha=-group["lr"])


class ZOMuonSubspace(ZOMuon):
    """ZO-Muon as Lang et al. 2026 define it ("Powering up zeroth-order training via subspace gradient
    orthogonalization"; their code, OPTML-Group/ZO-Muon): :class:`ZOMuon`'s subspace rule with the settings of
    the paper's LLM command: rank 64, the basis redrawn every 100 steps, 4 one-sided queries (5 forwards a
    step), no momentum, lr 1e-2 (on full fine-tuning 1e-1 since config version 22, measured at the fewer-forwards
    grid's length on the default model; 3e-1, its 100-step sweep's pick, from version 8), and the vectors (norms)
    stepped at 1e-7."""

    summary = "ZO-Muon in a random rank-64 subspace, orthogonalised there; 4 one-sided queries (Lang et al. 2026)"
    # the paper's 1e-2 barely moves the default model in 100 steps; 3e-1 from version 8, its sweep's pick, walks off
    # at the fewer-forwards grid's 270 steps, where 1e-1 holds: 1e-1 since version 22 (configs/bench/zomuon-subspace-full-lr.yaml)
    default_lr = {(1, "*"): 1e-2, (8, "full"): 3e-1, (13, "lora-fa"): 3e-2, (22, "full"): 1e-1}  # 13: its LoRA-FA sweep's pick
    default_n_queries = 4
    default_rank = 64

    def __init__(self, params, lr: float, eps: float = 1e-3, seed: int = 0, n_queries: int = default_n_queries,
                 rank: int = default_rank, refresh: int = 100, one_sided: bool = True, momentum: float = 0.0,
                 plain_lr: float | None = 1e-7, **options):
        require(isinstance(rank, int) and rank >= 1, f"rank must be an int >= 1, got {rank!r}")
        super().__init__(params, lr=lr, eps=eps, seed=seed, n_queries=n_queries, rank=rank, refresh=refresh,
                         one_sided=one_sided, momentum=momentum, plain_lr=plain_lr, **options)

    @classmethod
    def coordinate_sizes(cls, shape: torch.Size, options: dict) -> tuple[float, float]:
        """:meth:`ZOMuon.coordinate_sizes` at this class's default rank unless the options give one."""
        return super().coordinate_sizes(shape, {"rank": cls.default_rank, **options})
