"""Every optimizer zotune builds, by name.

Zeroth-order optimizers register themselves: subclassing :class:`~zotune.optim.base.ZOOptimizer`
is enough (``__init_subclass__``), and the class declares the facts the rest of zotune reads
(``normalised_step``, ``needs_forward_ad``, ``takes_noise_table``, ``forwards_per_query``,
``default_lr``). So adding an optimizer is one file. The first-order baselines are torch.optim's.
A leaf module: the config checks names here, the factory builds from here.
"""

from __future__ import annotations

import torch

ZEROTH_ORDER: dict[str, type] = {}  # name -> ZOOptimizer subclass, in the order they were defined
FIRST_ORDER: dict[str, type[torch.optim.Optimizer]] = {"SGD": torch.optim.SGD, "AdamW": torch.optim.AdamW}


def register(cls: type) -> type:
    """Add a zeroth-order optimizer class under its class name (a later class of the same name replaces it)."""
    if cls.__name__ in FIRST_ORDER:
        raise ValueError(f"{cls.__name__} is the name of a first-order baseline")
    ZEROTH_ORDER[cls.__name__] = cls
    return cls


def optimizer_names() -> list[str]:
    """Every name ``optimizer.name`` takes: the zeroth-order ones, then the first-order baselines."""
    return [*ZEROTH_ORDER, *FIRST_ORDER]


def is_zeroth_order(name: str) -> bool:
    """Whether ``name`` is a registered zeroth-order optimizer."""
    return name in ZEROTH_ORDER


def zo_class(name: str) -> type | None:
    """The zeroth-order optimizer class called ``name`` (None for a first-order or unknown name)."""
    return ZEROTH_ORDER.get(name)
