"""How a task's examples become model inputs, losses and predictions (one scorer per task type).

* :class:`ChoiceScorer` (classification, multiple choice; MeZO's "train as classification"):
  each candidate's continuation follows the prompt and scores its summed log-likelihood;
  training minimises the cross-entropy over the candidates, evaluation takes the best one.
* :class:`AnswerScorer` (generation): training minimises the answer's per-token negative
  log-likelihood; evaluation decodes greedily and the metric is SQuAD F1 / exact match.
* :class:`HeadScorer` (``task.align: false``, ZO-Bench's alignment ablation): no template,
  no verbalizer; a linear head on the last token's final hidden state, trained alongside.
* :class:`MaskedChoiceScorer` (classification with a masked LM: RoBERTa, BERT; LM-BFF and MeZO's
  k-shot experiments): the label words are scored at the mask token.

Sequences are left-padded so every continuation ends at the last position: the LM head then
runs only on the last ``K + 1`` positions (``logits_to_keep``), which saves the vocabulary
projection (a fifth of a 135M model's FLOPs) on every other token. When all continuations are
single tokens (" great" / " terrible"), one row per example scores all choices at once.

Every scorer also gives ``objective(model, batch, metric)``: minus the task metric on the batch
(MeZO section 3.4, non-differentiable objectives for zeroth-order training).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import DataError
from ..models.loader import forward_params, input_device, is_masked_lm
from ..tasks import Example, TaskSpec
from .decoding import greedy_decode
from .metrics import answer_metrics, label_metrics


@dataclass
class EncodedBatch:
    """A batch of ``B`` examples as ``N`` model rows: token ids with their mask and positions, each row's
    continuation targets, example and candidate, and each example's gold candidate."""

    input_ids: torch.Tensor  # (N, T), left-padded
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    targets: torch.Tensor  # (N, K) continuation token ids, right-aligned, 0 where unused
    target_mask: torch.Tensor  # (N, K) 1 where targets are real
    row_example: torch.Tensor  # (N,) example of each row
    row_choice: torch.Tensor  # (N,) candidate of each row (-1: the row scores every choice)
    labels: torch.Tensor  # (B,) index of the gold candidate (generation: unused zeros)
    examples: list[Example]


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input_ids, attention_mask and position_ids of left-padded token rows."""
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
        attention[i, width - len(row):] = 1
    return input_ids, attention, (attention.cumsum(-1) - 1).clamp_(min=0)


def right_aligned(conts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Continuation ids (N, K) aligned to the right (where they sit in the rows), and their mask."""
    k = max(1, max(len(c) for c in conts))
    targets = torch.zeros((len(conts), k), dtype=torch.long)
    mask = torch.zeros((len(conts), k), dtype=torch.long)
    for i, cont in enumerate(conts):
        if cont:
            targets[i, k - len(cont):] = torch.tensor(cont)
            mask[i, k - len(cont):] = 1
    return targets, mask


class PromptScorer:
    """What every scorer shares: the tokenizer, the spec, the row budget and the prompt.

    ``prefix`` (in-context learning) goes before every prompt; it is cut first when a row
    exceeds ``max_length``."""

    def __init__(self, tokenizer, spec: TaskSpec, max_length: int = 128, prefix: str = ""):
        self.tokenizer = tokenizer
        self.spec = spec
        self.max_length = max_length
        self.prefix = prefix
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def parameters(self) -> list[torch.nn.Parameter]:
        """Trainable parameters of the scorer itself (none, but a linear head)."""
        return []

    def prompt_ids(self, ex: Example) -> list[int]:
        """Token ids of ``prefix`` and the example's rendered prompt."""
        return self.tokenizer(self.prefix + self.spec.render(ex.fields))["input_ids"]


