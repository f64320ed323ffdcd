"""Baselines that need no fine-tuning (MeZO's table rows): in-context learning and linear probing.

* ICL: ``k`` demonstrations (prompt + gold continuation) drawn with the run seed from the task's
  train sample, joined by blank lines before every test prompt.
* Linear probing: logistic regression (L-BFGS, L2 as scikit-learn's default C=1) on the frozen
  model's final hidden state at the prompt's last token, fitted on the train sample.
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..tasks import Example, TaskSpec
from .evaluate import EvalResult
from .metrics import label_metrics
from .scoring import ChoiceScorer

SEPARATOR = "\n\n"


def demonstration(spec: TaskSpec, ex: Example) -> str:
    """One solved example: its prompt followed by its gold continuation."""
    return spec.render(ex.fields) + spec.continuations(ex)[spec.target(ex)]


def icl_prefix(spec: TaskSpec, train: list[Example], shots: int, seed: int) -> str:
    """``shots`` demonstrations (fewer if the train sample is smaller), seeded, as a prompt prefix."""
    pool = list(train)
    random.Random(seed).shuffle(pool)
    return "".join(demonstration(spec, ex) + SEPARATOR for ex in pool[:shots])


@torch.no_grad()
def features(model: torch.nn.Module, scorer: ChoiceScorer, examples: list[Example], batch_size: int) -> torch.Tensor:
    """The scorer's features of each prompt (a causal LM: the last token's final hidden state; a masked
    LM: the mask's), (N, H) float32."""
    out = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        out.append(scorer.features(model, scorer.encode_prompts(chunk)).float())
    return torch.cat(out)


def fit_logistic_regression(x: torch.Tensor, y: torch.Tensor, n_classes: int, c: float = 1.0,
                            max_iter: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression on standardised features; returns (weight, bias) that
    apply to the raw features. Minimises mean cross-entropy + ||W||^2 / (2 C n)."""
    mean, std = x.mean(0), x.std(0).clamp(min=1e-6)
    z = (x - mean) / std
    w = torch.zeros(n_classes, x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    z64, penalty = z.double(), 1.0 / (2 * c * len(x))
    opt = torch.optim.LBFGS([w, b], max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(z64 @ w.T + b, y) + penalty * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    weight = (w.detach() / std.double()).float()
    return weight, (b.detach() - (w.detach() * (mean / std).double()).sum(1)).float()


def linear_probe(model: torch.nn.Module, scorer: ChoiceScorer, train: list[Example], test: list[Example],
                 batch_size: int) -> EvalResult:
    """Fit on ``train``'s features, predict ``test``; classification tasks only."""
    spec = scorer.spec
    if not spec.kind.fixed_choices:
        raise ConfigError(f"eval.baseline linear_probe needs a classification task; {spec.name!r} is {spec.type}")
    x_train = features(model, scorer, train, batch_size)
    y_train = torch.tensor([spec.target(ex) for ex in train])
    weight, bias = fit_logistic_regression(x_train, y_train, len(spec.labels))
    logits = features(model, scorer, test, batch_size) @ weight.T + bias
    predictions = []
    for ex, row in zip(test, logits.tolist()):
        best = max(range(len(row)), key=row.__getitem__)
        predictions.append({"input": ex.fields, "prompt": spec.render(ex.fields), "label": ex.label,
                            "prediction": spec.labels[best], "scores": dict(zip(spec.labels, row))})
    metrics = label_metrics([p["label"] for p in predictions], [p["prediction"] for p in predictions])
    n_batches = -(-len(train) // batch_size) + -(-len(test) // batch_size)
    return EvalResult(metrics, predictions, n_batches)
