"""Task types beyond classification, metrics, objectives, alignment, baselines (tiny model, offline)."""

from __future__ import annotations

import json

import pytest
import torch

from zotune.config import load_config
from zotune.errors import ConfigError, DataError
from zotune.tasks import Example, load_task, make_spec
from zotune.train.baselines import demonstration, fit_logistic_regression, icl_prefix
from zotune.train.metrics import answer_exact_match, answer_f1, answer_metrics, macro_f1, normalize_answer
from zotune.train.scoring import AnswerScorer, ChoiceScorer, make_scorer
from zotune.train.trainer import run_eval, run_train

QUIET = {"log": lambda *_: None}


# -- metrics, against hand-computed values ---------------------------------------------------
def test_squad_normalisation_and_exact_match():
    assert normalize_answer("  The Cat, sat!  ") == "cat sat"
    assert answer_exact_match("The cat.", ["a dog", "cat"]) == 1.0
    assert answer_exact_match("cat sat", ["cat"]) == 0.0


@pytest.mark.parametrize("pred, answers, f1", [
    ("the cat sat", ["a cat sat down"], 0.8),  # P = 2/2, R = 2/3
    ("cat cat", ["cat"], 2 / 3),  # P = 1/2 (one of two "cat" matches), R = 1
    ("dog", ["cat", "dog house"], 2 / 3),  # best over answers: P = 1, R = 1/2
    ("", ["the"], 1.0),  # both normalise to nothing
    ("cat", ["the"], 0.0),
    ("", ["cat"], 0.0),
])
def test_squad_f1(pred, answers, f1):
    assert answer_f1(pred, answers) == pytest.approx(f1)


def test_answer_metrics_average_and_macro_f1():
    m = answer_metrics([["cat"], ["a dog"]], ["cat", "dog park"])
    assert m["exact_match"] == 0.5 and m["f1"] == pytest.approx((1 + 2 / 3) / 2)
    # class 0: tp 1, fp 2, fn 1 -> 2/5; class 1: tp 1, fp 1, fn 1 -> 1/2; class 2 never right -> 0
    assert macro_f1(["0", "0", "1", "1", "2"], ["0", "1", "1", "0", "0"]) == pytest.approx((0.4 + 0.5 + 0) / 3)


# -- specs and data ----------------------------------------------------------------------------
def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def copa_jsonl(tmp_path):
    rows = []
    for i in range(24):
        cands = [f"it rained {i}", f"the sun shone {i}"]
        rows.append({"premise": f"The ground was wet {i}.", "candidates": cands, "label": i % 2})
    return write_jsonl(tmp_path / "copa.jsonl", rows)


@pytest.fixture
def qa_jsonl(tmp_path):
    rows = [{"context": f"Paris is in France {i}.", "question": "Where is Paris?", "answer": ["France", "in France"]}
            for i in range(20)]
    return write_jsonl(tmp_path / "qa.jsonl", rows)


MC = {"type": "multiple_choice", "text_template": "{premise} Because", "choice_template": " {choice}."}
GEN = {"type": "generation", "text_template": "{context}\nQuestion: {question}\nAnswer:", "label_column": "answer",
       "max_new_tokens": 4}


def test_multiple_choice_examples_and_balanced_sampling(copa_jsonl):
    data = load_task(make_spec({**MC, "path": str(copa_jsonl), "k_shot": 3, "n_dev": 1, "eval_fraction": 0.25}))
    ex = data.train[0]
    assert set(ex.fields) == {"premise"} and len(ex.candidates) == 2 and ex.label in ("0", "1")
    assert [e.label for e in data.train].count("0") == 3 and [e.label for e in data.train].count("1") == 3
    assert data.spec.continuations(ex) == [f" {c}." for c in ex.candidates]
    assert data.spec.metric == "accuracy"