class ChoiceScorer(PromptScorer):
    """Classification and multiple choice by candidate log-likelihood."""

    def __init__(self, tokenizer, spec: TaskSpec, max_length: int = 128, prefix: str = ""):
        super().__init__(tokenizer, spec, max_length, prefix)
        if spec.after_mask.strip() and not isinstance(self, MaskedChoiceScorer):
            raise DataError(f"task {spec.name!r}: its template goes on after {{mask}} ({spec.after_mask!r}), but a "
                            "causal LM scores the continuation at the end of the prompt: use a masked LM "
                            "(RoBERTa, BERT) or end the template at {mask}")
        self.fixed_ids = None
        if spec.kind.fixed_choices:
            self.fixed_ids = [self._tokens(c) for c in spec.continuations(Example({}, spec.labels[0]))]
        self.single_token = self.fixed_ids is not None and all(len(ids) == 1 for ids in self.fixed_ids)

    def _tokens(self, text: str) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise DataError(f"a continuation of task {self.spec.name!r} tokenizes to nothing: {text!r}")
        return ids

    def _fit(self, prompt: list[int], cont: list[int]) -> list[int]:
        """prompt + continuation, cutting the prompt on the left to fit ``max_length``."""
        keep = max(1, self.max_length - len(cont))
        return prompt[-keep:] + cont

    def encode(self, examples: list[Example]) -> EncodedBatch:
        """One row per example and candidate (the prompt, cut on the left, then the continuation); one row per
        example, the prompt alone, when every choice is a single token."""
        if self.single_token:  # the last position's distribution scores every choice
            return self.encode_prompts(examples)
        rows, conts, owner, choice = [], [], [], []
        for i, ex in enumerate(examples):
            prompt = self.prompt_ids(ex)
            ids_list = self.fixed_ids or [self._tokens(c) for c in self.spec.continuations(ex)]
            for c, ids in enumerate(ids_list):
                rows.append(self._fit(prompt, ids))
                conts.append(ids)
                owner.append(i)
                choice.append(c)
        input_ids, attention, positions = left_pad(rows, self.pad_id)
        targets, target_mask = right_aligned(conts)
        labels = torch.tensor([self.spec.target(ex) for ex in examples])
        return EncodedBatch(input_ids, attention, positions, targets, target_mask,
                            torch.tensor(owner), torch.tensor(choice), labels, examples)

    def encode_prompts(self, examples: list[Example]) -> EncodedBatch:
        """One row per example, the prompt alone (for features: a linear head or probe)."""
        rows = [self._fit(self.prompt_ids(ex), []) for ex in examples]
        input_ids, attention, positions = left_pad(rows, self.pad_id)
        n = len(rows)
        zeros = torch.zeros((n, 1), dtype=torch.long)
        labels = torch.tensor([self.spec.target(ex) for ex in examples])
        return EncodedBatch(input_ids, attention, positions, zeros, zeros, torch.arange(n),
                            torch.full((n,), -1), labels, examples)

    def features(self, model: torch.nn.Module, batch: EncodedBatch) -> torch.Tensor:
        """What a linear probe reads (:meth:`encode_prompts` rows): the last token's final hidden state."""
        return last_hidden(model, batch)

    def scores(self, model: torch.nn.Module, batch: EncodedBatch) -> torch.Tensor:
        """Summed continuation log-likelihoods, shape (B, C), float32; -inf where an example
        has fewer candidates than the widest one."""
        if self.single_token:
            last = lm_logits(model, batch, keep=1)[:, -1, :].float().log_softmax(-1)
            return last[:, torch.tensor([ids[0] for ids in self.fixed_ids])]
        return _gather_rows(continuation_logprobs(model, batch).sum(-1), batch)

    def loss(self, model: torch.nn.Module, batch: EncodedBatch) -> torch.Tensor:
        """Cross-entropy over the candidates' scores."""
        scores = self.scores(model, batch)
        return F.cross_entropy(scores, batch.labels.to(scores.device))

    def predict(self, model: torch.nn.Module, batch: EncodedBatch) -> list[dict]:
        """Per example, the best candidate as the task type names it (``prediction``) and every candidate's score
        (``scores``)."""
        scores = self.scores(model, batch)
        out = []
        for ex, row in zip(batch.examples, scores.tolist()):
            names = self.spec.continuations(ex)
            best = max(range(len(names)), key=row.__getitem__)
            label = self.spec.kind.prediction(self.spec, best)
            out.append({"prediction": label, "scores": dict(zip(names, row))})
        return out

    def objective(self, model: torch.nn.Module, batch: EncodedBatch, metric: str) -> torch.Tensor:
        """Minus the batch's accuracy (or macro-F1 for ``metric`` f1) of the best candidates, a 0-d tensor."""
        pred = self.scores(model, batch).argmax(-1).tolist()
        gold = batch.labels.tolist()
        return -torch.tensor(label_metrics([str(g) for g in gold], [str(p) for p in pred])[_label_metric(metric)])


