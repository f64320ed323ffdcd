"""Evaluate a model on a task's examples: metrics and per-example predictions."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..tasks import Example
from .metrics import compute_metric
from .scoring import ChoiceScorer


@dataclass
class EvalResult:
    metrics: dict[str, float]
    predictions: list[dict]
    forward_passes: int

    def write_predictions(self, path: Path) -> None:
        with open(path, "w", encoding="utf-8") as f:
            for row in self.predictions:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    scorer: ChoiceScorer,
    examples: list[Example],
    batch_size: int = 16,
    desc: str = "eval",
    progress: bool = True,
) -> EvalResult:
    """Score every choice of every example; predict the highest-scoring choice."""
    predictions: list[dict] = []
    forwards = 0
    spec = scorer.spec
    bar = tqdm(total=len(examples), desc=desc, unit="ex", disable=not progress, leave=False)
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        batch = scorer.encode(chunk)
        scores = scorer.scores(model, batch)
        forwards += 1
        for ex, row in zip(chunk, scores.tolist()):
            best = max(range(len(row)), key=row.__getitem__)
            predictions.append(
                {
                    "input": ex.fields,
                    "prompt": spec.render(ex.fields),
                    "label": ex.label,
                    "prediction": scorer.labels[best],
                    "scores": {spec.choices[lab]: s for lab, s in zip(scorer.labels, row)},
                }
            )
        bar.update(len(chunk))
    bar.close()
    gold = [p["label"] for p in predictions]
    pred = [p["prediction"] for p in predictions]
    metrics = {spec.metric: compute_metric(spec.metric, gold, pred)}
    return EvalResult(metrics, predictions, forwards)
