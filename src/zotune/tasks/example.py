"""One example of a task, as read from its data."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Example:
    """A data row: its fields (every column but the label and candidates), its gold label, and the
    candidates (multiple choice) or accepted answers (generation) it brings."""

    fields: dict[str, str]  # the example's fields as read from the data (every column but the label)
    label: str  # classification: a key of choices; multiple_choice: gold index; generation: answers[0]
    candidates: tuple[str, ...] = ()  # multiple_choice: this example's candidates
    answers: tuple[str, ...] = ()  # generation: every accepted answer
