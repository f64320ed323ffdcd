"""zotune: fine-tune language models with zeroth-order (forward-pass-only) optimizers."""

from . import optim
from .errors import ConfigError, DataError, ModelError, ZotuneError

__version__ = "0.1.0"


def load_model(*args, **kwargs):
    """Load a causal LM and its tokenizer; see :func:`zotune.models.load_model`."""
    from .models import load_model as _load

    return _load(*args, **kwargs)


__all__ = ["load_model", "optim", "ZotuneError", "ConfigError", "DataError", "ModelError", "__version__"]
