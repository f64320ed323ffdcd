"""A model's transformer layers, its final norm, and the modules the ``top`` scheme tunes."""

from __future__ import annotations

import torch

from ..errors import ConfigError


def transformer_layers(model: torch.nn.Module) -> torch.nn.ModuleList | list:
    """The model's stack of layers: its largest ``nn.ModuleList``."""
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    return max(lists, key=len) if lists else []


def final_norm(model: torch.nn.Module) -> torch.nn.Module | None:
    """The norm after the last layer (Llama-family ``norm``, OPT ``final_layer_norm``, GPT-2 ``ln_f``)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    for name in ("norm", "final_layer_norm", "ln_f"):
        module = getattr(decoder, name, None)
        if isinstance(module, torch.nn.Module):
            return module
    return None


def tuned_top(model: torch.nn.Module, k: int, norm: bool = True) -> list[torch.nn.Module]:
    """The modules the ``top`` scheme tunes: the last ``k`` layers, then the final norm."""
    layers = list(transformer_layers(model))
    if not 1 <= k <= len(layers):
        raise ConfigError(f"tuning.top.layers is {k}, but the model has {len(layers)} layers")
    last = final_norm(model) if norm else None
    return layers[-k:] + ([last] if last is not None else [])
