"""Build an optimizer from a config section; default hyperparameters per optimizer and scheme.

The defaults come in generations, one per config ``version`` (a run keeps the defaults it was
recorded with, so it resumes and replays bit for bit):

* **Version 3 (new runs): measured on the default model.** Learning-rate sweeps of SmolLM2-135M
  on rotten_tomatoes (k = 16 per class, 100 steps, picked by dev accuracy, as MeZO picks):
  ``configs/bench/sweep/*.yaml``, tables in ``docs/sweeps.md``. MeZO's values below are for
  OPT-13B: at 1e-6 full fine-tuning of a 135M model does not move in 100 steps.
* **Versions 1 and 2: MeZO's published values** (Malladi et al. 2023, Table 15 and its grids):
  full fine-tuning lr 1e-6 (grid {1e-6, 1e-7}) / eps 1e-3; LoRA (r 8, alpha 16) lr 5e-5 (grid
  {1e-4, 5e-5}) / eps 1e-2; prefix (5 tokens) lr 1e-2 (grid {1e-2, 1e-3}) / eps 1e-1. MeZO has
  no prompt tuning: its defaults, lr 1e-3 / eps 1e-2 with 10 virtual tokens, are the MeZO-SGD
  prompt-tuning command of the ZO-Bench code base (Zhang et al. 2024), as published in SubZero's
  README (Yu et al. 2024, OPT-1.3B on SST-2). ZO-Adam, like Adam, takes a larger lr on full
  fine-tuning. First-order defaults: MeZO's FT baselines (Adam 1e-5 full, 1e-4 LoRA, 1e-2
  prefix); prompt 1e-3 (ZO-Bench's FO-SGD prompt command; its Adam grid is 1e-2..1e-6). FO-SGD
  has no published per-scheme value but prompt's: LoRA 1e-3 and prefix 1e-2 are
  order-of-magnitude choices.

First-order baselines are plain ``torch.optim`` classes. ``optimizer.options`` goes to the
constructor as keyword arguments (``momentum``, ``betas``, ``adam_eps``, ...).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from ..config import CONFIG_VERSION, VERSIONS, Config, OptimizerConfig, TuningConfig
from ..errors import ConfigError
from .registry import FIRST_ORDER, is_zeroth_order, zo_class

T = TypeVar("T")


@dataclass(frozen=True)
class Defaults:
    """One generation of default hyperparameters: ZO ``(lr, eps)`` by scheme (an optimizer's own
    exceptions are its class's ``default_lr``); FO lr by optimizer and scheme."""

    zo: dict[str, tuple[float, float]]
    fo: dict[str, dict[str, float]]


# The rows are schemes, "lora-fa" being LoRA with A frozen (tuning.lora.freeze_a, see defaults_row).
MEZO = Defaults(
    zo={"full": (1e-6, 1e-3), "lora": (5e-5, 1e-2), "lora-fa": (5e-5, 1e-2), "prefix": (1e-2, 1e-1),
        "prompt": (1e-3, 1e-2), "top": (1e-6, 1e-3)},  # top K layers: full fine-tuning's
    fo={"SGD": {"full": 1e-4, "lora": 1e-3, "lora-fa": 1e-3, "prefix": 1e-2, "prompt": 1e-3, "top": 1e-4},
        "AdamW": {"full": 1e-5, "lora": 1e-4, "lora-fa": 1e-4, "prefix": 1e-2, "prompt": 1e-3, "top": 1e-5}},
)
# docs/sweeps.md; prefix and prompt keep MeZO's (not swept yet). Plain LoRA under ZO: 3e-3 is the
# best lr at 100 steps but diverges after ~150 (docs/convergence.md), 1e-3 is the grid's next.
MEASURED = Defaults(
    zo={**MEZO.zo, "full": (1e-4, 1e-3), "lora": (1e-3, 1e-2), "lora-fa": (3e-2, 1e-2), "top": (1e-3, 1e-3)},
    fo={"SGD": {**MEZO.fo["SGD"], "full": 1e-3}, "AdamW": dict(MEZO.fo["AdamW"])},
)
# config version -> defaults (4: FZOO's own lr; 5: HiZOO's alpha, its class's default_options; 6: the sign
# and momentum lr on full, their classes' default_lr; 7: ZO-Adam's lr on full, its class's; 8: ZOMuonSubspace's lr
# on full, its class's; 9: the LoRA-FA lr of ZO-Adam, ZO-SGD-Sign, FZOO and JAGUAR, their
# classes'; 10: LOZO's LoRA-FA lr; 11: Sparse-MeZO's; 12: ZO-SGD-Momentum's; 13: ZOMuonSubspace's;
# 14: ZO-Muon's, their classes'; 15: ZO-Muon's lr and plain_lr on full, its class's; 16: ZO-Muon's and JAGUAR's
# LoRA-FA lr at the fewer-forwards grid's length, their classes'; 17: JAGUAR's and LOZO's full lr, 18: FZOO's LoRA-FA
# lr, 19: ZO-SGD's, 20: Sparse-MeZO's and 21: HiZOO's LoRA-FA lr, 22: ZOMuonSubspace's and 23: HiZOO's full lr, the
# same way, their classes'; 24: ZO-Muon's Newton-Schulz form on full fine-tuning, its class's default_options)
DEFAULTS_BY_VERSION = {v: MEZO if v < 3 else MEASURED for v in VERSIONS}


def defaults_row(tuning: TuningConfig) -> str:
    """The row of the defaults tables for a tuning config: its scheme, or "lora-fa" for LoRA with
    A frozen (LoRA-FA is stable under ZO at 10x plain LoRA's lr)."""
    return "lora-fa" if tuning.scheme == "lora" and tuning.lora.freeze_a else tuning.scheme


def run_hparams(cfg: Config) -> tuple[float, float | None]:
    """(lr, eps) of a run config, defaults by its config version and tuning."""
    return resolved_hparams(cfg.optimizer, defaults_row(cfg.tuning), cfg.version)


def run_forwards_per_step(cfg: Config) -> int:
    """:func:`forwards_per_step` of a run config (its tuning's row, its config version): a ConfigError, before
    anything loads, for optimizer options the class refuses."""
    return forwards_per_step(cfg.optimizer, scheme=defaults_row(cfg.tuning), version=cfg.version)


def resolved_hparams(cfg: OptimizerConfig, scheme: str, version: int = CONFIG_VERSION) -> tuple[float, float | None]:
    """(lr, eps) with the defaults of config ``version`` for ``scheme`` (a row of the defaults
    tables, :func:`defaults_row`) filled in; eps is None for first-order optimizers."""
    defaults = DEFAULTS_BY_VERSION[version]
    if is_zeroth_order(cfg.name):
        lr, eps = defaults.zo[scheme]
        own = own_default(own_table(zo_class(cfg.name), "default_lr"), scheme, version)
        lr = own if own is not None else lr
        return (cfg.lr if cfg.lr is not None else lr, cfg.eps if cfg.eps is not None else eps)
    return (cfg.lr if cfg.lr is not None else defaults.fo[cfg.name][scheme], None)


def resolved_settings(cfg: Config) -> dict[str, Any]:
    """A run config's optimizer ``lr``, ``eps`` and ``options`` with the defaults of its config version filled in
    (its class's own default options under the config's), and hybrid ZO-FO's first-order lr (``hybrid_fo_lr``,
    None without it): what the run's optimizers are built with."""
    lr, eps = run_hparams(cfg)
    options = {**class_options(cfg.optimizer.name, defaults_row(cfg.tuning), cfg.version), **cfg.optimizer.options}
    hybrid = cfg.tuning.hybrid
    fo_lr = None
    if hybrid.zo_layers is not None:  # the first-order half's lr, by the same version
        fo = OptimizerConfig(name=hybrid.fo_optimizer, lr=hybrid.fo_lr)
        fo_lr = resolved_hparams(fo, defaults_row(cfg.tuning), cfg.version)[0]
    return {"lr": lr, "eps": eps, "options": options, "hybrid_fo_lr": fo_lr}


def class_options(name: str, row: str, version: int) -> dict[str, Any]:
    """The constructor options a zeroth-order class sets by default for a row and config version (its
    ``default_options``; none for a first-order optimizer): the config's ``options`` go over them."""
    cls = zo_class(name)
    return dict(own_default(own_table(cls, "default_options"), row, version) or {}) if cls is not None else {}


def own_table(cls: type, name: str) -> dict[tuple[int, str], Any]:
    """A class's own ``default_lr`` or ``default_options``, never a parent's: a default is measured on the class
    that declares it (ZO-SGD's LoRA-FA lr is not ZO-SGD-Cons's, ZO-Muon's plain_lr not ZOMuonSubspace's)."""
    return vars(cls).get(name, {})


def own_default(table: dict[tuple[int, str], T], row: str, version: int) -> T | None:
    """An optimizer's own default (its class's ``default_lr`` or ``default_options``) for a row of the defaults
    tables at config ``version``: the row's entry in force (:func:`since`), else the entry for every row (``"*"``)."""
    for key in (row, "*"):
        found = since({v: x for (v, r), x in table.items() if r == key}, version)
        if found is not None:
            return found
    return None


def since(entries: dict[int, T], version: int) -> T | None:
    """The entry of the latest version <= ``version`` (a default holds until a later generation changes it)."""
    past = [v for v in entries if v <= version]
    return entries[max(past)] if past else None


def build_optimizer(
    cfg: OptimizerConfig, params: Iterable[torch.nn.Parameter], scheme: str, seed: int,
    version: int = CONFIG_VERSION,
) -> torch.optim.Optimizer:
    """The optimizer ``cfg`` names over ``params``, with the defaults of config ``version``."""
    lr, eps = resolved_hparams(cfg, scheme, version)
    try:
        if is_zeroth_order(cfg.name):
            options = {  # the class's own defaults, then the config's
                **class_options(cfg.name, scheme, version),
                **{k: v for k, v in (("n_queries", cfg.n_queries), ("distribution", cfg.distribution)) if v is not None},
                **({"blockwise": True} if cfg.blockwise else {}),
                **cfg.options,
            }
            opt = zo_class(cfg.name)(params, lr=lr, eps=eps, seed=seed, weight_decay=cfg.weight_decay, **options)
            return opt.cache_directions(cfg.direction_cache_mb).noise_table(cfg.noise_table_mb or 0)
        for knob in ("blockwise", "direction_cache_mb", "noise_table_mb", "dual_forward", "fused_update"):
            if getattr(cfg, knob):
                raise ConfigError(f"optimizer.{knob} applies to zeroth-order optimizers only")
        return FIRST_ORDER[cfg.name](params, lr=lr, weight_decay=cfg.weight_decay, **cfg.options)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"optimizer {cfg.name}: {str(err).splitlines()[0]}") from None


