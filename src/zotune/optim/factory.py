"""Build an optimizer from a config section; default hyperparameters per optimizer and scheme.

Zeroth-order defaults follow MeZO (Malladi et al. 2023, Table 15): full fine-tuning
lr 1e-6 / eps 1e-3; ZO-Adam, like Adam, takes a larger lr. First-order baselines are plain
``torch.optim`` classes. ``optimizer.options`` goes to the constructor as keyword arguments
(``momentum``, ``betas``, ``adam_eps``, ...).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ..config import OptimizerConfig
from ..errors import ConfigError
from .adam import ZOAdam
from .base import ZOOptimizer
from .conservative import ZOSGDConservative
from .forward_grad import ForwardGrad
from .jaguar import JaguarSignSGD
from .momentum import ZOSGDMomentum
from .muon import ZOMuon
from .sgd import ZOSGD
from .sign import ZOSGDSign

ZO_OPTIMIZERS: dict[str, type[ZOOptimizer]] = {
    cls.__name__: cls for cls in (ZOSGD, ZOSGDSign, ZOSGDMomentum, ZOSGDConservative, ZOAdam, ForwardGrad, JaguarSignSGD, ZOMuon)
}
FO_OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {"SGD": torch.optim.SGD, "AdamW": torch.optim.AdamW}

# (lr, eps) by scheme for ZO, with per-optimizer lr exceptions; lr for FO.
ZO_DEFAULTS = {"full": (1e-6, 1e-3)}
ZO_LR = {("ZOAdam", "full"): 1e-5}
FO_DEFAULTS = {"SGD": 1e-4, "AdamW": 1e-5}


def optimizer_names() -> list[str]:
    return [*ZO_OPTIMIZERS, *FO_OPTIMIZERS]


def is_zeroth_order(name: str) -> bool:
    return name in ZO_OPTIMIZERS


def resolved_hparams(cfg: OptimizerConfig, scheme: str) -> tuple[float, float | None]:
    """(lr, eps) with defaults filled in; eps is None for first-order optimizers."""
    if is_zeroth_order(cfg.name):
        lr, eps = ZO_DEFAULTS[scheme]
        lr = ZO_LR.get((cfg.name, scheme), lr)
        return (cfg.lr if cfg.lr is not None else lr, cfg.eps if cfg.eps is not None else eps)
    return (cfg.lr if cfg.lr is not None else FO_DEFAULTS[cfg.name], None)


def build_optimizer(
    cfg: OptimizerConfig, params: Iterable[torch.nn.Parameter], scheme: str, seed: int
) -> torch.optim.Optimizer:
    lr, eps = resolved_hparams(cfg, scheme)
    try:
        if is_zeroth_order(cfg.name):
            return ZO_OPTIMIZERS[cfg.name](
                params,
                lr=lr,
                eps=eps,
                seed=seed,
                n_queries=cfg.n_queries,
                distribution=cfg.distribution,
                weight_decay=cfg.weight_decay,
                **({"blockwise": True} if cfg.blockwise else {}),
                **cfg.options,
            )
        if cfg.blockwise:
            raise ConfigError("optimizer.blockwise applies to zeroth-order optimizers only")
        return FO_OPTIMIZERS[cfg.name](params, lr=lr, weight_decay=cfg.weight_decay, **cfg.options)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"optimizer {cfg.name}: {str(err).splitlines()[0]}") from None
