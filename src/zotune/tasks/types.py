"""Task types: what a task's rows become, what is scored after the prompt, how the few-shot sample
is drawn, and which metrics it reports. One class per type, registered by its ``name``:

* :class:`Classification`: a fixed verbalizer ``choices`` (label -> continuation); the choice with
  the highest log-likelihood wins.
* :class:`MultipleChoice`: each example brings its own candidates (``candidates_column``), each
  rendered by ``choice_template``; the label is the gold candidate's index (or its text).
* :class:`Generation`: the label column holds the answer(s); training uses the answer's likelihood,
  evaluation decodes greedily and scores SQuAD-style F1 / exact match.

Adding a type is one subclass here (its scorer aside: ``decodes`` picks the answer scorer).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from ..errors import ConfigError, DataError
from .example import Example

if TYPE_CHECKING:  # spec.py imports this module; the name is for annotations only
    from .spec import TaskSpec

TASK_TYPES: dict[str, TaskType] = {}


class TaskType:
    """The behaviour of one task type; stateless, one registered instance per type."""

    name: ClassVar[str]
    metrics: ClassVar[tuple[str, ...]]  # what it can report; the first is the default
    required: ClassVar[tuple[str, ...]] = ("text_template",)  # spec keys it cannot do without
    fixed_choices: ClassVar[bool] = False  # the same continuations for every example (a verbalizer)
    decodes: ClassVar[bool] = False  # evaluation generates an answer instead of ranking candidates
    choices_hint: ClassVar[str] = ""  # where a type without a verbalizer takes its candidates from

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        TASK_TYPES[cls.name] = cls()

    def validate(self, raw: dict) -> None:
        """Check (and normalise in place) the spec keys this type reads; one ConfigError line if bad."""
        if raw.get("choices") is not None:
            raise ConfigError(f"task.choices is for classification tasks; a {self.name} task takes {self.choices_hint}")
        if raw.get("align") is False:
            raise ConfigError("task.align: false (a linear head instead of the verbalizer) needs a classification task")

    def candidate_columns(self, spec: TaskSpec) -> tuple[str, ...]:
        """Data columns holding the candidates (not fields of the example)."""
        return ()

    def example(self, spec: TaskSpec, fields: dict[str, str], row: dict, at: str) -> Example:
        """One data row as an :class:`Example` (``at`` names the row in messages)."""
        raise NotImplementedError

    def continuations(self, spec: TaskSpec, example: Example) -> list[str]:
        """What is scored after the prompt, one per candidate."""
        return [spec.choice_template.format_map({**example.fields, "choice": c}) for c in example.candidates]

    def target(self, spec: TaskSpec, example: Example) -> int:
        """Index of the gold continuation."""
        return int(example.label)

    def prediction(self, spec: TaskSpec, best: int) -> str:
        """The prediction written for the best-scored continuation (comparable with the label)."""
        return str(best)

    def gold(self, example: Example) -> dict[str, Any]:
        """The gold fields of a prediction row."""
        return {"label": example.label}

    def demonstration_answer(self, spec: TaskSpec, example: Example) -> str:
        """The gold continuation shown after a solved example's prompt (ICL)."""
        return self.continuations(spec, example)[self.target(spec, example)]

    def classes(self, spec: TaskSpec, pool: list[Example]) -> dict[str, list[Example]]:
        """The examples by class for per-class few-shot sampling (one class: ``k_shot`` in all)."""
        return {"all": list(pool)}


class Classification(TaskType):
    """A fixed verbalizer ``choices`` (label value -> continuation): the same candidates for every
    example; the few-shot sample is drawn per label; a linear probe or head can stand in for it."""

    name = "classification"
    metrics = ("accuracy", "macro_f1")
    required = ("text_template", "choices")
    fixed_choices = True

    def validate(self, raw: dict) -> None:
        choices = raw["choices"]
        if not isinstance(choices, dict) or len({str(k) for k in choices}) < 2:
            raise ConfigError("task.choices must map at least two label values to continuations")
        if any(not isinstance(v, str) or not v for v in choices.values()):
            raise ConfigError("task.choices continuations must be non-empty strings, e.g. {0: ' terrible', 1: ' great'}")
        raw["choices"] = {str(k): v for k, v in choices.items()}

    def example(self, spec: TaskSpec, fields: dict[str, str], row: dict, at: str) -> Example:
        value = row.get(spec.label_column)
        label = value.strip() if isinstance(value, str) else str(value)
        if label not in (spec.choices or {}):
            raise DataError(f"{at}: label {label!r} is not in choices ({', '.join(map(repr, spec.labels))})")
        return Example(fields, label)

    def continuations(self, spec: TaskSpec, example: Example) -> list[str]:
        return list((spec.choices or {}).values())

    def target(self, spec: TaskSpec, example: Example) -> int:
        return spec.labels.index(example.label)

    def prediction(self, spec: TaskSpec, best: int) -> str:
        return spec.labels[best]

    def classes(self, spec: TaskSpec, pool: list[Example]) -> dict[str, list[Example]]:
        by_label: dict[str, list[Example]] = {label: [] for label in spec.labels}
        for ex in pool:
            by_label.setdefault(ex.label, []).append(ex)
        return by_label


