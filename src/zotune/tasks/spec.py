"""Task specs are data: a prompt template, a verbalizer (label -> continuation), a source.

A built-in task's YAML file and a user's inline ``task:`` mapping have the same keys
(:data:`SPEC_KEYS`) and both go through :func:`make_spec`.
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field, fields

from ..errors import ConfigError, DataError

METRICS = ("accuracy", "macro_f1")
SOURCES = ("file", "hf", "package")


@dataclass(frozen=True)
class TaskSpec:
    """One classification task scored by the log-likelihood of each choice's continuation.

    ``k_shot``, ``n_dev``, ``n_test`` and ``seed`` are the defaults of :func:`load_task`
    (config keys ``task.k_shot`` etc.); ``seed`` (None: the run seed) fixes the few-shot
    sample independently of the optimizer's seed, like MeZO's data seeds 13/21/42/87/100.
    """

    name: str
    text_template: str  # e.g. "{text} It was"; placeholders are data columns
    choices: dict[str, str]  # label value (str) -> continuation, e.g. {"0": " terrible"}
    label_column: str = "label"
    metric: str = "accuracy"  # "accuracy" | "macro_f1"
    source: str = "file"  # "file" | "hf" | "package"
    path: str | None = None  # .csv / .jsonl (source=file), relative to the working directory
    hf: str | None = None  # "glue/sst2" (source=hf): dataset/config on the Hugging Face hub
    hf_split: str = "validation"  # the hub split used as the test pool (its train split: the rest)
    package: str | None = None  # key of a fetcher in fetch.PACKAGES (source=package)
    eval_fraction: float = 0.2  # share of a single file held out as the test pool
    k_shot: int | None = 16  # train examples per class (None: all non-test data minus dev)
    n_dev: int | None = None  # dev examples per class (None: k_shot, or a tenth if k_shot is None)
    n_test: int = 1000  # test examples (or all of the held-out pool, if fewer)
    seed: int | None = None  # few-shot sampling seed (None: the run seed)
    offline_alternative: str | None = None  # a task to suggest when this one's data is unreachable
    description: str = ""
    columns: tuple[str, ...] = field(default=(), init=False, repr=False)  # template placeholders

    def __post_init__(self) -> None:
        object.__setattr__(self, "columns", _placeholders(self.text_template))

    @property
    def labels(self) -> list[str]:
        """Choice keys (label values as str), in order."""
        return list(self.choices)

    def render(self, fields: dict) -> str:
        """The prompt for one example: the template filled with its fields."""
        missing = [c for c in self.columns if c not in fields]
        if missing:
            raise DataError(f"task {self.name!r}: template column {missing[0]!r} is not in the data "
                            f"(columns: {', '.join(map(str, fields))})")
        return self.text_template.format_map(fields)


@dataclass(frozen=True)
class Example:
    fields: dict[str, str]  # the example's fields as read from the data (every column but the label)
    label: str  # always a key of the spec's choices


@dataclass
class TaskData:
    spec: TaskSpec
    train: list[Example]
    dev: list[Example]
    test: list[Example]


SPEC_KEYS = tuple(f.name for f in fields(TaskSpec) if f.init)


def _placeholders(template: str) -> tuple[str, ...]:
    names = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    return tuple(dict.fromkeys(names))


def _check_int(raw: dict, key: str, low: int, nullable: bool) -> None:
    v = raw.get(key)
    if key not in raw or (v is None and nullable):
        return
    if not isinstance(v, int) or isinstance(v, bool) or v < low:
        raise ConfigError(f"task.{key} must be an integer >= {low}{' or null' if nullable else ''}, got {v!r}")


def make_spec(raw: dict, default_name: str = "custom") -> TaskSpec:
    """Validate a plain mapping (YAML file or inline config) into a :class:`TaskSpec`.

    ``source`` may be omitted: it is inferred from ``package`` / ``hf`` / ``path``.
    """
    unknown = sorted(set(map(str, raw)) - set(SPEC_KEYS))
    if unknown:
        raise ConfigError(f"unknown task key {unknown[0]!r}; valid keys: {', '.join(SPEC_KEYS)}")
    raw = {"name": default_name, **raw}
    name = raw["name"]
    for key in ("text_template", "choices"):
        if key not in raw:
            raise ConfigError(f"task {name!r} needs {key!r} (or a built-in task.name; see `zotune tasks`)")
    for key in ("name", "label_column", "metric", "path", "hf", "hf_split", "package"):
        if raw.get(key) is not None and not isinstance(raw[key], str):
            raise ConfigError(f"task.{key} must be a string, got {raw[key]!r}")
    template = raw["text_template"]
    if not isinstance(template, str):  # e.g. YAML read an unquoted "{text}" as a mapping
        raise ConfigError(f"task.text_template must be a string (in YAML, quote a template that starts with "
                          f"'{{'), got {template!r}")
    try:
        columns = _placeholders(template)
    except ValueError as err:
        raise ConfigError(f"task.text_template {template!r} is not a valid template: {err}") from None
    bad = [c for c in columns if not c or c.isdigit() or any(ch in c for ch in ".[")]
    if not columns or bad:
        raise ConfigError(f"task.text_template {template!r} must name data columns as {{column}} placeholders")
    label_column = raw.get("label_column", "label")
    if label_column in columns:
        raise ConfigError(f"task.text_template must not show the label column {label_column!r}")
    choices = raw["choices"]
    if not isinstance(choices, dict) or len({str(k) for k in choices}) < 2:
        raise ConfigError("task.choices must map at least two label values to continuations")
    if any(not isinstance(v, str) or not v for v in choices.values()):
        raise ConfigError("task.choices continuations must be non-empty strings, e.g. {0: ' terrible', 1: ' great'}")
    raw["choices"] = {str(k): v for k, v in choices.items()}
    if raw.get("metric", "accuracy") not in METRICS:
        raise ConfigError(f"task.metric must be one of {', '.join(METRICS)}, got {raw['metric']!r}")
    if "source" not in raw:
        raw["source"] = "package" if raw.get("package") else "hf" if raw.get("hf") else "file"
    source = raw["source"]
    if source not in SOURCES:
        raise ConfigError(f"task.source must be one of {', '.join(SOURCES)}, got {source!r}")
    needed = {"file": "path", "hf": "hf", "package": "package"}[source]
    if not raw.get(needed):
        hint = " (a .csv or .jsonl file)" if needed == "path" else ""
        raise ConfigError(f"task {name!r} with source {source!r} needs task.{needed}{hint}")
    if source == "package":
        from .fetch import PACKAGES

        if raw["package"] not in PACKAGES:
            raise ConfigError(f"unknown task.package {raw['package']!r}; known: {', '.join(PACKAGES)}")
    frac = raw.get("eval_fraction", 0.2)
    if isinstance(frac, bool) or not isinstance(frac, (int, float)) or not 0 < frac < 1:
        raise ConfigError(f"task.eval_fraction must be between 0 and 1 (exclusive), got {frac!r}")
    _check_int(raw, "k_shot", 1, nullable=True)
    _check_int(raw, "n_dev", 0, nullable=True)
    _check_int(raw, "n_test", 1, nullable=False)
    _check_int(raw, "seed", 0, nullable=True)
    raw["description"] = " ".join(str(raw.get("description") or "").split())
    return TaskSpec(**raw)
