"""A model's transformer layers and its final norm, found by structure (any architecture)."""

from __future__ import annotations

import torch


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
