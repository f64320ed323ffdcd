"""Classification metrics over label strings."""

from __future__ import annotations

from collections.abc import Sequence


def accuracy(gold: Sequence[str], pred: Sequence[str]) -> float:
    return sum(g == p for g, p in zip(gold, pred)) / max(len(gold), 1)


def macro_f1(gold: Sequence[str], pred: Sequence[str]) -> float:
    """Mean over gold classes of per-class F1."""
    classes = sorted(set(gold))
    scores = []
    for c in classes:
        tp = sum(g == c and p == c for g, p in zip(gold, pred))
        fp = sum(g != c and p == c for g, p in zip(gold, pred))
        fn = sum(g == c and p != c for g, p in zip(gold, pred))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return sum(scores) / max(len(scores), 1)


METRICS = {"accuracy": accuracy, "macro_f1": macro_f1}


def compute_metric(name: str, gold: Sequence[str], pred: Sequence[str]) -> float:
    return METRICS[name](gold, pred)