def test_varying_candidates_sample_k_shot_in_all(tmp_path):
    rows = [{"premise": f"p{i}", "candidates": [f"c{j}" for j in range(2 + i % 5)], "label": i % (2 + i % 5)}
            for i in range(40)]
    data = load_task(make_spec({**MC, "path": str(write_jsonl(tmp_path / "r.jsonl", rows)), "k_shot": 6, "n_dev": 2}))
    assert len(data.train) == 6 and len(data.dev) == 2


def test_multiple_choice_from_csv_columns_and_gold_text(tmp_path):
    path = tmp_path / "mc.csv"
    path.write_text("q,a,b,label\nwhy,yes,no,no\nhow,up,down,0\nwho,me,you,you\nwhat,x,y,1\n", encoding="utf-8")
    spec = make_spec({**MC, "text_template": "{q}", "path": str(path), "candidates_column": ["a", "b"],
                      "k_shot": None, "n_dev": 0, "eval_fraction": 0.25})
    data = load_task(spec)
    everything = {e.fields["q"]: (e.candidates, e.label) for e in data.train + data.test}
    assert everything == {"why": (("yes", "no"), "1"), "how": (("up", "down"), "0"),  # gold as text or index
                          "who": (("me", "you"), "1"), "what": (("x", "y"), "1")}


def test_generation_examples_keep_every_answer(qa_jsonl):
    data = load_task(make_spec({**GEN, "path": str(qa_jsonl), "k_shot": 5, "n_dev": 2}))
    assert len(data.train) == 5 and len(data.dev) == 2  # k_shot counts examples, not classes
    assert data.train[0].answers == ("France", "in France") and data.train[0].label == "France"
    assert data.spec.metric == "f1"


@pytest.mark.parametrize("raw, needle", [
    ({**MC, "choices": {0: "a", 1: "b"}}, "task.choices is for classification"),
    ({**MC, "choice_template": " {premise}"}, "must contain {choice}"),
    ({**MC, "metric": "f1"}, "must be one of accuracy"),
    ({**GEN, "metric": "accuracy"}, "must be one of f1, exact_match"),
    ({**MC, "candidates_column": 3}, "task.candidates_column"),
    ({**GEN, "align": False}, "needs a classification task"),
    ({**MC, "type": "ranking"}, "task.type must be one of"),
    ({**GEN, "max_new_tokens": 0}, "task.max_new_tokens"),
])
def test_bad_specs_are_one_line_errors(raw, needle):
    with pytest.raises(ConfigError, match=needle) as err:
        make_spec({**raw, "path": "x.jsonl"})
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("row, needle", [
    ({"premise": "p", "candidates": ["a", "b"], "label": 5}, "neither a candidate nor an index below 2"),
    ({"premise": "p", "candidates": ["only one"], "label": 0}, "at least two non-empty candidates"),
    ({"premise": "p", "candidates": "a or b", "label": 0}, "must hold a list of candidates"),
    ({"premise": "p", "label": 0}, "candidates column 'candidates' not found"),
])
def test_bad_multiple_choice_rows(tmp_path, row, needle):
    path = write_jsonl(tmp_path / "bad.jsonl", [row] * 4)
    with pytest.raises(DataError, match=needle):
        load_task(make_spec({**MC, "path": str(path)}))


def test_generation_row_without_answer(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"context": "c", "question": "q", "answer": ""}] * 4)
    with pytest.raises(DataError, match="no answer in column 'answer'"):
        load_task(make_spec({**GEN, "path": str(path)}))


# -- scorers on a tiny model --------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from zotune.models import load_model

    return load_model(str(tiny_model_dir))


