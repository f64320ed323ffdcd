"""Tuning schemes: which parameters a run trains, chosen by ``tuning.scheme`` from ``SCHEMES``.

* ``full``: every weight of the model.
* ``lora``: peft LoRA adapters (``tuning.lora``: r, alpha, dropout, target_modules; by default
  the attention's query and value projections, as in MeZO).
* ``prefix``: peft prefix tuning (``tuning.prefix``): trainable keys and values of
  ``num_virtual_tokens`` virtual tokens in every layer, optionally initialised from the
  keys/values of random real tokens (MeZO's ``prefix_init_by_real_act``).
* ``top``: the top K transformer layers and the final norm (``tuning.top``), the model's own
  weights; with a frozen-prefix activation cache for the training probes (frozen_prefix.py).
* ``prompt``: peft prompt tuning (``tuning.prompt``): ``num_virtual_tokens`` trainable input
  embeddings in front of the prompt, initialised from a text (peft's TEXT init) or, without
  one, from the embeddings of random vocabulary tokens (ZO-Bench's
  ``prompt_init_by_real_tokens``, peft's SAMPLE_VOCAB).

Adapters are kept in the base model's dtype unless ``tuning.trainable_dtype`` says otherwise
(e.g. float32 adapters over a half-precision base: see precision.py). The random parts of an
initialisation come from torch's global generator, which the trainer seeds with the run seed.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

from ..config import SCHEMES as CONFIG_SCHEMES, TuningConfig
from ..errors import ConfigError
from ..models.loader import is_masked_lm
from .layers import tuned_top
from .prompt_model import prompt_tuned_causal_lm

# LoRA target modules by ``config.model_type`` when ``tuning.lora.target_modules`` is null:
# the attention's query and value projections (MeZO, following Hu et al. 2021).
LORA_TARGETS: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(("llama", "mistral", "mixtral", "opt", "qwen2"), ("q_proj", "v_proj")),
    "gpt2": ("c_attn",),  # GPT-2 projects q, k and v with one Conv1D
    **dict.fromkeys(("roberta", "bert"), ("query", "value")),
}


def full(model: torch.nn.Module, cfg: TuningConfig) -> torch.nn.Module:
    """Full fine-tuning: every parameter is trainable."""
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def lora(model: torch.nn.Module, cfg: TuningConfig) -> torch.nn.Module:
    """LoRA adapters (peft) on ``tuning.lora.target_modules``; the base weights are frozen."""
    from peft import LoraConfig, TaskType

    opts = cfg.lora
    targets = opts.target_modules or lora_targets(model)
    task_type = None if is_masked_lm(model) else TaskType.CAUSAL_LM  # a masked LM: peft's plain wrapper
    config = LoraConfig(task_type=task_type, r=opts.r, lora_alpha=opts.alpha,
                        lora_dropout=opts.dropout, target_modules=list(targets))
    try:
        return _peft(model, config)
    except ValueError as err:  # e.g. a target module that is not in the model
        raise ConfigError(f"tuning.lora.target_modules {targets}: {str(err).splitlines()[0]}") from None


def prefix(model: torch.nn.Module, cfg: TuningConfig) -> torch.nn.Module:
    """Prefix tuning (peft): trainable per-layer keys/values of virtual tokens."""
    from peft import PrefixTuningConfig, TaskType

    n = cfg.prefix.num_virtual_tokens
    real = _real_prefix(model, n) if cfg.prefix.init_from_real else None
    peft_model = _peft(model, PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=n))
    if real is not None:
        weight = peft_model.prompt_encoder[peft_model.active_adapter].embedding.weight
        if real.shape != weight.shape:
            raise ConfigError(f"tuning.prefix.init_from_real is not supported for model type "
                              f"{model.config.model_type!r}: its cache layout {tuple(real.shape)} does not match "
                              f"peft's prefix {tuple(weight.shape)}")
        with torch.no_grad():
            weight.copy_(real)
    return peft_model


def prompt(model: torch.nn.Module, cfg: TuningConfig) -> torch.nn.Module:
    """Prompt tuning (peft): trainable input embeddings of virtual tokens before the prompt."""
    from peft import PromptTuningConfig, PromptTuningInit, TaskType

    opts = cfg.prompt
    init = {"prompt_tuning_init": PromptTuningInit.SAMPLE_VOCAB}
    if opts.init_text is not None:
        init = {"prompt_tuning_init": PromptTuningInit.TEXT, "prompt_tuning_init_text": opts.init_text,
                # the tokenizer load_model already read, from the model's directory or the HF cache
                "tokenizer_name_or_path": model.name_or_path, "tokenizer_kwargs": {"local_files_only": True}}
    config = PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=opts.num_virtual_tokens, **init)
    return _peft(model, config, cls=prompt_tuned_causal_lm())


def top(model: torch.nn.Module, cfg: TuningConfig) -> torch.nn.Module:
    """The top ``tuning.top.layers`` transformer layers (and the final norm) of the model's own
    weights; everything below them, the embeddings and the head stay frozen, so the hidden states
    entering the lowest tuned layer are a fixed function of the input (frozen_prefix.py caches
    them)."""
    for p in model.parameters():
        p.requires_grad_(False)
    for module in tuned_top(model, cfg.top.layers, cfg.top.norm):
        for p in module.parameters():
            p.requires_grad_(True)
    return model


# Each scheme config.SCHEMES names (the one list, which config validation reads) is built by the
# function of its name above; a name without one fails here, at import.
SCHEMES: dict[str, Callable[[torch.nn.Module, TuningConfig], torch.nn.Module]] = {
    name: globals()[name] for name in CONFIG_SCHEMES
}


def lora_targets(model: torch.nn.Module) -> list[str]:
    """Default LoRA target modules for the model's architecture (ConfigError if unknown)."""
    kind = getattr(getattr(model, "config", None), "model_type", None)
    if kind in LORA_TARGETS:
        return list(LORA_TARGETS[kind])
    linear = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                     if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D"})
    raise ConfigError(f"tuning.lora.target_modules is required for model type {kind!r} (no default for it): "
                      f"name the attention projections to adapt, among its linear layers {', '.join(linear)}")


