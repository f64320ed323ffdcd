"""Shared fixtures: tiny random models built in-process (no downloads)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM


def tiny_llama(dtype: torch.dtype = torch.float32, seed: int = 0) -> LlamaForCausalLM:
    """A 2-layer Llama with tied embeddings (like SmolLM2), ~30k parameters."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, max_position_embeddings=64, tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config).eval()
    return model.to(dtype)


@pytest.fixture
def tiny_batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 128, (4, 12), generator=g)
    return {"input_ids": ids, "labels": ids}
