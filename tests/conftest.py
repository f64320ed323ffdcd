"""Shared fixtures: tiny random models built in-process (no downloads)."""

from __future__ import annotations

import functools
import json
import tempfile
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM


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


COMMON_TOKENS = 4096


@functools.lru_cache(maxsize=None)
def _small_tokenizer_dir() -> Path:
    """The embedded model's tokenizer cut down to its first ``COMMON_TOKENS`` tokens (the most frequent
    merges: a byte-level BPE merge's token comes after both of its parts, so the cut is closed), the
    tokens that the built-in tasks' texts use (with every token their merges pass through) and every
    single character and special token: the same tokens for the tasks' texts, shorter pieces for rare
    words elsewhere. Its tokenizer.json is ~18 times smaller (5.5k of 49k tokens), so a tiny test model
    loads in milliseconds instead of ~0.4 s, and its embeddings are ~9 times smaller. The tests' own
    text plays no part: editing a test changes neither the vocabulary nor the tiny models' weights."""
    from zotune.models.loader import resolve_source

    full = AutoTokenizer.from_pretrained(resolve_source("smollm2-135m"))  # the embedded model's (no download)
    path = Path(tempfile.mkdtemp(prefix="zotune-test-tokenizer-"))
    full.save_pretrained(path)
    data = json.loads((path / "tokenizer.json").read_text(encoding="utf-8"))
    vocab, merges = data["model"]["vocab"], data["model"]["merges"]
    tasks = Path(__file__).resolve().parent.parent / "src" / "zotune" / "tasks"
    texts = [f.read_text(encoding="utf-8") for f in sorted(tasks.rglob("*"))
             if f.is_file() and f.suffix in (".py", ".yaml", ".json", ".txt")]
    parents = {a + b: (a, b) for a, b in (m.split(" ") if isinstance(m, str) else m for m in merges)}
    keep = {t for t, i in vocab.items() if len(t) == 1 or i < COMMON_TOKENS} | {t["content"] for t in data["added_tokens"]}
    lines = [line for text in texts for line in text.splitlines() if line.strip()]
    todo = [t for e in full.backend_tokenizer.encode_batch(lines, add_special_tokens=False) for t in e.tokens]
    while todo:
        token = todo.pop()
        if token not in keep:
            keep.add(token)
            todo.extend(parents.get(token, ()))
    ids = {t: i for i, t in enumerate(sorted(keep, key=vocab.__getitem__))}
    data["model"]["vocab"] = ids
    data["model"]["merges"] = [m for m in merges if (m.replace(" ", "", 1) if isinstance(m, str) else "".join(m)) in ids]
    for token in data["added_tokens"]:
        token["id"] = ids[token["content"]]
    (path / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    config = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
    if "added_tokens_decoder" in config:
        config["added_tokens_decoder"] = {str(ids[t["content"]]): t for t in config["added_tokens_decoder"].values()}
    (path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return path


def small_tokenizer():
    """A fresh copy of the tests' small tokenizer (:func:`_small_tokenizer_dir`)."""
    return AutoTokenizer.from_pretrained(_small_tokenizer_dir())


def write_tiny_llama(path: Path) -> Path:
    """A tiny random Llama (seed 0) saved as an HF directory, with the tests' small tokenizer."""
    tokenizer = small_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, vocab_size=len(tokenizer), max_position_embeddings=256,
        tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def write_tiny_opt(path: Path) -> Path:
    """A tiny random OPT (the papers' model family; seed 0) saved as an HF directory, with the
    tests' small tokenizer."""
    from transformers import OPTConfig, OPTForCausalLM

    tokenizer = small_tokenizer()
    torch.manual_seed(0)
    config = OPTConfig(hidden_size=16, ffn_dim=32, num_hidden_layers=2, num_attention_heads=2, word_embed_proj_dim=16,
                       vocab_size=len(tokenizer), max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, dropout=0.1)
    OPTForCausalLM(config).save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def write_tiny_roberta(path: Path) -> Path:
    """A tiny random RoBERTa saved as RobertaForMaskedLM (seed 0), with the tests' small tokenizer
    plus a mask token."""
    from transformers import RobertaConfig, RobertaForMaskedLM

    tokenizer = small_tokenizer()
    tokenizer.add_special_tokens({"mask_token": "<mask>"})
    torch.manual_seed(0)
    config = RobertaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                           vocab_size=len(tokenizer), max_position_embeddings=300, pad_token_id=tokenizer.pad_token_id,
                           type_vocab_size=1)
    RobertaForMaskedLM(config).save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def write_reviews_csv(path: Path) -> Path:
    """A small two-class CSV whose label is readable from the words (learnable)."""
    good = ["a wonderful film", "great acting and a moving story", "i loved every minute", "a delight"]
    bad = ["a boring mess", "terrible acting and a dull plot", "i hated every minute", "a waste of time"]
    rows = [f'"{t} number {i}",1' for i in range(10) for t in good] + [f'"{t} number {i}",0' for i in range(10) for t in bad]
    path.write_text("text,label\n" + "\n".join(rows) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama saved as an HF directory, with the tests' small tokenizer."""
    return write_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_opt_dir(tmp_path_factory):
    """A tiny random OPT saved as an HF directory, with the tests' small tokenizer."""
    return write_tiny_opt(tmp_path_factory.mktemp("tiny-opt"))


@pytest.fixture(scope="session")
def tiny_roberta_dir(tmp_path_factory):
    """A tiny random masked LM (RoBERTa) saved as an HF directory."""
    return write_tiny_roberta(tmp_path_factory.mktemp("tiny-roberta"))


@pytest.fixture
def reviews_csv(tmp_path):
    """A small two-class CSV whose label is readable from the words (learnable)."""
    return write_reviews_csv(tmp_path / "reviews.csv")


@pytest.fixture
def under_the_mode(monkeypatch):
    """The tiny models' trainable sets are small enough to be perturbed in place: under the perturbation mode
    instead, as a large model's are (the dual forward and the fused update act there)."""
    from zotune.estimators.perturb import Perturbation

    monkeypatch.setattr(Perturbation, "in_place_numel", 0)


def counting_draws(sampler) -> list[tuple[int, int]]:
    """Record the (key, chunk index) of every chunk of z ``sampler`` generates from then on."""
    drawn: list[tuple[int, int]] = []
    draw = sampler._draw
    sampler._draw = lambda key, index, *a: drawn.append((key, index)) or draw(key, index, *a)
    return drawn
