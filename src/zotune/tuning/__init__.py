"""Tuning schemes: which parameters a run trains, and how.

``tuning.scheme`` picks a function from ``SCHEMES`` (schemes.py: full, and LoRA / prefix /
prompt tuning via peft); :func:`apply_scheme` applies it and returns the trainable parameters,
the only ones an optimizer perturbs and updates. precision.py checks, before zeroth-order
training, that the trainable weights' precision lets the probes and updates register. The
hybrid ZO-FO split and the block-wise ZO groups (below) work on any scheme's parameters.
"""

from __future__ import annotations

import torch

from ..config import OWN_WEIGHTS_SCHEMES, TuningConfig
from ..errors import ConfigError
from ..models.loader import is_masked_lm, resolve_dtype
from .layers import final_norm, transformer_layers, tuned_top
from .precision import check_precision, precision_report
from .schemes import LORA_TARGETS, SCHEMES, lora_targets

__all__ = ["LORA_TARGETS", "SCHEMES", "apply_scheme", "check_precision", "final_norm", "hybrid_split", "layer_blocks",
           "lora_targets", "precision_report", "transformer_layers", "tuned_top"]


MASKED_LM_SCHEMES = ("full", "lora")  # prefix / prompt / top assume a causal LM's cache, positions and layers


def apply_scheme(model: torch.nn.Module, cfg: TuningConfig) -> tuple[torch.nn.Module, list[torch.nn.Parameter]]:
    """Prepare ``model`` for the scheme; return it (a peft model for the adapter schemes) and
    its trainable parameters, in ``tuning.trainable_dtype`` if set, else in the model's dtype."""
    if cfg.scheme not in SCHEMES:
        raise ConfigError(f"tuning.scheme {cfg.scheme!r} is not available; choose one of {', '.join(SCHEMES)}")
    if cfg.trainable_dtype is not None and cfg.scheme in OWN_WEIGHTS_SCHEMES:
        raise ConfigError("config key 'tuning.trainable_dtype' applies to the adapter schemes (lora, prefix, "
                          f"prompt) only: {cfg.scheme} tunes the model's own weights (use model.dtype)")
    if is_masked_lm(model) and cfg.scheme not in MASKED_LM_SCHEMES:
        raise ConfigError(f"tuning.scheme {cfg.scheme!r} is for causal LMs; a masked LM (RoBERTa, BERT) tunes with "
                          f"{' or '.join(MASKED_LM_SCHEMES)}")
    base_dtype = next(model.parameters()).dtype
    model = SCHEMES[cfg.scheme](model, cfg)
    if cfg.scheme not in OWN_WEIGHTS_SCHEMES:  # every adapter tensor, a frozen LoRA A included
        dtype = resolve_dtype(cfg.trainable_dtype) if cfg.trainable_dtype is not None else base_dtype
        for p in model.parameters():
            if p.requires_grad and p.dtype != dtype:
                p.data = p.data.to(dtype)
    if cfg.scheme == "lora" and cfg.lora.freeze_a:
        freeze_lora_a(model)
    return model, [p for p in model.parameters() if p.requires_grad]


def freeze_lora_a(model: torch.nn.Module) -> None:
    """LoRA-FA (Zhang et al. 2023): the down-projections A keep their random init and only the
    up-projections B (zero at init) are tuned. ``delta W = B A`` starts at zero as in LoRA, and
    is linear in what is tuned; a zeroth-order probe no longer perturbs the A coordinates, along
    which the loss is flat while B = 0 (A is most of LoRA's dimension: r x d_in per module against
    d_out x r). A is rebuilt from the run seed with the model, so the weights files hold only B."""
    for name, p in model.named_parameters():
        if ".lora_A." in name:
            p.requires_grad_(False)


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
