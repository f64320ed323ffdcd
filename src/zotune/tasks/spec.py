"""Task specs are data: a prompt template, what is scored after it, a metric, a source.

Every task is scored by the language model itself (MeZO's prompt-based fine-tuning); its ``type``
(:mod:`zotune.tasks.types`: classification, multiple_choice, generation) says what its rows hold,
what is scored after the prompt and which metrics it reports.

A built-in task's YAML file and a user's inline ``task:`` mapping have the same keys
(:data:`SPEC_KEYS`) and both go through :func:`make_spec`.
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field, fields

from ..errors import ConfigError, DataError
from .bigbench import BIGBENCH_SIZE, BIGBENCH_SOURCE, BigBenchTask, bigbench_path, read_bigbench
from .example import Example
from .fetch import PACKAGES, PackageData
from .transforms import ROW_TRANSFORMS
from .types import TASK_TYPES, TaskType

TYPES = tuple(TASK_TYPES)
SOURCES = ("file", "hf", "package", "bigbench")
MASK = "mask"  # text_template's {mask}: where a masked LM reads the answer (LM-BFF: "<S> It was {mask} .")
SPLITS = ("per_class", "random")  # task.split: how train and dev are drawn


@dataclass(frozen=True)
class TaskSpec:
    """One task: how to render an example, what to score after the prompt, and where data lives.

    ``k_shot``, ``n_dev``, ``n_test`` and ``seed`` are the defaults of :func:`load_task`
    (config keys ``task.k_shot`` etc.); ``seed`` (None: the run seed) fixes the few-shot
    sample independently of the optimizer's seed, like MeZO's data seeds 13/21/42/87/100.
    """

    name: str
    text_template: str  # e.g. "{text} It was"; placeholders are data columns
    choices: dict[str, str] | None = None  # classification: label value (str) -> continuation
    type: str = "classification"  # "classification" | "multiple_choice" | "generation"
    label_column: str = "label"  # class label / gold candidate index or text / answer(s)
    candidates_column: str | tuple[str, ...] = "candidates"  # multiple_choice: list column, or columns
    choice_template: str = " {choice}"  # multiple_choice: continuation for one candidate
    max_new_tokens: int = 32  # generation: greedy decoding length (stops at a newline)
    metric: str = ""  # one of the type's metrics; "" -> its first
    align: bool = True  # False: no template/verbalizer, a linear head on the last hidden state
    source: str = "file"  # "file" | "hf" | "package"
    path: str | None = None  # .csv / .jsonl / .parquet (source=file), relative to the working directory
    test_path: str | None = None  # source=file: a separate file as the test pool (path is then all train/dev)
    hf: str | None = None  # "nyu-mll/glue:sst2" (source=hf): dataset:config on the Hugging Face hub, or a local folder
    hf_split: str = "validation"  # the hub split used as the test pool (its train split: the rest)
    rows: str | None = None  # a row transform of transforms.ROW_TRANSFORMS, applied whatever the source
    package: str | None = None  # key of a fetcher in fetch.PACKAGES (source=package)
    bigbench: dict | None = None  # source=bigbench: {task, pattern, rotate} (zotune.tasks.bigbench.BigBenchTask)
    eval_fraction: float = 0.2  # share of a single file held out as the test pool
    split: str = "per_class"  # "per_class": k_shot / n_dev per class (LM-BFF); "random": n_train / n_dev in all (MeZO OPT)
    k_shot: int | None = 16  # train examples per class (None: all non-test data minus dev)
    n_train: int = 1000  # split=random: train examples, drawn at random
    n_dev: int | None = None  # dev examples per class (None: k_shot, or a tenth if k_shot is None); random: in all (None: 500)
    n_test: int = 1000  # test examples (or all of the held-out pool, if fewer)
    seed: int | None = None  # few-shot sampling seed (None: the run seed)
    offline_alternative: str | None = None  # a task to suggest when this one's data is unreachable
    description: str = ""
    columns: tuple[str, ...] = field(default=(), init=False, repr=False)  # template placeholders

    def __post_init__(self) -> None:
        object.__setattr__(self, "columns", tuple(c for c in _placeholders(self.text_template) if c != MASK))

    @property
    def kind(self) -> TaskType:
        """The task type's behaviour (:mod:`zotune.tasks.types`)."""
        return TASK_TYPES[self.type]

    @property
    def bigbench_task(self) -> BigBenchTask:
        """source=bigbench: the BIG-bench task and how its examples become rows."""
        return BigBenchTask.from_spec(self.bigbench, self.type)

    @property
    def package_data(self) -> PackageData:
        """source=package: its fetcher; source=bigbench: the same view of its BIG-bench task (where it is
        cached, how it is read, what the first use downloads)."""
        if self.source == "package":
            return PACKAGES[self.package or ""]
        task = self.bigbench_task
        return PackageData(f"{BIGBENCH_SOURCE}, {task.path}/task.json", lambda: bigbench_path(task),
                           lambda: read_bigbench(task), BIGBENCH_SOURCE,
                           f"{BIGBENCH_SIZE}, streamed; every BIG-bench task at once")

    @property
    def labels(self) -> list[str]:
        """Classification: choice keys (label values as str), in order; otherwise []."""
        return list(self.choices or {})

    def continuations(self, example: Example) -> list[str]:
        """What is scored after the prompt, one per candidate (classification: the verbalizer)."""
        return self.kind.continuations(self, example)

    def target(self, example: Example) -> int:
        """Index of the gold continuation."""
        return self.kind.target(self, example)

    def render(self, fields: dict, mask: str = "") -> str:
        """The prompt for one example: the template filled with its fields, ``{mask}`` (where a
        masked LM reads the answer; a causal LM's continuation follows it) as ``mask``."""
        missing = [c for c in self.columns if c not in fields]
        if missing:
            raise DataError(f"task {self.name!r}: template column {missing[0]!r} is not in the data "
                            f"(columns: {', '.join(map(str, fields))})")
        return self.text_template.format_map({**fields, MASK: mask})

    @property
    def after_mask(self) -> str:
        """The template's text after ``{mask}`` ("" when it has none, or ends there)."""
        return self.text_template.partition("{" + MASK + "}")[2]


