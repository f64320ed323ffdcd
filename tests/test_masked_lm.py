"""Masked LMs (RoBERTa, BERT) with prompt-based fine-tuning (LM-BFF; MeZO's k-shot experiments):
label words scored at the mask token, trained with ZO and FO, on a tiny random RoBERTa built here."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import RobertaForMaskedLM

from zotune.cli import main
from zotune.config import load_config
from zotune.errors import ConfigError, DataError
from zotune.models import load_model
from zotune.models.loader import is_masked_lm
from zotune.tasks import Example, make_spec, task_spec
from zotune.train.scoring import MaskedChoiceScorer, make_scorer
from zotune.train.trainer import run_train


def config(model_dir, csv, *extra):
    return load_config(None, [
        f"model.name={model_dir}", f"task.path={csv}", "task.text_template={text} It was {mask} .",
        'task.choices={"0": " bad", "1": " good"}', "task.k_shot=8", "train.steps=6", "train.batch_size=4",
        "train.log_every=1", "eval.batch_size=8", "eval.max_examples=8", "eval.zero_shot=false", *extra,
    ])


def losses(run) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
            if "loss" in json.loads(line)]


def test_a_masked_lm_loads_as_one_and_gets_the_mask_scorer(tiny_roberta_dir):
    model, tokenizer = load_model(str(tiny_roberta_dir))
    assert isinstance(model, RobertaForMaskedLM) and is_masked_lm(model) and not model.training
    spec = task_spec({"name": "rotten_tomatoes"})  # the causal task as it is: the mask where the continuation goes
    scorer = make_scorer(tokenizer, spec, 64, model)
    assert isinstance(scorer, MaskedChoiceScorer)
    batch = scorer.encode([Example({"text": "a gem"}, "1"), Example({"text": "a long and dull film , alas"}, "0")])
    mask = tokenizer.mask_token_id
    assert [row.tolist().index(mask) for row in batch.input_ids] == batch.targets[:, 0].tolist()
    assert tokenizer.decode(batch.input_ids[0, : batch.targets[0, 0] + 1]).endswith("a gem It was<mask>")
    assert batch.attention_mask[0].tolist()[-1] == 0  # right-padded
    scores = scorer.scores(model, batch)
    assert scores.shape == (2, 2) and torch.isfinite(scores).all()


def test_the_mask_may_sit_inside_the_template(tiny_roberta_dir):
    model, tokenizer = load_model(str(tiny_roberta_dir))
    spec = make_spec({"path": "x.csv", "text_template": "{text} It was {mask} .", "choices": {0: " bad", 1: " good"}})
    assert spec.columns == ("text",)
    scorer = make_scorer(tokenizer, spec, 64, model)
    ids = scorer.prompt_ids(Example({"text": "a gem"}, "1"))
    assert tokenizer.decode(ids).endswith("a gem It was <mask> .")  # RoBERTa's <mask> would take the space (lstrip)
    short = MaskedChoiceScorer(tokenizer, spec, max_length=6)  # cut on the left, the mask kept
    assert tokenizer.mask_token_id in short.prompt_ids(Example({"text": "one two three four five six seven"}, "1"))


@pytest.mark.parametrize("optimizer, lr", [("ZOSGD", "1e-3"), ("AdamW", "1e-2")])
def test_prompt_fine_tuning_of_a_masked_lm_moves_the_loss(tiny_roberta_dir, reviews_csv, tmp_path, optimizer, lr):
    run = tmp_path / "run"
    summary = run_train(config(tiny_roberta_dir, reviews_csv, f"optimizer.name={optimizer}", f"optimizer.lr={lr}",
                               "train.steps=30", "optimizer.eps=1e-2", "seed=0"), run, log=lambda *_: None)
    trace = losses(run)
    assert len(trace) == 30 and 0.0 <= summary["eval"]["accuracy"] <= 1.0
    assert sum(trace[-5:]) / 5 < sum(trace[:5]) / 5  # the loss moves down
    before, _ = load_model(str(tiny_roberta_dir))
    after = load_file(run / "weights.safetensors")
    assert any(not torch.equal(after[n], p) for n, p in before.named_parameters() if n in after)


@pytest.mark.parametrize("scheme", ["full", "lora"])
def test_zotune_replay_of_a_masked_lm_run_is_bit_identical(tiny_roberta_dir, reviews_csv, tmp_path, scheme):
    run = tmp_path / "run"
    run_train(config(tiny_roberta_dir, reviews_csv, "optimizer.lr=1e-3", f"tuning.scheme={scheme}"), run,
              log=lambda *_: None)
    assert main(["replay", "--run", str(run), "--out", str(tmp_path / "again")]) == 0
    trained, again = load_file(run / "weights.safetensors"), load_file(tmp_path / "again" / "weights.safetensors")
    assert trained.keys() == again.keys() and all(torch.equal(trained[k], again[k]) for k in trained)
    if scheme == "lora":
        assert trained and all("query" in k or "value" in k for k in trained)  # BERT-family LoRA targets


@pytest.mark.parametrize("scheme", ["prefix", "prompt", "top"])
def test_causal_only_schemes_are_refused_in_one_line(tiny_roberta_dir, reviews_csv, tmp_path, scheme):
    with pytest.raises(ConfigError, match=f"tuning.scheme '{scheme}' is for causal LMs; a masked LM") as info:
        run_train(config(tiny_roberta_dir, reviews_csv, f"tuning.scheme={scheme}"), tmp_path / "r", log=lambda *_: None)
    assert "\n" not in str(info.value)


def test_what_a_masked_or_causal_lm_cannot_score_is_one_line(tiny_roberta_dir, tiny_model_dir):
    model, tokenizer = load_model(str(tiny_roberta_dir))
    copa = task_spec({"name": "copa"})
    with pytest.raises(DataError, match="masked LM scores label words at its mask token, so it takes classification"):
        make_scorer(tokenizer, copa, 64, model)
    long_word = make_spec({"path": "x.csv", "text_template": "{text}", "choices": {0: " supercalifragilistic", 1: " ok"}})
    with pytest.raises(DataError, match="label word ' supercalifragilistic' is .* tokens"):
        make_scorer(tokenizer, long_word, 64, model)
    causal, causal_tok = load_model(str(tiny_model_dir))
    inside = make_spec({"path": "x.csv", "text_template": "{text} It was {mask} .", "choices": {0: " bad", 1: " good"}})
    with pytest.raises(DataError, match=r"goes on after \{mask\}.*use a masked LM"):
        make_scorer(causal_tok, inside, 64, causal)
    at_end = make_spec({"path": "x.csv", "text_template": "{text} It was{mask}", "choices": {0: " bad", 1: " good"}})
    assert make_scorer(causal_tok, at_end, 64, causal).prompt_ids(Example({"text": "a"}, "1")) == \
        causal_tok("a It was")["input_ids"]  # a causal LM: the continuation goes where {mask} is


@pytest.mark.parametrize("baseline", ["zero_shot", "linear_probe"])
def test_baselines_of_a_masked_lm(tiny_roberta_dir, reviews_csv, tmp_path, baseline):
    from zotune.train.trainer import run_eval

    summary = run_eval(config(tiny_roberta_dir, reviews_csv, f"eval.baseline={baseline}"), tmp_path / "e",
                       log=lambda *_: None)
    assert summary["baseline"] == baseline and 0.0 <= summary["eval"]["accuracy"] <= 1.0
