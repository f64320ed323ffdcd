"""Classification by candidate log-likelihood (MeZO's "train as classification").

Each example's prompt is followed by every choice's continuation; a choice's score is the
summed log-likelihood of its continuation tokens. Training minimises the cross-entropy over
the choices' scores; evaluation predicts the highest-scoring choice.

Sequences are left-padded so that every continuation ends at the last position: the LM head
then runs only on the last ``K + 1`` positions (``logits_to_keep``), which saves the
vocabulary projection (a fifth of a 135M model's FLOPs) on every other token. When all
continuations are single tokens (" great" / " terrible"), one forward per example scores all
choices at once.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import DataError
from ..tasks import Example, TaskSpec


@dataclass
class EncodedBatch:
    input_ids: torch.Tensor  # (N, T), left-padded
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    targets: torch.Tensor  # (N, K) continuation token ids, right-aligned, 0 where unused
    target_mask: torch.Tensor  # (N, K) 1 where targets are real
    rows_per_example: int  # 1 (single-token choices) or C
    labels: torch.Tensor  # (B,) index of the gold choice


class ChoiceScorer:
    """Turns examples into model inputs and model outputs into per-choice scores."""

    def __init__(self, tokenizer, spec: TaskSpec, max_length: int = 128):
        self.tokenizer = tokenizer
        self.spec = spec
        self.max_length = max_length
        self.labels = spec.labels
        self.choice_ids = [
            tokenizer(spec.choices[label], add_special_tokens=False)["input_ids"] for label in self.labels
        ]
        for label, ids in zip(self.labels, self.choice_ids):
            if not ids:
                raise DataError(f"choice {label!r} of task {spec.name!r} tokenizes to nothing")
        self.single_token = all(len(ids) == 1 for ids in self.choice_ids)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def encode(self, examples: list[Example]) -> EncodedBatch:
        prompts = [self.tokenizer(self.spec.render(ex.fields))["input_ids"] for ex in examples]
        if self.single_token:
            rows = [self._fit(p, []) for p in prompts]
            conts = [[] for _ in prompts]
        else:
            rows, conts = [], []
            for p in prompts:
                for ids in self.choice_ids:
                    rows.append(self._fit(p, ids))
                    conts.append(ids)
        width = max(len(r) for r in rows)
        k = 1 if self.single_token else max(len(c) for c in conts)
        n = len(rows)
        input_ids = torch.full((n, width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((n, width), dtype=torch.long)
        targets = torch.zeros((n, k), dtype=torch.long)
        target_mask = torch.zeros((n, k), dtype=torch.long)
        for i, (row, cont) in enumerate(zip(rows, conts)):
            input_ids[i, width - len(row):] = torch.tensor(row)
            attention[i, width - len(row):] = 1
            if cont:
                targets[i, k - len(cont):] = torch.tensor(cont)
                target_mask[i, k - len(cont):] = 1
        positions = (attention.cumsum(-1) - 1).clamp_(min=0)
        labels = torch.tensor([self.labels.index(ex.label) for ex in examples])
        return EncodedBatch(
            input_ids, attention, positions, targets, target_mask,
            1 if self.single_token else len(self.labels), labels,
        )

    def _fit(self, prompt: list[int], cont: list[int]) -> list[int]:
        """prompt + continuation, cutting the prompt on the left to fit ``max_length``."""
        keep = max(1, self.max_length - len(cont))
        return prompt[-keep:] + cont

    def scores(self, model: torch.nn.Module, batch: EncodedBatch) -> torch.Tensor:
        """Summed continuation log-likelihoods, shape (B, C), float32."""
        k = batch.targets.shape[1]
        kwargs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
        params = _forward_params(model)
        if "position_ids" in params:
            kwargs["position_ids"] = batch.position_ids
        if "logits_to_keep" in params:
            kwargs["logits_to_keep"] = k + (0 if self.single_token else 1)
        logits = model(**kwargs).logits
        if self.single_token:
            last = logits[:, -1, :].float().log_softmax(-1)
            ids = torch.tensor([ids[0] for ids in self.choice_ids])
            return last[:, ids]
        # logits at position t predict token t+1: the K continuation tokens are predicted by
        # the K positions before the last one.
        logp = logits[:, -k - 1 : -1, :].float().log_softmax(-1)
        token_logp = logp.gather(-1, batch.targets.unsqueeze(-1)).squeeze(-1)
        per_row = (token_logp * batch.target_mask).sum(-1)
        return per_row.view(-1, batch.rows_per_example)

    def loss(self, model: torch.nn.Module, batch: EncodedBatch) -> torch.Tensor:
        """Cross-entropy over the choices' scores."""
        return F.cross_entropy(self.scores(model, batch), batch.labels)


def _forward_params(model: torch.nn.Module) -> set[str]:
    cached = getattr(model, "_zotune_forward_params", None)
    if cached is None:
        cached = set(inspect.signature(model.forward).parameters)
        try:
            model._zotune_forward_params = cached
        except AttributeError:
            pass
    return cached