@dataclass
class TaskData:
    """A task's spec and its deterministic few-shot train / dev sample and test set."""

    spec: TaskSpec
    train: list[Example]
    dev: list[Example]
    test: list[Example]


SPEC_KEYS = tuple(f.name for f in fields(TaskSpec) if f.init)


def _placeholders(template: str) -> tuple[str, ...]:
    names = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    return tuple(dict.fromkeys(names))


def _template_columns(template: str, key: str, allow_bare: bool = False) -> tuple[str, ...]:
    """The ``{column}`` placeholders of a template; a bad template is a ConfigError."""
    try:
        columns = _placeholders(template)
    except ValueError as err:
        raise ConfigError(f"task.{key} {template!r} is not a valid template: {err}") from None
    bad = [c for c in columns if not c or c.isdigit() or any(ch in c for ch in ".[")]
    if (not columns and not allow_bare) or bad:
        raise ConfigError(f"task.{key} {template!r} must name data columns as {{column}} placeholders")
    return columns


def _check_source(raw: dict) -> None:
    """Where the data comes from: ``source`` (inferred when omitted) and the key it needs."""
    name = raw["name"]
    if "source" not in raw:
        raw["source"] = next((s for s in ("package", "hf", "bigbench") if raw.get(s)), "file")
    source = raw["source"]
    if source not in SOURCES:
        raise ConfigError(f"task.source must be one of {', '.join(SOURCES)}, got {source!r}")
    needed = {"file": "path", "hf": "hf", "package": "package", "bigbench": "bigbench"}[source]
    if not raw.get(needed):
        hint = " (a .csv, .jsonl or .parquet file)" if needed == "path" else ""
        raise ConfigError(f"task {name!r} with source {source!r} needs task.{needed}{hint}")
    if raw.get("test_path") is not None and source != "file":
        raise ConfigError(f"task.test_path is for a task read from a file (task.path); task {name!r} reads from {source}")
    if raw.get("rows") is not None:
        if raw["rows"] not in ROW_TRANSFORMS:
            raise ConfigError(f"unknown task.rows {raw['rows']!r}; row transforms: {', '.join(ROW_TRANSFORMS)}")
    if source == "package" and raw["package"] not in PACKAGES:
        raise ConfigError(f"unknown task.package {raw['package']!r}; known: {', '.join(PACKAGES)}")
    if source == "bigbench":
        BigBenchTask.from_spec(raw["bigbench"], raw.get("type", "classification"))