class HeadScorer(ChoiceScorer):
    """``task.align: false``: the example's fields without template, classified by a linear head
    (zero-initialised, float32) on the final hidden state of the last token."""

    def __init__(self, tokenizer, spec: TaskSpec, hidden_size: int, max_length: int = 128):
        super().__init__(tokenizer, spec, max_length)
        self.single_token = False
        self.head = torch.nn.Linear(hidden_size, len(spec.labels), dtype=torch.float32)
        torch.nn.init.zeros_(self.head.weight)
        torch.nn.init.zeros_(self.head.bias)

    def parameters(self) -> list[torch.nn.Parameter]:
        """The linear head's weight and bias."""
        return list(self.head.parameters())

    def prompt_ids(self, ex: Example) -> list[int]:
        """The example's fields (``spec.columns``) joined by spaces, without template."""
        return self.tokenizer(" ".join(ex.fields[c] for c in self.spec.columns))["input_ids"]

    def encode(self, examples: list[Example]) -> EncodedBatch:
        """One row per example, its fields alone (:meth:`encode_prompts`)."""
        return self.encode_prompts(examples)

    def scores(self, model: torch.nn.Module, batch: EncodedBatch) -> torch.Tensor:
        """The head's logits on the last token's final hidden state, (B, C) float32."""
        return self.head(last_hidden(model, batch).float().to(self.head.weight.device))


class MaskedChoiceScorer(ChoiceScorer):
    """Classification with a masked LM (LM-BFF's prompt-based fine-tuning, as in MeZO's RoBERTa
    experiments): the prompt carries the tokenizer's mask token where ``{mask}`` is in the template
    (LM-BFF's SST-2: "{sentence} It was {mask} ."), or at its end where a causal LM's continuation
    would go; each label word is one token, and its logit at the mask is the choice's score. Rows are
    right-padded (encoders number positions from the left); the MLM head runs on every position,
    which for a k-shot set of short sentences costs little."""

    def __init__(self, tokenizer, spec: TaskSpec, max_length: int = 128, prefix: str = ""):
        if not spec.kind.fixed_choices:
            raise DataError(f"task {spec.name!r} is {spec.type}: a masked LM scores label words at its mask token, "
                            "so it takes classification tasks only")
        if tokenizer.mask_token_id is None:
            raise DataError("this model is a masked LM, but its tokenizer has no mask token")
        super().__init__(tokenizer, spec, max_length, prefix)
        for word, ids in zip(spec.continuations(Example({}, spec.labels[0])), self.fixed_ids):
            if len(ids) != 1:
                raise DataError(f"task {spec.name!r}: the label word {word!r} is {len(ids)} tokens for this masked LM, "
                                "which scores one token at its mask: choose single-token label words")
        self.word_ids = torch.tensor([ids[0] for ids in self.fixed_ids])

    def prompt_ids(self, ex: Example) -> list[int]:
        """[CLS] prompt-with-mask [SEP], cut on the left (after [CLS]) to ``max_length``."""
        mask = self.tokenizer.mask_token
        text = self.prefix + self.spec.render(ex.fields, mask=mask)
        ids = self.tokenizer(text if "{mask}" in self.spec.text_template else text + mask)["input_ids"]
        return ids if len(ids) <= self.max_length else ids[:1] + ids[len(ids) - self.max_length + 1:]

    def encode(self, examples: list[Example]) -> EncodedBatch:
        """One right-padded row per example; ``targets`` holds the mask token's position."""
        rows = [self.prompt_ids(ex) for ex in examples]
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros_like(input_ids)
        at = torch.zeros((len(rows), 1), dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, : len(row)] = torch.tensor(row)
            attention[i, : len(row)] = 1
            at[i, 0] = row.index(self.tokenizer.mask_token_id)
        n = len(rows)
        labels = torch.tensor([self.spec.target(ex) for ex in examples])
        return EncodedBatch(input_ids, attention, torch.zeros_like(input_ids), at, torch.ones_like(at), torch.arange(n),
                            torch.full((n,), -1), labels, examples)

    def encode_prompts(self, examples: list[Example]) -> EncodedBatch:
        """As :meth:`encode` (one row per example already)."""
        return self.encode(examples)  # one row per example already

    def _at_mask(self, model: torch.nn.Module, batch: EncodedBatch, hidden: bool = False) -> torch.Tensor:
        device = input_device(model)
        out = model(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device),
                    output_hidden_states=hidden)
        values = out.hidden_states[-1] if hidden else out.logits
        rows = torch.arange(values.shape[0], device=values.device)
        return values[rows, batch.targets[:, 0].to(values.device)]

    def features(self, model: torch.nn.Module, batch: EncodedBatch) -> torch.Tensor:
        """The final hidden state at the mask token (what the MLM head reads)."""
        return self._at_mask(model, batch, hidden=True)

    def scores(self, model: torch.nn.Module, batch: EncodedBatch) -> torch.Tensor:
        """The label words' log-probabilities at the mask, (B, C) float32 (``targets`` holds the mask's position)."""
        at_mask = self._at_mask(model, batch).float().log_softmax(-1)
        return at_mask[:, self.word_ids.to(at_mask.device)]