def test_multiple_choice_scores_pad_missing_candidates(tiny):
    model, tok = tiny
    spec = make_spec({**MC, "path": "x.jsonl"})
    two = Example({"premise": "The floor was wet."}, "1", ("it rained", "the sun shone"))
    three = Example({"premise": "He smiled broadly."}, "2", ("he was sad", "he slept", "he won the lottery"))
    scorer = ChoiceScorer(tok, spec)
    with torch.no_grad():
        both = scorer.scores(model, scorer.encode([two, three]))
        alone = scorer.scores(model, scorer.encode([two]))
    assert both.shape == (2, 3) and both[0, 2] == float("-inf") and torch.isfinite(both[1]).all()
    torch.testing.assert_close(both[0, :2], alone[0], rtol=1e-4, atol=1e-4)
    loss = scorer.loss(model, scorer.encode([two, three]))
    assert torch.isfinite(loss)
    manual = -(both.log_softmax(-1)[0, 1] + both.log_softmax(-1)[1, 2]) / 2
    torch.testing.assert_close(loss, manual, rtol=1e-4, atol=1e-4)
    preds = scorer.predict(model, scorer.encode([two, three]))
    assert preds[0]["prediction"] == str(int(both[0].argmax())) and len(preds[1]["scores"]) == 3


def test_answer_scorer_loss_is_answer_nll_and_generation_decodes(tiny):
    model, tok = tiny
    spec = make_spec({**GEN, "path": "x.jsonl"})
    ex = Example({"context": "Paris is in France.", "question": "Where is Paris?"}, "France", answers=("France",))
    scorer = AnswerScorer(tok, spec)
    batch = scorer.encode([ex])
    answer_ids = tok(" France", add_special_tokens=False)["input_ids"]
    assert batch.targets[0, -len(answer_ids):].tolist() == answer_ids
    with torch.no_grad():
        loss = scorer.loss(model, batch)
        full = torch.tensor([batch.input_ids[0].tolist()])
        logp = model(full).logits[0, :-1].log_softmax(-1)
        n = len(answer_ids)
        manual = -logp[-n:].gather(-1, full[0, -n:, None]).mean()
    torch.testing.assert_close(loss, manual, rtol=1e-4, atol=1e-4)
    texts = scorer.generate(model, [ex, ex])
    assert len(texts) == 2 and texts[0] == texts[1] and "\n" not in texts[0]
    value = scorer.objective(model, batch, "f1")
    assert value.item() == pytest.approx(-answer_f1(texts[0], ["France"]))


# -- training with the new pieces ---------------------------------------------------------------
def cfg_for(model_dir, *extra):
    return load_config(None, [f"model.name={model_dir}", "train.steps=4", "train.batch_size=4",
                              "train.log_every=1", "eval.batch_size=8", "eval.max_examples=8",
                              "optimizer.lr=1e-3", *extra])


