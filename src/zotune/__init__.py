"""zotune: fine-tune language models with zeroth-order (forward-pass-only) optimizers."""

from . import optim
from .errors import ConfigError, DataError, ModelError, ZotuneError
from .models import load_model  # a causal LM and its tokenizer

__version__ = "0.1.0"

__all__ = ["load_model", "optim", "ZotuneError", "ConfigError", "DataError", "ModelError", "__version__"]