class AnswerScorer(PromptScorer):
    """Generation: the answer (rendered by ``choice_template``) is the continuation."""

    def encode(self, examples: list[Example]) -> EncodedBatch:
        """One row per example: the prompt, cut on the left, then the rendered answer (at most ``max_length // 2``
        tokens) as the continuation."""
        rows, conts = [], []
        for ex in examples:
            cont = self.tokenizer(self.spec.choice_template.format_map({**ex.fields, "choice": ex.label}),
                                  add_special_tokens=False)["input_ids"][: self.max_length // 2]
            keep = max(1, self.max_length - len(cont))
            rows.append(self.prompt_ids(ex)[-keep:] + cont)
            conts.append(cont)
        input_ids, attention, positions = left_pad(rows, self.pad_id)
        targets, target_mask = right_aligned(conts)
        n = len(rows)
        return EncodedBatch(input_ids, attention, positions, targets, target_mask, torch.arange(n),
                            torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.long), examples)

    def loss(self, model: torch.nn.Module, batch: EncodedBatch) -> torch.Tensor:
        """Mean over examples of the answer's per-token negative log-likelihood."""
        per_token = continuation_logprobs(model, batch)
        return -(per_token.sum(-1) / batch.target_mask.to(per_token.device).sum(-1).clamp(min=1)).mean()

    @torch.no_grad()
    def generate(self, model: torch.nn.Module, examples: list[Example]) -> list[str]:
        """Greedy decoding of at most ``max_new_tokens``, cut at the first newline."""
        budget = max(1, self.max_length)
        input_ids, attention, positions = left_pad([self.prompt_ids(ex)[-budget:] for ex in examples], self.pad_id)
        device = input_device(model)
        stop = self._stop_ids(model)
        decode = self.tokenizer.decode
        new = greedy_decode(model, input_ids.to(device), attention.to(device), positions.to(device),
                            self.spec.max_new_tokens, lambda ids: ids[-1] in stop or "\n" in decode(ids))
        texts = [decode([t for t in ids if t not in stop], skip_special_tokens=True) for ids in new]
        return [t.split("\n", 1)[0].strip() for t in texts]

    def _stop_ids(self, model: torch.nn.Module) -> set[int]:
        """End-of-sequence ids: the tokenizer's and the model's generation config's."""
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        ids = set(eos if isinstance(eos, (list, tuple)) else [eos]) | {self.tokenizer.eos_token_id}
        return {int(i) for i in ids if i is not None}

    def predict(self, model: torch.nn.Module, batch: EncodedBatch) -> list[dict]:
        """Per example, the greedy answer (``prediction``)."""
        return [{"prediction": text} for text in self.generate(model, batch.examples)]

    def objective(self, model: torch.nn.Module, batch: EncodedBatch, metric: str) -> torch.Tensor:
        """Minus the batch's SQuAD F1 (exact match for ``metric`` exact_match) of the greedy answers, a 0-d
        tensor."""
        texts = self.generate(model, batch.examples)
        scores = answer_metrics([ex.answers for ex in batch.examples], texts)
        return -torch.tensor(scores["exact_match" if metric == "exact_match" else "f1"])


