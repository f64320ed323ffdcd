"""Model loading: embedded default, GGUF, local directories, hub ids."""

from .loader import DEFAULT_MODEL, embedded_gguf, load_model, resolve_dtype

__all__ = ["DEFAULT_MODEL", "embedded_gguf", "load_model", "resolve_dtype"]
