"""Task specs are data: a prompt template, what is scored after it, a metric, a source.

Three task types, all scored by the language model itself (MeZO's prompt-based fine-tuning):

* ``classification``: a fixed verbalizer ``choices`` (label -> continuation, e.g.
  ``{0: " terrible", 1: " great"}``); the choice with the highest log-likelihood wins.
* ``multiple_choice``: each example brings its own candidates (``candidates_column``: a column
  holding a list, or a list of columns), each rendered by ``choice_template``; the label is the
  gold candidate's index (or its text). COPA, WinoGrande, ReCoRD.
* ``generation``: the label column holds the answer (or a list of accepted answers); training
  uses the answer's likelihood, evaluation decodes greedily (``max_new_tokens``) and scores
  SQuAD-style F1 / exact match. SQuAD, DROP.

A built-in task's YAML file and a user's inline ``task:`` mapping have the same keys
(:data:`SPEC_KEYS`) and both go through :func:`make_spec`.
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field, fields

from ..errors import ConfigError, DataError
from .transforms import ROW_TRANSFORMS

TYPES = ("classification", "multiple_choice", "generation")
METRICS = {  # metrics each task type can report (the first is the default)
    "classification": ("accuracy", "macro_f1"),
    "multiple_choice": ("accuracy",),
    "generation": ("f1", "exact_match"),
}
SOURCES = ("file", "hf", "package")
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
    metric: str = ""  # see METRICS; "" -> the type's first
    align: bool = True  # False: no template/verbalizer, a linear head on the last hidden state
    source: str = "file"  # "file" | "hf" | "package"
    path: str | None = None  # .csv / .jsonl / .parquet (source=file), relative to the working directory
    test_path: str | None = None  # source=file: a separate file as the test pool (path is then all train/dev)
    hf: str | None = None  # "nyu-mll/glue:sst2" (source=hf): dataset:config on the Hugging Face hub, or a local folder
    hf_split: str = "validation"  # the hub split used as the test pool (its train split: the rest)
    rows: str | None = None  # a row transform of transforms.ROW_TRANSFORMS, applied whatever the source
    package: str | None = None  # key of a fetcher in fetch.PACKAGES (source=package)
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
    def labels(self) -> list[str]:
        """Classification: choice keys (label values as str), in order; otherwise []."""
        return list(self.choices or {})

    def continuations(self, example: Example) -> list[str]:
        """What is scored after the prompt, one per candidate (classification: the verbalizer)."""
        if self.type == "classification":
            return list((self.choices or {}).values())
        return [self.choice_template.format_map({**example.fields, "choice": c}) for c in example.candidates]

    def target(self, example: Example) -> int:
        """Index of the gold continuation (classification and multiple_choice)."""
        return self.labels.index(example.label) if self.type == "classification" else int(example.label)

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


@dataclass(frozen=True)
class Example:
    fields: dict[str, str]  # the example's fields as read from the data (every column but the label)
    label: str  # classification: a key of choices; multiple_choice: gold index; generation: answers[0]
    candidates: tuple[str, ...] = ()  # multiple_choice: this example's candidates
    answers: tuple[str, ...] = ()  # generation: every accepted answer


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
    if task_type not in TYPES:
        raise ConfigError(f"task.type must be one of {', '.join(TYPES)}, got {task_type!r}")
    for key in ("text_template",) + (("choices",) if task_type == "classification" else ()):
        if key not in raw:
            raise ConfigError(f"task {name!r} needs {key!r} (or a built-in task.name; see `zotune tasks`)")
    for key in ("name", "label_column", "metric", "path", "test_path", "hf", "hf_split", "rows", "package",
                "choice_template"):
        if raw.get(key) is not None and not isinstance(raw[key], str):
            raise ConfigError(f"task.{key} must be a string, got {raw[key]!r}")
    template = raw["text_template"]
    if not isinstance(template, str):  # e.g. YAML read an unquoted "{text}" as a mapping
        raise ConfigError(f"task.text_template must be a string (in YAML, quote a template that starts with "
                          f"'{{'), got {template!r}")
    columns = _template_columns(template, "text_template")
    label_column = raw.get("label_column", "label")
    if label_column in columns:
        raise ConfigError(f"task.text_template must not show the label column {label_column!r}")
    if task_type == "classification":
        choices = raw["choices"]
        if not isinstance(choices, dict) or len({str(k) for k in choices}) < 2:
            raise ConfigError("task.choices must map at least two label values to continuations")
        if any(not isinstance(v, str) or not v for v in choices.values()):
            raise ConfigError("task.choices continuations must be non-empty strings, e.g. {0: ' terrible', 1: ' great'}")
        raw["choices"] = {str(k): v for k, v in choices.items()}
    elif raw.get("choices") is not None:
        raise ConfigError(f"task.choices is for classification tasks; a {task_type} task takes "
                          + ("candidates_column" if task_type == "multiple_choice" else "its answers from label_column"))
    if task_type == "multiple_choice":
        cand = raw.get("candidates_column", "candidates")
        if isinstance(cand, list) and len(cand) >= 2 and all(isinstance(c, str) for c in cand):
            raw["candidates_column"] = tuple(cand)
        elif not isinstance(cand, str):
            raise ConfigError("task.candidates_column must be a column holding a list of candidates, "
                              f"or a list of at least two columns, got {cand!r}")
        if "{choice}" not in raw.get("choice_template", " {choice}"):
            raise ConfigError("task.choice_template must contain {choice}")
        _template_columns(raw.get("choice_template", " {choice}"), "choice_template", allow_bare=True)
    metric = raw.get("metric") or METRICS[task_type][0]
    if metric not in METRICS[task_type]:
        raise ConfigError(f"task.metric for a {task_type} task must be one of {', '.join(METRICS[task_type])}, "
                          f"got {metric!r}")
    raw["metric"] = metric
    if not isinstance(raw.get("align", True), bool):
        raise ConfigError(f"task.align must be true or false, got {raw['align']!r}")
    if raw.get("align") is False and task_type != "classification":
        raise ConfigError("task.align: false (a linear head instead of the verbalizer) needs a classification task")
    _check_int(raw, "max_new_tokens", 1, nullable=False)
    if "source" not in raw:
        raw["source"] = "package" if raw.get("package") else "hf" if raw.get("hf") else "file"
    source = raw["source"]
    if source not in SOURCES:
        raise ConfigError(f"task.source must be one of {', '.join(SOURCES)}, got {source!r}")
    needed = {"file": "path", "hf": "hf", "package": "package"}[source]
    if not raw.get(needed):
        hint = " (a .csv, .jsonl or .parquet file)" if needed == "path" else ""
        raise ConfigError(f"task {name!r} with source {source!r} needs task.{needed}{hint}")
    if raw.get("test_path") is not None and source != "file":
        raise ConfigError(f"task.test_path is for a task read from a file (task.path); task {name!r} reads from {source}")
    if raw.get("rows") is not None:
        if raw["rows"] not in ROW_TRANSFORMS:
            raise ConfigError(f"unknown task.rows {raw['rows']!r}; row transforms: {', '.join(ROW_TRANSFORMS)}")
    if source == "package":
        from .fetch import PACKAGES

        if raw["package"] not in PACKAGES:
            raise ConfigError(f"unknown task.package {raw['package']!r}; known: {', '.join(PACKAGES)}")
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
    raw["description"] = " ".join(str(raw.get("description") or "").split())
    return TaskSpec(**raw)
