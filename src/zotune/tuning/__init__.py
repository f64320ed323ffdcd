"""Tuning schemes: which parameters a run trains.

``full`` trains every parameter. Parameter-efficient schemes (LoRA, prefix, prompt via peft)
plug in here as further entries of ``SCHEMES``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..config import TuningConfig


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


def layer_blocks(model: torch.nn.Module, params: list[torch.nn.Parameter]) -> list[dict]:
    """Param groups for block-wise ZO: one per transformer layer (the children of the model's
    largest ``nn.ModuleList``), then one for everything else (embeddings, final norm, head)."""
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    layers = max(lists, key=len) if lists else []
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
