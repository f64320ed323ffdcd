"""Greedy decoding with a KV cache, positions and peft's virtual tokens handled by zotune.

Why not ``model.generate``: under peft prompt learning (prefix and prompt tuning) generation
goes through ``PeftModelForCausalLM.prepare_inputs_for_generation``, which reads the cache from
``model_kwargs["past_key_values"]`` and the prefill step from ``cache_position``. transformers
5.24 renamed the first to ``cache`` and stopped passing the second, so peft 0.21.2 re-injects the
virtual prompt on every decoding step and shifts the padding mask by the prefix length: a prefix-
or prompt-tuned model's greedy answer then depends on what else is in its batch (peft issue
tracker: prompt learning with the transformers ``cache`` rename, huggingface/peft; zotune issue
20). Decoding here uses only each model's ``forward``, as scoring does, so it holds on every
version: the virtual tokens enter once, in the prefill, exactly as in training (prefix: peft's
key/value cache, real tokens at positions ``n + i``; prompt: peft's embeddings at positions
``0..n-1``, real tokens at ``n + i``), and each later step feeds one token with its position.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..models.loader import forward_params


def greedy_decode(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  position_ids: torch.Tensor, max_new_tokens: int,
                  finished: Callable[[list[int]], bool]) -> list[list[int]]:
    """The greedy continuation of each left-padded row: at most ``max_new_tokens`` tokens, ending
    with the token after which ``finished(new_ids)`` holds. Rows are independent of each other."""
    batch = input_ids.shape[0]
    runner, kwargs, n_virtual = _prefill(model, input_ids, attention_mask, position_ids)
    cache_key = _cache_keyword(runner)
    keep = {"logits_to_keep": 1} if "logits_to_keep" in forward_params(runner) else {}
    mask, position = kwargs["attention_mask"], position_ids[:, -1:] + n_virtual
    new: list[list[int]] = [[] for _ in range(batch)]
    done = [False] * batch
    out = runner(**kwargs, use_cache=True, **keep)
    for i in range(max_new_tokens):
        token = out.logits[:, -1, :].argmax(-1)
        for row, t in enumerate(token.tolist()):
            if not done[row]:
                new[row].append(t)
                done[row] = finished(new[row])
        if all(done) or i == max_new_tokens - 1:
            break
        cache = out.get("cache", None)  # transformers >= 5.24 names it cache
        mask = torch.cat((mask, mask.new_ones((batch, 1))), dim=1)
        position = position + 1
        step = {"input_ids": token[:, None], "attention_mask": mask,
                cache_key: out.past_key_values if cache is None else cache}
        if "position_ids" in kwargs:
            step["position_ids"] = position
        out = runner(**step, use_cache=True, **keep)
    return new


def _cache_keyword(runner: torch.nn.Module) -> str:
    """The keyword ``forward`` takes its KV cache by: ``cache`` since transformers 5.24."""
    return "cache" if "cache" in forward_params(runner) else "past_key_values"


def _prefill(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
             position_ids: torch.Tensor) -> tuple[torch.nn.Module, dict, int]:
    """(the module every step calls, the prefill's keyword arguments, number of virtual tokens)."""
    config = getattr(model, "active_peft_config", None)
    prompt_learning = bool(getattr(config, "is_prompt_learning", False))
    runner = model.get_base_model() if prompt_learning else model
    takes_positions = "position_ids" in forward_params(runner)
    n = config.num_virtual_tokens if prompt_learning else 0
    batch = input_ids.shape[0]
    kwargs: dict = {"attention_mask": torch.cat((attention_mask.new_ones((batch, n)), attention_mask), dim=1)}
    if prompt_learning and str(getattr(config.peft_type, "value", config.peft_type)) == "PREFIX_TUNING":
        kwargs.update(input_ids=input_ids, **{_cache_keyword(runner): model.get_prompt(batch_size=batch)})
        if takes_positions:
            kwargs["position_ids"] = position_ids + n
    elif prompt_learning:  # prompt tuning: peft's virtual embeddings before the tokens
        embeds = model.word_embeddings(input_ids)
        virtual = model.get_prompt(batch_size=batch).to(embeds.dtype)
        kwargs["inputs_embeds"] = torch.cat((virtual, embeds), dim=1)
        if takes_positions:
            first = torch.arange(n, device=position_ids.device, dtype=position_ids.dtype).expand(batch, n)
            kwargs["position_ids"] = torch.cat((first, position_ids + n), dim=1)
    else:
        kwargs["input_ids"] = input_ids
        if takes_positions:
            kwargs["position_ids"] = position_ids
    return runner, kwargs, n