def _check_sampling(raw: dict) -> None:
    """How the test pool is held out and the few-shot train / dev sample drawn."""
    frac = raw.get("eval_fraction", 0.2)
    if isinstance(frac, bool) or not isinstance(frac, (int, float)) or not 0 < frac < 1:
        raise ConfigError(f"task.eval_fraction must be between 0 and 1 (exclusive), got {frac!r}")
    if raw.get("split", "per_class") not in SPLITS:
        raise ConfigError(f"task.split must be one of {', '.join(SPLITS)}, got {raw['split']!r}")
    _check_int(raw, "n_train", 1, nullable=False)
    _check_int(raw, "k_shot", 1, nullable=True)
    _check_int(raw, "n_dev", 0, nullable=True)
    _check_int(raw, "n_test", 1, nullable=False)
    _check_int(raw, "seed", 0, nullable=True)


def _check_templates(raw: dict) -> None:
    """text_template names data columns and not the label; a choice_template (what follows the prompt
    for a type without a verbalizer) holds ``{choice}``."""
    template = raw["text_template"]
    if not isinstance(template, str):  # e.g. YAML read an unquoted "{text}" as a mapping
        raise ConfigError(f"task.text_template must be a string (in YAML, quote a template that starts with "
                          f"'{{'), got {template!r}")
    label_column = raw.get("label_column", "label")
    if label_column in _template_columns(template, "text_template"):
        raise ConfigError(f"task.text_template must not show the label column {label_column!r}")
    if not TASK_TYPES[raw.get("type", "classification")].fixed_choices:
        choice = raw.get("choice_template", " {choice}")
        if "{choice}" not in choice:
            raise ConfigError("task.choice_template must contain {choice}")
        _template_columns(choice, "choice_template", allow_bare=True)


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
    task_type = raw.get("type", "classification")
    if task_type not in TASK_TYPES:
        raise ConfigError(f"task.type must be one of {', '.join(TASK_TYPES)}, got {task_type!r}")
    kind = TASK_TYPES[task_type]
    for key in kind.required:
        if key not in raw:
            raise ConfigError(f"task {name!r} needs {key!r} (or a built-in task.name; see `zotune tasks`)")
    for key in ("name", "label_column", "metric", "path", "test_path", "hf", "hf_split", "rows", "package",
                "choice_template"):
        if raw.get(key) is not None and not isinstance(raw[key], str):
            raise ConfigError(f"task.{key} must be a string, got {raw[key]!r}")
    _check_templates(raw)
    if not isinstance(raw.get("align", True), bool):
        raise ConfigError(f"task.align must be true or false, got {raw['align']!r}")
    kind.validate(raw)
    metric = raw.get("metric") or kind.metrics[0]
    if metric not in kind.metrics:
        raise ConfigError(f"task.metric for a {task_type} task must be one of {', '.join(kind.metrics)}, "
                          f"got {metric!r}")
    raw["metric"] = metric
    _check_int(raw, "max_new_tokens", 1, nullable=False)
    _check_source(raw)
    _check_sampling(raw)
    raw["description"] = " ".join(str(raw.get("description") or "").split())
    return TaskSpec(**raw)
