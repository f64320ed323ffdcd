"""Task metrics: accuracy and macro-F1 over labels; SQuAD-style F1 and exact match over text.

All metrics are fractions in [0, 1]. The SQuAD ones follow the official evaluation script:
answers are normalised (lower case, punctuation and the articles a/an/the removed, whitespace
collapsed) and a prediction gets the best score over the accepted answers.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

_PUNCT = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def accuracy(gold: Sequence[str], pred: Sequence[str]) -> float:
    """The share of predictions equal to their gold label (0.0 for none)."""
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


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def answer_f1(prediction: str, answers: Sequence[str]) -> float:
    """Best token-overlap F1 of ``prediction`` against any accepted answer."""
    return max((_f1(prediction, a) for a in answers), default=0.0)


def answer_exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 when the normalised prediction equals one of the normalised ``answers``, else 0.0."""
    norm = normalize_answer(prediction)
    return float(any(norm == normalize_answer(a) for a in answers))


def _f1(prediction: str, answer: str) -> float:
    pred, gold = normalize_answer(prediction).split(), normalize_answer(answer).split()
    if not pred or not gold:  # both empty (e.g. the answer was only "the"): match iff both are
        return float(pred == gold)
    common = sum((Counter(pred) & Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def label_metrics(gold: Sequence[str], pred: Sequence[str]) -> dict[str, float]:
    """Classification / multiple choice: accuracy and macro-F1."""
    return {"accuracy": accuracy(gold, pred), "macro_f1": macro_f1(gold, pred)}


def answer_metrics(answers: Sequence[Sequence[str]], pred: Sequence[str]) -> dict[str, float]:
    """Generation: mean SQuAD F1 and exact match."""
    n = max(len(pred), 1)
    return {
        "f1": sum(answer_f1(p, a) for p, a in zip(pred, answers)) / n,
        "exact_match": sum(answer_exact_match(p, a) for p, a in zip(pred, answers)) / n,
    }
