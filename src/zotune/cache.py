"""Where zotune keeps converted models and fetched data: ``$ZOTUNE_CACHE`` or ``~/.cache/zotune``."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    """Return (and create) a directory under the zotune cache."""
    root = Path(os.environ.get("ZOTUNE_CACHE") or Path.home() / ".cache" / "zotune")
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
