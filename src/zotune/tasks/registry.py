"""Built-in tasks (YAML files in ``builtin/``) and resolution of the config's ``task`` section."""

from __future__ import annotations

import difflib
from functools import cache
from pathlib import Path

import yaml

from ..errors import ConfigError
from .fetch import DESCRIPTIONS, polarity_path
from .spec import TaskSpec, make_spec

_BUILTIN = Path(__file__).parent / "builtin"


@cache
def builtin_tasks() -> dict[str, dict]:
    return {p.stem: yaml.safe_load(p.read_text(encoding="utf-8")) for p in sorted(_BUILTIN.glob("*.yaml"))}


def task_spec(cfg: dict) -> TaskSpec:
    """``{"name": builtin, ...overrides}`` or an inline spec -> TaskSpec."""
    if not isinstance(cfg, dict):
        raise ConfigError(f"config key 'task' must be a mapping, got {cfg!r}")
    name = cfg.get("name")
    builtins = builtin_tasks()
    if name in builtins:
        return make_spec({**builtins[name], **cfg}, default_name=name)
    if name is not None and "text_template" not in cfg:
        near = difflib.get_close_matches(str(name), list(builtins), n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else f"; built-in tasks: {', '.join(builtins)}"
        raise ConfigError(f"unknown task {name!r}{hint}")
    return make_spec(dict(cfg))


def list_tasks() -> list[dict[str, str]]:
    """Name, description and where the data comes from on this machine."""
    rows = []
    for name, raw in builtin_tasks().items():
        spec = make_spec(raw, default_name=name)
        if spec.source == "package":
            cached = polarity_path()
            where = f"{DESCRIPTIONS.get(spec.package or '', spec.package)}; " + (
                f"cached at {cached}" if cached.is_file() else "fetched at first use"
            )
        elif spec.source == "hf":
            where = f"Hugging Face hub {spec.hf} (online only; needs `pip install datasets`)"
        else:
            where = f"file {spec.path}"
        rows.append({"name": name, "description": " ".join(spec.description.split()), "source": where})
    return rows
