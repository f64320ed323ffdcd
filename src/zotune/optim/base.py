"""The zeroth-order optimizer base: a gradient estimator plus an update rule.

Subclasses implement only :meth:`ZOOptimizer.update_param` (how one parameter moves given
the estimate); estimating, seeding, skipping non-finite steps, state_dict and the record of
each step live here once.

Guarantees (the contract: docs/contract.md), in every dtype:

* ``lr == 0``: parameters are not written at all, so they stay bit-identical;
* the same seed, model and closures give bit-identical parameters (the step seed is
  ``mix(seed, step)``, nothing reads global RNG state);
* ``state_dict()`` carries the step counter and seed, so a reloaded optimizer continues
  bit-identically;
* probes never write the weights (see estimators/perturb.py): a closure that raises leaves
  them untouched and the error propagates; a NaN/inf loss skips the update, counted in
  ``skipped_steps``, and ``step`` returns the non-finite loss.

Several processes (``zotune.distributed``) set ``loss_reducer``: every closure evaluation of a
step runs before any update, and the reducer turns the local losses into the step's (one
collective), so every process forms the same estimate and applies the same update.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from ..estimators.directions import DISTRIBUTIONS, mix
from ..estimators.lockstep import Lockstep
from ..estimators.reduce import LOCAL, LossReducer
from ..estimators.spsa import SPSA, GradientEstimate, block_coverage, direction_key, query_seeds
from ..models.layers import transformer_layers
from ..models.loader import model_offload
from ..models.offload import is_offloaded, release, release_span, state_directory, state_like
from .fused import FusedUpdate
from .registry import register as _register


@dataclass
class StepRecord:
    """What one step did: enough to redo its update without a forward pass."""

    step: int
    seed: int
    query_seeds: list[int]
    projected_grads: list[float]
    lrs: list[float]
    loss: float
    skipped: bool
    extra: dict[str, Any] = field(default_factory=dict)  # optimizer-specific (e.g. accepted candidate)


class ZOOptimizer(torch.optim.Optimizer):
    """Base class: SPSA estimate, then ``update_param`` for every trainable parameter.

    A subclass registers itself under its class name (``optimizer.name``) and declares its facts
    as class attributes; the defaults below hold for the SPSA family."""

    forwards_per_query = 2
    takes_noise_table = True  # its directions can be windows of a noise table (see noise_table)
    # update_param touches only its own parameter and state, elementwise: parameters may be
    # updated concurrently (rules with matrix maths, e.g. Newton-Schulz, set False)
    elementwise = False
    summary = ""  # one line for `zotune optimizers`: the method and its source
    # each coordinate moves by about lr whatever the estimate (sign rules, Adam, Newton-Schulz): the
    # half-precision guard (tuning/precision.py) sizes an update by lr instead of lr x estimate
    normalised_step = False
    needs_forward_ad = False  # estimates by forward-mode AD: the trainer switches HF models to eager attention
    # (config version, defaults row) -> lr where this optimizer's default differs from the ZO family's
    # (zotune.optim.factory's tables), from that version on until a later entry; e.g. ZOAdam's larger lr on full.
    # This table and default_options are read from the class that declares them, never inherited (factory.own_table)
    default_lr: dict[tuple[int, str], float] = {}
    # (config version, defaults row or "*" for every row) -> constructor keywords the factory passes (under
    # optimizer.options), from that version on until a later entry: a default the sweeps changed, kept as it was
    # for runs recorded before (HiZOO's alpha)
    default_options: dict[tuple[int, str], dict[str, Any]] = {}
    default_n_queries = 1  # optimizer.n_queries when the config gives none
    default_distribution = "gaussian"  # optimizer.distribution when the config gives none

    def __init_subclass__(cls, register: bool = True, **kwargs: Any) -> None:
        """Register the class under its name; ``class Variant(ZOSGD, register=False)`` keeps a
        helper subclass (e.g. a test's preset) out of ``optimizer.name``."""
        super().__init_subclass__(**kwargs)
        if register:
            _register(cls)

    def __init__(
        self,
        params: Any,
        lr: float,
        eps: float = 1e-3,
        seed: int = 0,
        n_queries: int = 1,
        distribution: str = "gaussian",
        weight_decay: float = 0.0,
        blockwise: bool = False,
        *,
        defaults: dict[str, Any] | None = None,
    ):
        require(isinstance(lr, (int, float)) and lr >= 0, f"lr must be a number >= 0, got {lr!r}")
        require(isinstance(eps, (int, float)) and eps > 0, f"eps must be a number > 0, got {eps!r}")
        require(isinstance(seed, int), f"seed must be an int, got {seed!r}")
        require(
            isinstance(n_queries, int) and n_queries >= 1,
            f"n_queries must be an int >= 1, got {n_queries!r}",
        )
        require(distribution in DISTRIBUTIONS, f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")
        require(weight_decay >= 0, f"weight_decay must be >= 0, got {weight_decay!r}")
        # ``defaults``: a subclass's own per-group options (momentum, betas, ...)
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, **(defaults or {})))
        self.seed = seed
        self.eps = float(eps)
        self.blockwise = bool(blockwise)  # each param group is a block with its own queries
        self.estimator = SPSA(self.eps, n_queries, distribution)
        self.steps_done = 0
        self.skipped_steps = 0
        self.last_record: StepRecord | None = None
        # which probes run in this process and how their losses combine (zotune.distributed)
        self.loss_reducer: LossReducer = LOCAL
        self.fused: FusedUpdate | None = None  # the layers' updates kept for the next forward (fuse_update)

    @classmethod
    def coordinate_sizes(cls, shape: torch.Size, options: dict[str, Any]) -> tuple[float, float]:
        """(probe, update) size of one coordinate of a parameter of ``shape``, per unit of ``eps`` and of the step
        (``lr * |g|``, or ``lr`` for a ``normalised_step`` rule), under the class's ``options``: (1, 1) for a plain
        z. The half-precision guard (tuning/precision.py) scales its sample by them."""
        return 1.0, 1.0

    @classmethod
    def param_groups_for(cls, model: torch.nn.Module, params: list) -> list:
        """How this optimizer wants ``model``'s trainable ``params`` (tensors or groups) grouped;
        the trainer calls it before construction. Default: as given."""
        return params

    def cache_directions(self, megabytes: float) -> ZOOptimizer:
        """Keep up to ``megabytes`` of z (float32) from a step's first probe for its other probes
        and its update, instead of drawing it again (bit-identical; the buffers are held from
        the first step on and reused by every step). Speed for memory: a full step draws z once
        instead of three times when the cache holds every trainable value (4 bytes each).
        0 (the default) turns it off and releases the buffers."""
        sampler = self.estimator.sampler
        sampler.cache_numel = _float32_values(megabytes, "the direction cache")
        if not sampler.cache_numel:
            sampler.clear_cache(release=True)
        return self

    def noise_table(self, megabytes: float) -> ZOOptimizer:
        """Take every direction as windows of one table of ``megabytes`` of float32 values drawn
        once (a shared noise table, as in OpenAI's evolution strategies): no drawing per step,
        for the table's memory. It changes the directions (a run replays with the same table
        size only); 0 (the default) draws every chunk from its key."""
        self.estimator.sampler.use_table(_float32_values(megabytes, "the noise table"))
        return self

    def dual_forward(self, model: torch.nn.Module | None) -> ZOOptimizer:
        """Run each query's + and - probes through ``model`` in one pass, layer by layer
        (estimators/lockstep.py): the same losses bit for bit, each layer's weights (and its chunks
        of z) read once per query instead of twice. Two-sided SPSA estimators only; None turns it off."""
        require(model is None or self.takes_dual_forward,
                f"{type(self).__name__} does not take the dual forward (it needs each query's + and - probes)")
        self.estimator.lockstep = Lockstep(transformer_layers(model)) if model is not None else None
        return self

    def fuse_update(self, model: torch.nn.Module | None) -> ZOOptimizer:
        """Apply each step's update of ``model``'s transformer layers when the next forward first enters each
        layer (optim/fused.py, ZO2's fused update): the same weights bit for bit, each layer's weights visited
        once per step. Call :meth:`flush_update` before reading the weights outside a forward (the trainer
        does). Per-parameter rules with plain directions only; None applies what is pending and turns it off."""
        require(model is None or self.takes_fused_update,
                f"{type(self).__name__} does not take the fused update (its update or directions are its own)")
        if self.fused is not None:
            self.fused.remove()
        self.fused = FusedUpdate(transformer_layers(model), self.move, model_offload(model)) if model is not None else None
        return self

    def flush_update(self) -> None:
        """Apply every update the fused update keeps pending (nothing without it)."""
        if self.fused is not None:
            self.fused.flush()

    @property
    def takes_fused_update(self) -> bool:
        """Whether its update can wait for the next forward: the base class's per-parameter ``update`` with plain
        directions (a shaped direction is its step's own)."""
        cls = type(self)
        return cls.update is ZOOptimizer.update and cls.direction_shape is ZOOptimizer.direction_shape

    @property
    def takes_dual_forward(self) -> bool:
        """Whether its estimate comes from pairs of + and - probes (two-sided SPSA), which :meth:`dual_forward` runs
        in one pass."""
        return type(self.estimator) is SPSA and not self.estimator.one_sided

    @property
    def n_queries(self) -> int:
        """Random directions per step (per block when block-wise)."""
        return self.estimator.n_queries

    @property
    def forwards_per_step(self) -> int:
        """The probes (``forwards_per_query`` per query and block), plus ``f(x)`` when the estimator measures it."""
        return self.forwards_per_query * self.n_queries * len(self.blocks()) + int(getattr(self.estimator, "center", False))

    @property
    def extra_values_per_step(self) -> int:
        """Optimizer-specific floats a step records (``StepRecord.extra["values"]``, in the trajectory)
        for its replay: none but for rules that need more than the projected gradients (HiZOO)."""
        return 0

    def blocks(self) -> list[list[int]]:
        """Block-wise: positions (in ``trainable()`` order) of each param group's trainable
        parameters; otherwise one block holding everything."""
        trainable = list(self.trainable())
        if not self.blockwise:
            return [list(range(len(trainable)))]
        by_group: dict[int, list[int]] = {}
        for pos, (_, _, group) in enumerate(trainable):
            by_group.setdefault(id(group), []).append(pos)
        return list(by_group.values())

    def trainable(self) -> Iterator[tuple[int, torch.Tensor, dict]]:
        """``(index, param, group)`` for every parameter that requires grad; the index is
        the parameter's position over all groups and names its random direction."""
        index = 0
        for group in self.param_groups:
            for p in group["params"]:
                if p.requires_grad:
                    yield index, p, group
                index += 1

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> torch.Tensor:  # type: ignore[override]
        """One ZO step: estimate the gradient from ``closure``'s losses, then update unless a loss is non-finite
        (the step is skipped); sets ``last_record`` and returns the loss."""
        if closure is None:
            raise ValueError(f"{type(self).__name__}.step needs a closure that returns the loss")
        step_seed = mix(self.seed, self.steps_done)
        trainable = list(self.trainable())
        params = [p for _, p, _ in trainable]
        indices = [i for i, _, _ in trainable]
        blocks = {"blocks": self.blocks()} if self.blockwise else {}
        try:
            self.shape_directions(query_seeds(step_seed, self.n_queries * len(self.blocks())), trainable)
            estimate = self.estimator.estimate(closure, params, indices, step_seed, reducer=self.loss_reducer, **blocks)
            skipped = not estimate.finite
            extra: dict[str, Any] = {}
            if skipped:
                self.skipped_steps += 1
            else:
                extra = self.update(closure, estimate, trainable) or {}
        finally:
            self.estimator.sampler.clear_cache()
        self.last_record = StepRecord(
            step=self.steps_done,
            seed=step_seed,
            query_seeds=estimate.seeds,
            projected_grads=estimate.projected_grads,
            lrs=[g["lr"] for g in self.param_groups],
            loss=estimate.loss,
            skipped=skipped,
            extra=extra,
        )
        self.steps_done += 1
        return torch.tensor(estimate.loss)

    @torch.no_grad()
    def replay(self, record: StepRecord) -> None:
        """Redo a recorded step's update from its seed, projected gradients and learning rates,
        without a forward pass (MeZO's trajectory): bit-identical to the step that recorded
        it, optimizer state (momentum, moments, JAGUAR's memory) included."""
        expected = mix(self.seed, self.steps_done)
        if record.seed != expected or record.step != self.steps_done:
            raise ValueError(f"record of step {record.step} (seed {record.seed}) does not follow this optimizer's "
                             f"step {self.steps_done} (seed {expected}): another run's trajectory, or out of order")
        if len(record.lrs) != len(self.param_groups):
            raise ValueError(f"record has {len(record.lrs)} learning rates for {len(self.param_groups)} param groups")
        for group, lr in zip(self.param_groups, record.lrs):
            group["lr"] = lr
        if record.skipped:
            self.skipped_steps += 1
        else:
            trainable = list(self.trainable())
            indices = [i for i, _, _ in trainable]
            coverage = block_coverage(self.blocks(), indices, self.n_queries) if self.blockwise else None
            estimate = GradientEstimate(query_seeds(record.seed, len(record.projected_grads)), list(record.projected_grads),
                                    record.loss, [], self.estimator.sampler, coverage)
            sampler = self.estimator.sampler
            sampler.keep_masks = False  # each direction is used once: by the update
            try:
                self.shape_directions(estimate.seeds, trainable)
                self.replay_update(estimate, trainable, record.extra)
            finally:
                sampler.keep_masks = True
                sampler.clear_cache()
        self.last_record = record
        self.steps_done += 1

    def direction_shape(self, index: int, p: torch.Tensor, state: dict) -> Callable[..., torch.Tensor] | None:
        """This step's shape of parameter ``p``'s directions, or None for plain z (the default).
        A shape is ``shape(key, start, stop, device, draw, out)`` (see ``directions.Shape``; ``key``
        names the direction): masked (SparseMeZO), scaled (HiZOO), low-rank (LOZO). It is read before
        the step's probes and while its update runs, so it depends only on what the step starts from."""
        return None

    def shape_directions(self, seeds: list[int], trainable: list[tuple[int, torch.Tensor, dict]]) -> None:
        """Register this step's shaped directions (``direction_shape``) with the sampler, for every query."""
        for index, p, _ in trainable:
            shape = self.direction_shape(index, p, self.state[p])
            if shape is not None:
                for seed in seeds:
                    key = direction_key(seed, index)
                    self.estimator.sampler.shapes[key] = functools.partial(shape, key)

    def replay_update(
        self, estimate: GradientEstimate, trainable: list[tuple[int, torch.Tensor, dict]], extra: dict[str, Any]
    ) -> None:
        """A replayed step's update; rules that consult the closure (ZO-SGD-Cons) override it
        to follow the record instead."""
        self.update(no_closure, estimate, trainable)

    def update(
        self, closure: Callable[[], Any], estimate: GradientEstimate, trainable: list[tuple[int, torch.Tensor, dict]]
    ) -> dict[str, Any] | None:
        """Apply the update rule to every trainable parameter of a group with lr != 0.
        Returns optimizer-specific scalars for the step's record (None: nothing)."""
        moving = [(index, p, group, self.state[p]) for index, p, group in trainable if group["lr"] != 0]
        if self.fused is not None:
            moving = self.fused.defer(estimate, moving)  # the layers' updates wait for the next forward
        self.move(estimate, moving)
        return None

    def move(self, estimate: GradientEstimate, moving: list[tuple[int, torch.Tensor, dict, dict]]) -> None:
        """``update_param`` for each ``(index, param, group, state)``; independent parameters on the CPU several at
        once (elementwise rules)."""

        def one(index: int, p: torch.Tensor, group: dict, state: dict) -> None:
            self.update_param(p, index, estimate, group, state)
            release_all(p, state)  # an offloaded parameter and its state (zotune.models.offload) leave memory

        if not self.elementwise or any(p.device.type != "cpu" for _, p, _, _ in moving):
            for m in moving:
                one(*m)
            return
        # independent parameters on the CPU: several at once, largest first (for balance)
        moving = sorted(moving, key=lambda m: -m[1].numel())
        self.estimator.sampler.run_jobs([lambda m=m: one(*m) for m in moving])

    def update_param(
        self, p: torch.Tensor, index: int, estimate: GradientEstimate, group: dict, state: dict
    ) -> None:
        """Move one parameter (lr != 0 here). Called inside ``torch.no_grad()``."""
        raise NotImplementedError

    # -- helpers for update rules ---------------------------------------------------------
    @staticmethod
    def decay(p: torch.Tensor, group: dict) -> None:
        """MeZO's weight decay, folded into the step: x <- x * (1 - lr * weight_decay)."""
        if group["weight_decay"]:
            p.mul_(1 - group["lr"] * group["weight_decay"])

    @staticmethod
    def buffer(state: dict, name: str, p: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """Per-parameter float32 state (momentum, moments), created filled with ``fill`` (zeros); an offloaded
        parameter's in a file beside its own (``zotune.models.offload.state_like``), released with it."""
        if name not in state:
            state[name] = state_like(p, fill)
        return state[name]

    @staticmethod
    def summed(estimate: GradientEstimate, index: int, p: torch.Tensor, state: dict,
               fn: Callable[[int, int, torch.Tensor], None]) -> None:
        """``estimate.summed`` over ``p``: ``fn(start, stop, grad_chunk)`` chunk by chunk. On the disk tier each
        chunk's pages of ``p`` and of its state tensors of p's size leave memory once ``fn`` is done with them,
        so an update holds about a chunk of them (not a whole embedding's moments)."""
        paged = [t for t in (p, *state.values())
                 if isinstance(t, torch.Tensor) and is_offloaded(t) and t.numel() == p.numel()]

        def then_release(start: int, stop: int, g: torch.Tensor) -> None:
            fn(start, stop, g)
            for t in paged:
                release_span(t, start, stop)

        estimate.summed(index, p.numel(), then_release if paged else fn, p.device)

    # -- state ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """torch.optim's state dict plus ``zo``: the seed, the steps done and the steps skipped (any pending
        update applied first)."""
        self.flush_update()
        sd = super().state_dict()
        sd["zo"] = {"seed": self.seed, "steps_done": self.steps_done, "skipped_steps": self.skipped_steps}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any], *, take: bool = False) -> None:
        """As torch.optim, except that saved tensors keep their dtype (torch would cast float32 moments to a
        bfloat16 parameter's dtype, and the continuation would not be exact) and each is copied once, onto its
        parameter's device, so the optimizer never shares a tensor with ``state_dict``'s owner.

        ``take=True``: the tensors are the caller's to give (a checkpoint has just read them, and nothing else
        holds them): one already on its parameter's device is kept, not copied, so a resume holds the state
        once (a full ZO-Adam's two moments: twice the model), not twice over.

        A saved group lacking an option added since (ZO-Muon's ``ns_form``) takes the value this optimizer
        was built with."""
        state_dict = dict(state_dict)
        zo = state_dict.pop("zo", None)
        saved = state_dict["state"]
        super().load_state_dict({**state_dict, "state": {}})  # the groups; torch would copy the state once more
        for group in self.param_groups:  # a group saved before an option existed takes this optimizer's value of it
            for key, value in self.defaults.items():
                group.setdefault(key, value)
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = dict(zip(saved_ids, (p for g in self.param_groups for p in g["params"])))
        for saved_id, values in saved.items():
            p = params.get(saved_id)
            if p is None:
                self.state[saved_id] = values  # not a parameter's: kept as torch keeps it
            else:
                self.state[p] = {k: _restored(v, p, take) for k, v in values.items()}
        if zo is not None:
            self.seed = int(zo["seed"])
            self.steps_done = int(zo["steps_done"])
            self.skipped_steps = int(zo["skipped_steps"])


def _restored(value: Any, p: torch.Tensor, take: bool = False) -> Any:
    """A saved state value of ``p``: a float32 tensor of p's size copied into :func:`state_like` (a file for
    a ``p`` of an offloaded model, :func:`state_directory`), another tensor onto p's device (copied unless
    ``take`` and already there), anything else deep-copied."""
    if not isinstance(value, torch.Tensor):
        return copy.deepcopy(value)
    if state_directory(p) is not None and value.dtype == torch.float32 and value.numel() == p.numel():
        home = state_like(p, shape=tuple(value.shape))
        home.copy_(value)
        release(home)
        return home
    return value.to(device=p.device, copy=not take)


def release_all(p: torch.Tensor, state: dict) -> None:
    """:func:`~zotune.models.offload.release` ``p`` and the tensors of its optimizer state."""
    release(p)
    for value in state.values():
        if isinstance(value, torch.Tensor):
            release(value)


def no_closure() -> Any:
    """The closure of a replayed step, which has none: raises RuntimeError."""
    raise RuntimeError("a replayed step has no closure: override replay_update to follow the record")


def require(ok: bool, message: str) -> None:
    """Raise ``ValueError(message)`` unless ``ok``: an optimizer's check of its arguments."""
    if not ok:
        raise ValueError(message)


def _float32_values(megabytes: float, what: str) -> int:
    """How many float32 values ``megabytes`` hold (``what`` names the buffer in the error)."""
    require(megabytes >= 0, f"{what} must be >= 0 MB, got {megabytes!r}")
    return int(megabytes * 2**20) // 4