Scorer = ChoiceScorer | AnswerScorer  # MaskedChoiceScorer and HeadScorer are ChoiceScorers


def make_scorer(tokenizer, spec: TaskSpec, max_length: int, model: torch.nn.Module | None = None,
                prefix: str = "") -> Scorer:
    """The scorer for a task type (and ``align: false``: a linear head sized for ``model``; a masked
    LM: label words at its mask)."""
    if model is not None and is_masked_lm(model):
        if not spec.align:
            raise DataError("task.align: false (a linear head on the last token) needs a causal LM")
        return MaskedChoiceScorer(tokenizer, spec, max_length, prefix)
    if spec.kind.decodes:
        return AnswerScorer(tokenizer, spec, max_length, prefix)
    if not spec.align:
        if model is None:
            raise ValueError("a HeadScorer needs the model (for its hidden size)")
        return HeadScorer(tokenizer, spec, model.config.hidden_size, max_length)
    return ChoiceScorer(tokenizer, spec, max_length, prefix)


def _label_metric(metric: str) -> str:
    return "macro_f1" if metric in ("f1", "macro_f1") else "accuracy"


def _gather_rows(per_row: torch.Tensor, batch: EncodedBatch) -> torch.Tensor:
    """Row scores (N,) -> (B, C), -inf where an example has no such candidate."""
    n_examples = len(batch.examples)
    width = int(batch.row_choice.max()) + 1
    out = per_row.new_full((n_examples, width), float("-inf"))
    return out.index_put((batch.row_example.to(out.device), batch.row_choice.to(out.device)), per_row)


def continuation_logprobs(model: torch.nn.Module, batch: EncodedBatch) -> torch.Tensor:
    """Log-probability of each continuation token, (N, K) float32, 0 where masked."""
    k = batch.targets.shape[1]
    # logits at position t predict token t+1: the K continuation tokens are predicted by the K
    # positions before the last one.
    logp = lm_logits(model, batch, keep=k + 1)[:, -k - 1 : -1, :].float().log_softmax(-1)
    targets, mask = batch.targets.to(logp.device), batch.target_mask.to(logp.device)
    return logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1) * mask


def lm_logits(model: torch.nn.Module, batch: EncodedBatch, keep: int) -> torch.Tensor:
    """The model's logits, computed only for the last ``keep`` positions when it allows."""
    return model(**_inputs(model, batch, keep)).logits


def last_hidden(model: torch.nn.Module, batch: EncodedBatch) -> torch.Tensor:
    """Final hidden state (after the last norm) of each row's last token, (N, H)."""
    out = model(**_inputs(model, batch, keep=1), output_hidden_states=True)
    return out.hidden_states[-1][:, -1, :]


def _inputs(model: torch.nn.Module, batch: EncodedBatch, keep: int) -> dict:
    """The forward's keyword arguments, on the device where the model reads its tokens."""
    device = input_device(model)
    kwargs = {"input_ids": batch.input_ids.to(device), "attention_mask": batch.attention_mask.to(device)}
    params = forward_params(model)
    if "position_ids" in params:
        kwargs["position_ids"] = batch.position_ids.to(device)
    if "logits_to_keep" in params:
        kwargs["logits_to_keep"] = keep
    return kwargs
