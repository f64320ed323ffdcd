"""Evaluate a model on a task's examples: metrics and per-example predictions."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..tasks import Example, TaskSpec
from .metrics import answer_metrics, label_metrics
from .scoring import Scorer


@dataclass
class EvalResult:
    """An evaluation's metrics, one prediction row per example, and the forward passes it took."""

    metrics: dict[str, float]  # every metric of the task type (accuracy and macro_f1, or f1 and exact_match)
    predictions: list[dict]
    forward_passes: int  # model calls (a generation call counts once)

    def write_predictions(self, path: Path) -> None:
        """Write the prediction rows to ``path`` as JSON lines."""
        with open(path, "w", encoding="utf-8") as f:
            for row in self.predictions:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    scorer: Scorer,
    examples: list[Example],
    batch_size: int = 16,
    desc: str = "eval",
    progress: bool = True,
) -> EvalResult:
    """Predict every example (best candidate, or greedy answer) and compute the task's metrics."""
    predictions: list[dict] = []
    forwards = 0
    spec = scorer.spec
    bar = tqdm(total=len(examples), desc=desc, unit="ex", disable=not progress, leave=False)
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        for ex, pred in zip(chunk, scorer.predict(model, scorer.encode(chunk))):
            gold = spec.kind.gold(ex)
            predictions.append({"input": ex.fields, "prompt": spec.render(ex.fields), **gold, **pred})
        forwards += 1
        bar.update(len(chunk))
    bar.close()
    return EvalResult(task_metrics(spec, predictions), predictions, forwards)


def task_metrics(spec: TaskSpec, predictions: list[dict]) -> dict[str, float]:
    """The task's metrics over prediction rows (as :func:`evaluate` writes them)."""
    pred = [p["prediction"] for p in predictions]
    if spec.kind.decodes:
        return answer_metrics([p["answers"] for p in predictions], pred)
    return label_metrics([p["label"] for p in predictions], pred)
