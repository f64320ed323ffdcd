"""The modules the ``top`` scheme tunes (a model's layers and final norm: ``zotune.models.layers``)."""

from __future__ import annotations

import torch

from ..errors import ConfigError
from ..models.layers import final_norm, transformer_layers

__all__ = ["final_norm", "transformer_layers", "tuned_top"]


def tuned_top(model: torch.nn.Module, k: int, norm: bool = True) -> list[torch.nn.Module]:
    """The modules the ``top`` scheme tunes: the last ``k`` layers, then the final norm."""
    layers = list(transformer_layers(model))
    if not 1 <= k <= len(layers):
        raise ConfigError(f"tuning.top.layers is {k}, but the model has {len(layers)} layers")
    last = final_norm(model) if norm else None
    return layers[-k:] + ([last] if last is not None else [])