def forwards_per_step(cfg: OptimizerConfig, n_blocks: int = 1, scheme: str = "full",
                      version: int = CONFIG_VERSION) -> int:
    """Forward passes one step of ``cfg``'s optimizer costs, known without a model.

    First-order steps count 1 (the forward; its backward is not a forward pass). A zeroth-order
    count is the class's own ``forwards_per_step``, read from a stand-in instance over one-element
    parameters (``n_blocks`` param groups, the blocks of ``optimizer.blockwise``), so it cannot
    drift from what the trainer counts, and what the class refuses (e.g. block-wise) is a
    ConfigError here too. ``scheme`` (a row of the defaults tables) and ``version`` pick the class's own default
    options, and ``options`` may set what the count depends on (ZO-Muon's ``one_sided``)."""
    groups = [{"params": [torch.zeros(1, requires_grad=True)]} for _ in range(n_blocks if cfg.blockwise else 1)]
    stand_in = OptimizerConfig(name=cfg.name, lr=0.0, n_queries=cfg.n_queries, distribution=cfg.distribution,
                               blockwise=cfg.blockwise, options=dict(cfg.options))
    opt = build_optimizer(stand_in, groups, scheme, seed=0, version=version)  # ConfigError for what the class refuses
    return opt.forwards_per_step if is_zeroth_order(cfg.name) else 1