def task_overrides(path, raw):
    return [f"task.path={path}"] + [f"task.{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in raw.items()]


def test_train_multiple_choice_and_generation(tiny_model_dir, copa_jsonl, qa_jsonl, tmp_path):
    mc = run_train(cfg_for(tiny_model_dir, *task_overrides(copa_jsonl, {**MC, "k_shot": 4})), tmp_path / "mc", **QUIET)
    assert 0 <= mc["eval"]["accuracy"] <= 1 and mc["forward_passes"] == 8
    gen = run_train(cfg_for(tiny_model_dir, *task_overrides(qa_jsonl, {**GEN, "k_shot": 6})), tmp_path / "gen", **QUIET)
    preds = [json.loads(line) for line in (tmp_path / "gen" / "predictions.jsonl").read_text().splitlines()]
    assert gen["eval"] == pytest.approx(answer_metrics([p["answers"] for p in preds], [p["prediction"] for p in preds]))


def test_non_differentiable_objective(tiny_model_dir, reviews_csv, tmp_path):
    task = task_overrides(reviews_csv, {"text_template": "{text} It was", "choices": {"0": " bad", "1": " good"}})
    summary = run_train(cfg_for(tiny_model_dir, *task, "train.objective=accuracy"), tmp_path / "acc", **QUIET)
    records = [json.loads(line) for line in (tmp_path / "acc" / "metrics.jsonl").read_text().splitlines()]
    assert all(-1 <= r["loss"] <= 0 for r in records)  # minus the batch accuracy
    assert summary["skipped_steps"] == 0
    with pytest.raises(ConfigError, match="train.objective"):
        cfg_for(tiny_model_dir, *task, "train.objective=accuracy", "optimizer.name=AdamW")
    with pytest.raises(ConfigError, match="train.objective"):
        cfg_for(tiny_model_dir, "train.objective=bleu")


def test_unaligned_task_trains_a_linear_head(tiny_model_dir, reviews_csv, tmp_path, monkeypatch):
    from zotune.train import trainer

    heads = []
    real = trainer.make_scorer

    def spy(*args, **kwargs):
        heads.append(real(*args, **kwargs))
        return heads[-1]

    monkeypatch.setattr(trainer, "make_scorer", spy)
    task = task_overrides(reviews_csv, {"text_template": "{text} It was", "choices": {"0": " bad", "1": " good"},
                                        "align": False})
    summary = run_train(cfg_for(tiny_model_dir, *task, "optimizer.lr=1e-2"), tmp_path / "run", **QUIET)
    head = heads[0].head
    assert head.weight.abs().sum() > 0  # zero-initialised, moved by the ZO steps
    before = [json.loads(line) for line in (tmp_path / "run" / "predictions_zero_shot.jsonl").read_text().splitlines()]
    assert {p["prediction"] for p in before} == {"0"}  # the zero head ties: always the first class
    assert summary["eval_zero_shot"]["accuracy"] == sum(p["label"] == "0" for p in before) / len(before)
    row = json.loads((tmp_path / "run" / "predictions.jsonl").read_text().splitlines()[0])
    assert row["prompt"].endswith(" It was")  # predictions show the template; the head saw the bare text
    enc = heads[0].encode([Example({"text": "fine"}, "1")])
    assert heads[0].tokenizer.decode(enc.input_ids[0][enc.attention_mask[0].bool()]) == "fine"


# -- baselines ----------------------------------------------------------------------------------
def test_icl_prefix_is_seeded_demonstrations():
    spec = make_spec({"path": "x.csv", "text_template": "{text} It was", "choices": {"0": " bad", "1": " good"}})
    train = [Example({"text": f"film {i}"}, str(i % 2)) for i in range(10)]
    assert demonstration(spec, train[1]) == "film 1 It was good"
    a, b = icl_prefix(spec, train, 3, seed=0), icl_prefix(spec, train, 3, seed=1)
    assert a == icl_prefix(spec, train, 3, seed=0) and a != b
    assert a.count("\n\n") == 3 and all(line.endswith(("bad", "good")) for line in a.strip().split("\n\n"))


def test_logistic_regression_separates_separable_data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(60, 5, generator=g) * 3 + 10
    y = (x[:, 0] + x[:, 1] > 20).long()
    w, b = fit_logistic_regression(x, y, 2)
    assert ((x @ w.T + b).argmax(-1) == y).float().mean() > 0.95


def test_eval_baselines(tiny_model_dir, reviews_csv, tmp_path):
    task = task_overrides(reviews_csv, {"text_template": "{text} It was", "choices": {"0": " bad", "1": " good"},
                                        "k_shot": 8})
    icl = run_eval(cfg_for(tiny_model_dir, *task, "eval.baseline=icl", "eval.icl_shots=4", "eval.max_length=200"),
                   tmp_path / "icl", **QUIET)
    prompts = [json.loads(line)["prompt"] for line in (tmp_path / "icl" / "predictions.jsonl").read_text().splitlines()]
    assert icl["baseline"] == "icl" and 0 <= icl["eval"]["accuracy"] <= 1 and len(prompts) == 8
    lp = run_eval(cfg_for(tiny_model_dir, *task, "eval.baseline=linear_probe"), tmp_path / "lp", **QUIET)
    assert lp["baseline"] == "linear_probe" and set(lp["eval"]) == {"accuracy", "macro_f1"}
    with pytest.raises(ConfigError, match="eval.baseline"):
        cfg_for(tiny_model_dir, "eval.baseline=few_shot")


def test_icl_default_length_is_clamped_to_a_short_model(tiny_model_dir, reviews_csv, tmp_path):
    """eval.max_length's ICL default (1024) on a model of 128 positions: clamped, said once."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig.from_pretrained(tiny_model_dir)
    config.max_position_embeddings = 128
    short = tmp_path / "short-model"
    LlamaForCausalLM(config).save_pretrained(short, safe_serialization=True)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(short)
    task = task_overrides(reviews_csv, {"text_template": "{text} It was", "choices": {"0": " bad", "1": " good"},
                                        "k_shot": 8})
    lines = []
    icl = run_eval(cfg_for(short, *task, "eval.baseline=icl", "eval.icl_shots=16"), tmp_path / "icl", log=lines.append)
    assert icl["n_test"] == 8 and 0 <= icl["eval"]["accuracy"] <= 1
    assert [line for line in lines if "eval.max_length" in line] == [
        f"eval.max_length: 1024 tokens do not fit {short} (128 positions); using 128"]


def test_make_scorer_picks_by_type(tiny):
    model, tok = tiny
    assert isinstance(make_scorer(tok, make_spec({**GEN, "path": "x"}), 64), AnswerScorer)
    spec = make_spec({"path": "x.csv", "text_template": "{text}", "choices": {"0": " a", "1": " b"}, "align": False})
    head = make_scorer(tok, spec, 64, model)
    assert head.head.out_features == 2 and head.parameters()[0].dtype == torch.float32


def test_a_run_that_fails_on_its_data_leaves_out_reusable(tiny_model_dir, reviews_csv, tmp_path):
    task = {"text_template": "{text} It was", "choices": {"0": " bad", "1": " good"}}
    with pytest.raises(DataError, match="not found"):
        run_eval(cfg_for(tiny_model_dir, *task_overrides(tmp_path / "missing.csv", task)), tmp_path / "ev", **QUIET)
    assert not (tmp_path / "ev" / "config.yaml").exists()
    assert run_eval(cfg_for(tiny_model_dir, *task_overrides(reviews_csv, task)), tmp_path / "ev", **QUIET)["n_test"] == 8


def test_a_new_task_type_is_one_class(tmp_path, tiny):
    """A type registered by subclassing alone is accepted by make_spec, read by load_task, sampled
    per class and scored and evaluated, with nothing else edited (zotune.tasks.types)."""
    from zotune.tasks.types import TASK_TYPES, Classification
    from zotune.train.evaluate import evaluate

    class YesNo(Classification):  # a verbalizer of its own: no `choices` key needed
        name = "yes_no_for_test"
        required = ("text_template",)

        def validate(self, raw: dict) -> None:
            raw.setdefault("choices", {"no": " no", "yes": " yes"})
            super().validate(raw)

    try:
        with pytest.raises(ConfigError, match="task.type must be one of"):
            make_spec({"type": "yes_or_no", "text_template": "{q}?", "path": "x.jsonl"})
        path = write_jsonl(tmp_path / "yn.jsonl", [{"q": f"Is {i} even", "label": "yes" if i % 2 == 0 else "no"}
                                                    for i in range(30)])
        spec = make_spec({"type": "yes_no_for_test", "text_template": "{q}?", "path": str(path), "k_shot": 4})
        assert spec.kind is TASK_TYPES["yes_no_for_test"] and spec.labels == ["no", "yes"]
        data = load_task(spec, seed=0)
        assert sorted(e.label for e in data.train) == ["no"] * 4 + ["yes"] * 4
        model, tok = tiny
        result = evaluate(model, make_scorer(tok, spec, 32, model), data.test, progress=False)
        assert set(result.metrics) == {"accuracy", "macro_f1"}
        assert {p["prediction"] for p in result.predictions} <= {"no", "yes"}
    finally:
        TASK_TYPES.pop("yes_no_for_test", None)
