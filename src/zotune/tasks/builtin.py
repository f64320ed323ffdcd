"""The built-in tasks' YAML files (``builtin/*.yaml``), read as plain mappings: the one place that
lists them, below every module that needs them (the registry, and BIG-bench's one download)."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import yaml

BUILTIN_DIR = Path(__file__).parent / "builtin"


@cache
def builtin_tasks() -> dict[str, dict]:
    """Raw YAML mappings of the built-in tasks, by file name."""
    return {p.stem: yaml.safe_load(p.read_text(encoding="utf-8")) for p in sorted(BUILTIN_DIR.glob("*.yaml"))}
