"""Task specs are data: a prompt template, a verbalizer (label -> continuation), a source."""

from __future__ import annotations

import string
from dataclasses import dataclass, field, fields

from ..errors import ConfigError, DataError

METRICS = ("accuracy", "macro_f1")
SOURCES = ("file", "hf", "package")


@dataclass(frozen=True)
class TaskSpec:
    """One classification task scored by candidate log-likelihood (see CONTRACT.md)."""

    name: str
    text_template: str  # e.g. "{text} It was"; placeholders are data columns
    choices: dict[str, str]  # label value (str) -> continuation, e.g. {"0": " terrible"}
    label_column: str = "label"
    metric: str = "accuracy"
    source: str = "file"
    path: str | None = None  # .csv / .jsonl (source=file)
    hf: str | None = None  # "glue/sst2" (source=hf)
    hf_split: str = "validation"  # the hub split used as the test pool
    package: str | None = None  # fetcher name (source=package)
    eval_fraction: float = 0.2  # share of a single file held out for test
    k_shot: int | None = 16  # train examples per class (None: all non-test data)
    n_dev: int | None = None  # dev examples per class (None: same as k_shot)
    n_test: int = 1000  # test examples (or all, if fewer)
    description: str = ""
    columns: tuple[str, ...] = field(default=(), init=False)

    def __post_init__(self) -> None:
        cols = tuple(f for _, f, _, _ in string.Formatter().parse(self.text_template) if f)
        object.__setattr__(self, "columns", cols)

    @property
    def labels(self) -> list[str]:
        return list(self.choices)

    def render(self, row: dict[str, str]) -> str:
        """The prompt for one example."""
        try:
            return self.text_template.format(**row)
        except KeyError as err:
            raise DataError(f"task {self.name!r}: template column {err.args[0]!r} is not in the data") from None


@dataclass(frozen=True)
class Example:
    fields: dict[str, str]  # the example's text fields as read (not the label)
    label: str  # always a key of the spec's choices


@dataclass
class TaskData:
    spec: TaskSpec
    train: list[Example]
    dev: list[Example]
    test: list[Example]


SPEC_KEYS = tuple(f.name for f in fields(TaskSpec) if f.init)


def make_spec(raw: dict, default_name: str = "custom") -> TaskSpec:
    """Validate a plain mapping (YAML or inline config) into a :class:`TaskSpec`."""
    unknown = sorted(set(raw) - set(SPEC_KEYS) - {"seed"})
    if unknown:
        raise ConfigError(f"unknown task key {unknown[0]!r}; valid keys: {', '.join(SPEC_KEYS)}")
    raw = {k: v for k, v in raw.items() if k != "seed"}
    raw.setdefault("name", default_name)
    for key in ("text_template", "choices"):
        if key not in raw:
            raise ConfigError(f"task {raw['name']!r} needs {key!r} (or use a built-in task.name; see `zotune tasks`)")
    choices = raw["choices"]
    if not isinstance(choices, dict) or len(choices) < 2:
        raise ConfigError("task.choices must map at least two label values to continuations")
    raw["choices"] = {str(k): str(v) for k, v in choices.items()}
    if not isinstance(raw["text_template"], str) or not raw["text_template"].strip():
        raise ConfigError("task.text_template must be a non-empty string")
    try:
        list(string.Formatter().parse(raw["text_template"]))
    except ValueError as err:
        raise ConfigError(f"task.text_template is not a valid template: {err}") from None
    if raw.get("metric", "accuracy") not in METRICS:
        raise ConfigError(f"task.metric must be one of {', '.join(METRICS)}, got {raw['metric']!r}")
    if "hf" in raw and "source" not in raw:
        raw["source"] = "hf"
    if raw.get("source", "file") not in SOURCES:
        raise ConfigError(f"task.source must be one of {', '.join(SOURCES)}, got {raw['source']!r}")
    frac = raw.get("eval_fraction", 0.2)
    if not isinstance(frac, (int, float)) or not 0 < frac < 1:
        raise ConfigError(f"task.eval_fraction must be between 0 and 1, got {frac!r}")
    for key in ("k_shot", "n_dev"):
        v = raw.get(key)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise ConfigError(f"task.{key} must be an integer >= 1 or null, got {v!r}")
    n_test = raw.get("n_test", 1000)
    if not isinstance(n_test, int) or isinstance(n_test, bool) or n_test < 1:
        raise ConfigError(f"task.n_test must be an integer >= 1, got {n_test!r}")
    if raw.get("source", "file") == "file" and not raw.get("path"):
        raise ConfigError("task.path is required for a task read from a file (.csv or .jsonl)")
    try:
        spec = TaskSpec(**raw)
    except TypeError as err:
        raise ConfigError(f"invalid task spec: {err}") from None
    return spec