class MultipleChoice(TaskType):
    """Each example brings its own candidates (``candidates_column``: a list column, or one column
    each), rendered by ``choice_template``; the label is the gold candidate's index or text (COPA,
    WinoGrande, ReCoRD)."""

    name = "multiple_choice"
    metrics = ("accuracy",)
    choices_hint = "candidates_column"

    def validate(self, raw: dict) -> None:
        super().validate(raw)
        cand = raw.get("candidates_column", "candidates")
        if isinstance(cand, list) and len(cand) >= 2 and all(isinstance(c, str) for c in cand):
            raw["candidates_column"] = tuple(cand)
        elif not isinstance(cand, str):
            raise ConfigError("task.candidates_column must be a column holding a list of candidates, "
                              f"or a list of at least two columns, got {cand!r}")

    def candidate_columns(self, spec: TaskSpec) -> tuple[str, ...]:
        col = spec.candidates_column
        return (col,) if isinstance(col, str) else tuple(col)

    def example(self, spec: TaskSpec, fields: dict[str, str], row: dict, at: str) -> Example:
        candidates = _candidates(row, self.candidate_columns(spec), at)
        return Example(fields, str(_gold_index(row.get(spec.label_column), candidates, at)), candidates)

    def classes(self, spec: TaskSpec, pool: list[Example]) -> dict[str, list[Example]]:
        """By the gold position when every example has as many candidates (COPA); one class when the
        number varies (ReCoRD)."""
        if len({len(e.candidates) for e in pool}) > 1:
            return super().classes(spec, pool)
        by_position: dict[str, list[Example]] = {}
        for ex in pool:
            by_position.setdefault(ex.label, []).append(ex)
        return dict(sorted(by_position.items(), key=lambda kv: int(kv[0])))


class Generation(TaskType):
    """The label column holds the accepted answer(s): training scores the first answer's likelihood
    after the prompt, evaluation decodes greedily (``max_new_tokens``) and scores SQuAD's F1 and
    exact match (SQuAD, DROP)."""

    name = "generation"
    metrics = ("f1", "exact_match")
    decodes = True
    choices_hint = "its answers from label_column"

    def example(self, spec: TaskSpec, fields: dict[str, str], row: dict, at: str) -> Example:
        value = row.get(spec.label_column)
        answers = tuple(str(a) for a in (value if isinstance(value, list) else [value]) if a is not None)
        if not answers or not all(a.strip() for a in answers):
            raise DataError(f"{at}: no answer in column {spec.label_column!r}")
        return Example(fields, answers[0], answers=answers)

    def continuations(self, spec: TaskSpec, example: Example) -> list[str]:
        return [spec.choice_template.format_map({**example.fields, "choice": example.label})]

    def target(self, spec: TaskSpec, example: Example) -> int:
        return 0

    def gold(self, example: Example) -> dict[str, Any]:
        return {"answers": list(example.answers)}


def _candidates(row: dict, columns: tuple[str, ...], at: str) -> tuple[str, ...]:
    """A multiple-choice example's candidates: one list-valued column, or one column each."""
    if len(columns) == 1:
        value = row.get(columns[0])
        if not isinstance(value, list):
            raise DataError(f"{at}: column {columns[0]!r} must hold a list of candidates "
                            "(a JSON array; in CSV, name several columns in task.candidates_column)")
        values = value
    else:
        values = [row.get(c) for c in columns]
    candidates = tuple("" if v is None else str(v) for v in values)
    if len(candidates) < 2 or not all(c.strip() for c in candidates):
        raise DataError(f"{at}: needs at least two non-empty candidates, got {list(candidates)!r}")
    return candidates


def _gold_index(value: Any, candidates: tuple[str, ...], at: str) -> int:
    """The label as an index into the candidates: a 0-based index, or the gold candidate's text."""
    text = str(value).strip() if value is not None else ""
    if text in candidates:
        return candidates.index(text)
    if isinstance(value, int) and not isinstance(value, bool) or text.isdigit():
        index = int(text)
        if index < len(candidates):
            return index
    raise DataError(f"{at}: label {value!r} is neither a candidate nor an index below {len(candidates)}")
