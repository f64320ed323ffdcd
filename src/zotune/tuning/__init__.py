"""Tuning schemes: which parameters a run trains.

``full`` trains every parameter. Parameter-efficient schemes (LoRA, prefix, prompt via peft)
plug in here as further entries of ``SCHEMES``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..config import TuningConfig
from ..errors import ConfigError


def full(model: torch.nn.Module, cfg: TuningConfig) -> torch.nn.Module:
    """Full fine-tuning: every parameter is trainable."""
    for p in model.parameters():
        p.requires_grad_(True)
    return model


SCHEMES: dict[str, Callable[[torch.nn.Module, TuningConfig], torch.nn.Module]] = {"full": full}


def apply_scheme(model: torch.nn.Module, cfg: TuningConfig) -> tuple[torch.nn.Module, list[torch.nn.Parameter]]:
    """Prepare ``model`` for the scheme; return it and its trainable parameters."""
    model = SCHEMES[cfg.scheme](model, cfg)
    return model, [p for p in model.parameters() if p.requires_grad]


def transformer_layers(model: torch.nn.Module) -> torch.nn.ModuleList | list:
    """The model's stack of layers: its largest ``nn.ModuleList``."""
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    return max(lists, key=len) if lists else []


def hybrid_split(
    model: torch.nn.Module, params: list[torch.nn.Parameter], zo_layers: int
) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    """ZO-Bench's hybrid ZO-FO: (ZO part, FO part). The ZO part is the embeddings (a tied LM
    head with them) and the first ``zo_layers`` layers; the FO part is everything else."""
    layers = transformer_layers(model)
    if zo_layers > len(layers):
        raise ConfigError(f"tuning.hybrid.zo_layers is {zo_layers}, but the model has {len(layers)} layers")
    zo_ids = {id(p) for layer in list(layers)[:zo_layers] for p in layer.parameters()}
    zo_ids |= {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    return [p for p in params if id(p) in zo_ids], [p for p in params if id(p) not in zo_ids]


def layer_blocks(model: torch.nn.Module, params: list[torch.nn.Parameter]) -> list[dict]:
    """Param groups for block-wise ZO: one per transformer layer (the children of the model's
    largest ``nn.ModuleList``), then one for everything else (embeddings, final norm, head)."""
    layers = transformer_layers(model)
    wanted = {id(p) for p in params}
    groups, seen = [], set()
    for layer in layers:
        block = [p for p in layer.parameters() if id(p) in wanted and id(p) not in seen]
        seen.update(id(p) for p in block)
        if block:
            groups.append({"params": block})
    rest = [p for p in params if id(p) not in seen]
    if rest:
        groups.append({"params": rest})
    return groups