def _peft(model: torch.nn.Module, config, cls=None) -> torch.nn.Module:
    """``get_peft_model``, adapters in the base model's dtype (peft would make some float32:
    the precision of the trainable weights is ``tuning.trainable_dtype``'s business)."""
    from peft import get_peft_model

    with warnings.catch_warnings():  # transformers' deprecation notices, raised inside peft
        warnings.simplefilter("ignore", FutureWarning)
        if cls is None:
            return get_peft_model(model, config, autocast_adapter_dtype=False)
        config.base_model_name_or_path = model.__dict__.get("name_or_path") or None
        return cls(model, config, autocast_adapter_dtype=False)


@torch.no_grad()
def _real_prefix(model: torch.nn.Module, n: int) -> torch.Tensor:
    """MeZO's prefix initialisation: the keys and values that ``n`` random vocabulary tokens
    produce in every layer, laid out as peft's prefix embedding ``(n, layers * 2 * kv_dim)``
    (per virtual token: layer 0 keys, layer 0 values, layer 1 keys, ...). One forward of n tokens."""
    tokens = torch.randint(0, model.config.vocab_size, (1, n), device=model.device)
    cache = model(input_ids=tokens, use_cache=True).past_key_values
    layers = getattr(cache, "layers", None)
    if not layers or getattr(layers[0], "keys", None) is None:
        raise ConfigError(f"tuning.prefix.init_from_real is not supported for model type "
                          f"{model.config.model_type!r} (its cache has no per-layer keys/values)")
    per_layer = [t[0].transpose(0, 1) for layer in layers for t in (layer.keys, layer.values)]  # (n, heads, dim)
    return torch.stack(per_layer, dim=1).reshape(n, -1).float()
