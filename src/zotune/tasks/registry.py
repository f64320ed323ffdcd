"""Built-in tasks (YAML files in ``builtin/``, same keys as an inline spec) and resolution of
the config's ``task`` section."""

from __future__ import annotations

import difflib
import importlib.util

from ..errors import ConfigError
from .builtin import builtin_tasks
from .spec import TaskSpec, make_spec

_DATA_KEYS = ("source", "path", "test_path", "hf", "hf_split", "package", "bigbench")
_SOURCE_KEYS = {"path", "hf", "package", "bigbench"}


def task_spec(cfg: dict) -> TaskSpec:
    """The config's ``task`` mapping -> TaskSpec.

    ``{"name": builtin}`` plus optional overrides of any key (overriding ``path`` / ``hf`` /
    ``package`` replaces the built-in's data source and keeps its row transform ``rows``, so a hub
    task reads local files in the hub's layout), or a full inline spec (``name`` optional).
    """
    if not isinstance(cfg, dict):
        raise ConfigError(f"config key 'task' must be a mapping, got {cfg!r}")
    name = cfg.get("name")
    builtins = builtin_tasks()
    if isinstance(name, str) and name in builtins:
        base = builtins[name]
        if _SOURCE_KEYS & cfg.keys():  # another source; another copy of a hub dataset keeps its splits
            keep = ("hf_split",) if "hf" in cfg and base.get("source") == "hf" else ()
            base = {k: v for k, v in base.items() if k not in _DATA_KEYS or k in keep}
        return make_spec({**base, **cfg}, default_name=name)
    if name is not None and "text_template" not in cfg:
        near = difflib.get_close_matches(str(name), list(builtins), n=1)
        hint = f"did you mean {near[0]!r}?" if near else f"built-in tasks: {', '.join(builtins)}"
        raise ConfigError(f"unknown task {name!r} ({hint}; or give an inline spec with path, text_template, choices)")
    return make_spec(dict(cfg))


def list_tasks() -> list[dict]:
    """Per built-in task: ``name``, ``type``, ``metric``, ``description``, ``source`` (where its
    data comes from on this machine) and, when the data is already local, ``train`` / ``test``:
    the sizes of the train pool and the held-out test pool (``None`` otherwise; nothing is
    downloaded to list tasks). Evaluation uses at most ``n_test`` of the test pool."""
    rows = []
    for name, raw in builtin_tasks().items():
        spec = make_spec(raw, default_name=name)
        train = test = None
        if spec.source in ("package", "bigbench"):
            pkg = spec.package_data
            origin = pkg.source or pkg.description
            if pkg.path().is_file():
                where = f"{origin}, cached"
                n = len(pkg.read())
                test = max(1, round(n * spec.eval_fraction))
                train = n - test
            else:
                where = f"{origin}, fetched at first use ({pkg.download or 'once'})"
        elif spec.source == "hf":
            notes = ["online, or from the local HF cache"]
            if importlib.util.find_spec("datasets") is None:
                notes.append("needs `pip install 'zotune[hub]'`")
            if spec.offline_alternative:
                notes.append(f"offline: {spec.offline_alternative}")
            where = f"HF hub {spec.hf} ({'; '.join(notes)})"
        else:
            where = f"file {spec.path}"
        rows.append({"name": name, "type": spec.type, "metric": spec.metric, "description": spec.description,
                     "source": where, "train": train, "test": test})
    return rows
