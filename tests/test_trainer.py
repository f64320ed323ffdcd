"""The training recipe end to end on a tiny local model and a small CSV (fast, offline)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from zotune.config import load_config
from zotune.errors import ConfigError
from zotune.train.trainer import batch_indices, run_eval, run_train
from zotune.trajectory import read_trajectory


def config(model_dir, csv, *extra):
    return load_config(None, [
        f"model.name={model_dir}", f"task.path={csv}", "task.text_template={text} It was",
        'task.choices={"0": " bad", "1": " good"}', "task.k_shot=8", "train.steps=6",
        "train.batch_size=4", "train.eval_every=3", "train.log_every=2", "eval.batch_size=8", *extra,
    ])


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("optimizer", ["ZOSGD", "ForwardGrad", "SGD", "AdamW"])
def test_train_writes_a_complete_run_directory(tiny_model_dir, reviews_csv, tmp_path, optimizer):
    out = tmp_path / "run"
    summary = run_train(config(tiny_model_dir, reviews_csv, f"optimizer.name={optimizer}", "optimizer.lr=1e-3"), out, log=lambda *_: None)
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "predictions.jsonl", "predictions_zero_shot.jsonl", "training.png"):
        assert (out / name).is_file(), name
    metrics = read_jsonl(out / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [2, 3, 4, 6]
    assert all({"step", "loss", "forward_passes", "wall_s"} <= set(m) for m in metrics)
    assert "dev" in metrics[1] and "accuracy" in metrics[1]["dev"]
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk == summary
    assert {"eval", "steps", "forward_passes", "peak_rss_mb", "wall_s"} <= set(summary)
    assert 0.0 <= summary["eval"]["accuracy"] <= 1.0
    assert summary["forward_passes"] == (12 if optimizer == "ZOSGD" else 6)  # ForwardGrad: 1 JVP forward per step
    preds = read_jsonl(out / "predictions.jsonl")
    assert len(preds) == summary["n_test"]
    row = preds[0]
    assert set(row) == {"input", "prompt", "label", "prediction", "scores"}
    assert row["prompt"] == row["input"]["text"] + " It was"
    assert set(row["scores"]) == {" bad", " good"}
    assert row["prediction"] == max(("0", "1"), key=lambda lab: row["scores"][{"0": " bad", "1": " good"}[lab]])
    if optimizer in ("ZOSGD", "ForwardGrad"):
        header, records = read_trajectory(out / "trajectory.bin")
        assert header["format"] == "zotune-trajectory" and len(records) == 6
        assert all(len(r.projected_grads) == 1 for r in records)
        assert (out / "weights.safetensors").is_file()


def test_zo_probes_see_no_dropout(tiny_model_dir, reviews_csv):
    """LoRA dropout 0.5, LoRA weights moved off B = 0, and a perturbation too small to change any
    weight's float32 value: the + and - probes of a step are then the same function, so the
    projected gradient is exactly 0 (with dropout live, the two masks and losses would differ)."""
    from zotune.train.trainer import Session

    cfg = config(tiny_model_dir, reviews_csv, "tuning.scheme=lora", "tuning.lora.dropout=0.5", "optimizer.eps=1e-30")
    session = Session.build(cfg, log=lambda *_: None)
    assert not any(m.training for m in session.model.modules())
    with torch.no_grad():
        for p in session.trainable:
            p.add_(torch.randn_like(p), alpha=0.5)
    opt, _, _ = session.optimizers(log=lambda *_: None)
    batch = session.scorer.encode(session.data.train[:4])
    for _ in range(3):
        opt.step(lambda: session.scorer.loss(session.model, batch))
        assert opt.last_record.projected_grads == [0.0]


def test_zosgd_learns_the_tiny_task(tiny_model_dir, reviews_csv, tmp_path):
    """Full-parameter ZOSGD lowers the training loss on an easy task (not just noise). Runs are bit-exact, so the
    seed is fixed: at 60 two-query steps the outcome varies with it (seeds 0-3 of this setting: 0.70 -> 0.75,
    0.43, 0.67, 0.58); seed 1 is one that moves well within that budget."""
    cfg = config(tiny_model_dir, reviews_csv, "optimizer.lr=1e-2", "optimizer.eps=1e-2",
                 "train.steps=60", "train.eval_every=0", "train.log_every=1", "eval.zero_shot=false",
                 "optimizer.n_queries=2", "seed=1")
    run_train(cfg, tmp_path / "run", log=lambda *_: None)
    losses = [m["loss"] for m in read_jsonl(tmp_path / "run" / "metrics.jsonl")]
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10  # about 0.70 -> 0.43
    assert last < first - 0.05, (first, last)


def test_same_seed_same_run(tiny_model_dir, reviews_csv, tmp_path):
    runs = []
    for name in ("a", "b"):
        run_train(config(tiny_model_dir, reviews_csv, "optimizer.lr=1e-3"), tmp_path / name, log=lambda *_: None)
        runs.append([(m["loss"], m["forward_passes"]) for m in read_jsonl(tmp_path / name / "metrics.jsonl")])
        runs[-1].append((tmp_path / name / "predictions.jsonl").read_text())
    assert runs[0] == runs[1]


def test_eval_only(tiny_model_dir, reviews_csv, tmp_path):
    summary = run_eval(config(tiny_model_dir, reviews_csv), tmp_path / "ev", log=lambda *_: None)
    assert summary["steps"] == 0 and len(read_jsonl(tmp_path / "ev" / "predictions.jsonl")) == summary["n_test"]


def test_existing_run_is_not_destroyed(tiny_model_dir, reviews_csv, tmp_path):
    out = tmp_path / "run"
    run_eval(config(tiny_model_dir, reviews_csv), out, log=lambda *_: None)
    before = (out / "summary.json").read_text()
    with pytest.raises(ConfigError, match="already holds a run"):
        run_train(config(tiny_model_dir, reviews_csv), out, log=lambda *_: None)
    assert (out / "summary.json").read_text() == before


def test_batches_are_a_pure_function_of_step_and_seed():
    a = [batch_indices(s, 5, 12, seed=0) for s in range(6)]
    assert a == [batch_indices(s, 5, 12, seed=0) for s in range(6)]
    flat = [i for b in a for i in b]
    assert sorted(flat[:12]) == list(range(12))  # each epoch visits every example once
    assert a != [batch_indices(s, 5, 12, seed=1) for s in range(6)]


def test_scores_do_not_depend_on_padding(tiny_model_dir):
    """Left padding with explicit positions: an example scores the same alone or in a batch."""
    from zotune.models import load_model
    from zotune.tasks import Example, make_spec
    from zotune.train.scoring import ChoiceScorer

    model, tok = load_model(str(tiny_model_dir))
    spec = make_spec({"path": "x.csv", "text_template": "{text} It was", "choices": {"0": " bad", "1": " really good"}})
    scorer = ChoiceScorer(tok, spec)
    short, long = Example({"text": "fine"}, "1"), Example({"text": "a much longer sentence than the other one"}, "0")
    with torch.no_grad():
        alone = scorer.scores(model, scorer.encode([short]))
        together = scorer.scores(model, scorer.encode([long, short]))
    torch.testing.assert_close(alone[0], together[1], rtol=1e-4, atol=1e-4)


def test_blockwise_training_counts_forwards_per_block(tiny_model_dir, reviews_csv, tmp_path):
    cfg = config(tiny_model_dir, reviews_csv, "optimizer.blockwise=true", "optimizer.lr=1e-3", "train.steps=2",
                 "train.eval_every=0", "eval.zero_shot=false")
    summary = run_train(cfg, tmp_path / "run", log=lambda *_: None)
    assert summary["forward_passes"] == 2 * 2 * 3  # steps x (+,-) x blocks (2 layers + the rest)
    with pytest.raises(ConfigError, match="zeroth-order"):
        run_train(config(tiny_model_dir, reviews_csv, "optimizer.blockwise=true", "optimizer.name=SGD"),
                  tmp_path / "fo", log=lambda *_: None)


def test_hybrid_zo_fo_trains_both_parts(tiny_model_dir, reviews_csv, tmp_path, monkeypatch):
    """First layer + embeddings by ZOSGD, the rest by AdamW; backward never reaches the ZO part."""
    from zotune.train import stepper

    seen = {}
    original = stepper.first_order_step

    def spy(opt, model, loss, batch, frozen=(), *args, **kwargs):
        before = {id(p): p.detach().clone() for p in model.parameters()}
        value = original(opt, model, loss, batch, frozen, *args, **kwargs)
        seen["zo_grads"] = [p.grad for p in frozen]
        seen["fo_moved"] = any(not torch.equal(p, before[id(p)]) for g in opt.param_groups for p in g["params"])
        seen["zo_untouched"] = all(torch.equal(p, before[id(p)]) for p in frozen)
        return value

    monkeypatch.setattr(stepper, "first_order_step", spy)
    cfg = config(tiny_model_dir, reviews_csv, "tuning.hybrid.zo_layers=1", "tuning.hybrid.fo_lr=1e-2",
                 "optimizer.lr=1e-3", "train.steps=2", "train.eval_every=0", "eval.zero_shot=false")
    summary = run_train(cfg, tmp_path / "run", log=lambda *_: None)
    assert summary["forward_passes"] == 2 * (2 + 1)
    assert seen["zo_grads"] and all(g is None for g in seen["zo_grads"])
    assert seen["fo_moved"] and seen["zo_untouched"]


@pytest.mark.parametrize("override, needle", [
    ("tuning.hybrid.zo_layers=5", "has 2 layers"),
    ("tuning.hybrid.fo_optimizer=Adam", "tuning.hybrid.fo_optimizer"),
])
def test_hybrid_bad_input(tiny_model_dir, reviews_csv, tmp_path, override, needle):
    with pytest.raises(ConfigError, match=needle):
        run_train(config(tiny_model_dir, reviews_csv, override), tmp_path / "run", log=lambda *_: None)


@pytest.mark.parametrize("override, needle", [
    ("optimizer.options={rank: 0}", "rank must be an int >= 1"),
    ("optimizer.options={no_such_option: 1}", "no_such_option"),
])
def test_bad_optimizer_options_fail_before_anything_loads(reviews_csv, tmp_path, override, needle):
    """The optimizer is checked first: a model path that does not exist is not reached."""
    cfg = load_config(None, ["model.name=/no/such/model", f"task.path={reviews_csv}", "optimizer.name=ZOMuon", override])
    with pytest.raises(ConfigError, match=needle):
        run_train(cfg, tmp_path / "run", log=lambda *_: None)
    assert not (tmp_path / "run").exists()


def test_hybrid_needs_a_zo_optimizer():
    with pytest.raises(ConfigError, match="zeroth-order"):
        load_config(None, ["tuning.hybrid.zo_layers=1", "optimizer.name=AdamW"])


def test_lr_schedules_have_their_shapes():
    from zotune.train.schedule import lr_factor

    assert [lr_factor("constant", s, 10, warmup=4) for s in range(6)] == [0.2, 0.4, 0.6, 0.8, 1.0, 1.0]
    assert [lr_factor("linear", s, 10) for s in (0, 5, 9)] == [1.0, 0.5, pytest.approx(0.1)]
    assert [lr_factor("cosine", s, 10) for s in (0, 5)] == [1.0, pytest.approx(0.5)]
    assert lr_factor("cosine", 9, 10) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.9)))
    with pytest.raises(ValueError, match="unknown lr schedule"):
        lr_factor("step", 0, 10)


@pytest.mark.parametrize("optimizer", ["ZOSGD", "AdamW"])
def test_a_linear_schedule_sets_every_steps_lr(tiny_model_dir, reviews_csv, tmp_path, optimizer):
    cfg = config(tiny_model_dir, reviews_csv, f"optimizer.name={optimizer}", "optimizer.lr=1e-3",
                 "train.lr_schedule=linear", "train.warmup_steps=2", "train.log_every=1", "eval.zero_shot=false")
    run_train(cfg, tmp_path / "run", log=lambda *_: None)
    lrs = [m["lr"] for m in read_jsonl(tmp_path / "run" / "metrics.jsonl")]
    assert lrs == pytest.approx([1e-3 * f for f in (1 / 3, 2 / 3, 1.0, 0.75, 0.5, 0.25)])
    if optimizer == "ZOSGD":  # the trajectory records the lr each step used: replay follows the schedule
        _, records = read_trajectory(tmp_path / "run" / "trajectory.bin")
        assert [r.lrs[0] for r in records] == pytest.approx(lrs)


def test_keep_best_evaluates_the_best_dev_weights(tiny_model_dir, reviews_csv, tmp_path):
    """train.keep_best: the final evaluation is of the weights at the best dev evaluation (saved
    as best.safetensors), the same as evaluating that file afterwards."""
    cfg = config(tiny_model_dir, reviews_csv, "optimizer.lr=5e-3", "optimizer.eps=1e-2", "train.steps=8",
                 "train.eval_every=2", "train.keep_best=true", "eval.zero_shot=false")
    summary = run_train(cfg, tmp_path / "run", log=lambda *_: None)
    dev = [(m["step"], m["dev"]["accuracy"]) for m in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "dev" in m]
    best = max(dev, key=lambda p: (p[1], -p[0]))
    assert (summary["best_step"], summary["best_dev_accuracy"]) == best
    again = run_eval(cfg, tmp_path / "ev", weights=tmp_path / "run" / "best.safetensors", log=lambda *_: None)
    assert again["eval"] == summary["eval"]
    with pytest.raises(ConfigError, match="train.keep_best"):
        config(tiny_model_dir, reviews_csv, "train.keep_best=true", "train.eval_every=0")
    # train.save_weights=false: the same run and figures, no weights files left (the trajectory replays them)
    lean = run_train(config(tiny_model_dir, reviews_csv, "optimizer.lr=5e-3", "optimizer.eps=1e-2", "train.steps=8",
                            "train.eval_every=2", "train.keep_best=true", "eval.zero_shot=false", "train.save_weights=false"),
                     tmp_path / "lean", log=lambda *_: None)
    assert lean["eval"] == summary["eval"] and lean["best_step"] == summary["best_step"]
    assert not list((tmp_path / "lean").glob("*.safetensors")) and (tmp_path / "lean" / "trajectory.bin").is_file()
    from zotune.cli import main  # and its final weights come back from the trajectory, byte for byte

    assert main(["replay", "--run", str(tmp_path / "lean"), "--out", str(tmp_path / "replayed")]) == 0
    assert (tmp_path / "replayed" / "model.safetensors").read_bytes() == (tmp_path / "run" / "weights.safetensors").read_bytes()


def test_test_every_records_test_metrics_and_evaluation_time(tiny_model_dir, reviews_csv, tmp_path):
    """train.test_every: the test set's metrics in metrics.jsonl at those steps (the final one is
    summary.json's), and eval_s, the part of wall_s spent evaluating (training time = the rest)."""
    cfg = config(tiny_model_dir, reviews_csv, "train.test_every=2", "train.eval_every=3", "train.log_every=1",
                 "eval.zero_shot=false")
    summary = run_train(cfg, tmp_path / "run", log=lambda *_: None)
    metrics = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [m["step"] for m in metrics if "test" in m] == [2, 4]
    assert all(0 <= m["test"]["accuracy"] <= 1 for m in metrics if "test" in m) and "test" not in metrics[-1]
    evals = [m["eval_s"] for m in metrics]
    assert evals == sorted(evals) and evals[0] == 0 and evals[-1] > 0
    assert all(m["eval_s"] <= m["wall_s"] for m in metrics) and summary["steps"] == 6


def test_first_order_dropout_is_the_models_own_when_asked(tiny_model_dir, reviews_csv, tmp_path, monkeypatch):
    """train.dropout=model_default: first-order steps run in training mode (LoRA dropout 0.5 live),
    evaluation does not; the masks come from the seeded torch RNG (a second run is identical) and
    change the trajectory against the default (off)."""
    from zotune.train.scoring import ChoiceScorer

    modes: list[bool] = []
    loss = ChoiceScorer.loss
    monkeypatch.setattr(ChoiceScorer, "loss", lambda self, model, batch: modes.append(model.training) or loss(self, model, batch))
    runs = {}
    for name, dropout in (("a", "model_default"), ("b", "model_default"), ("off", "off")):
        modes.clear()
        cfg = config(tiny_model_dir, reviews_csv, "optimizer.name=AdamW", "optimizer.lr=1e-2", "tuning.scheme=lora",
                     "tuning.lora.dropout=0.5", f"train.dropout={dropout}")
        run_train(cfg, tmp_path / name, log=lambda *_: None)
        runs[name] = [m["loss"] for m in read_jsonl(tmp_path / name / "metrics.jsonl") if "loss" in m]
        assert modes == [dropout == "model_default"] * 6  # the 6 steps' losses; evaluation scores by predict
    assert runs["a"] == runs["b"] and runs["a"] != runs["off"]


def test_zo_refuses_model_dropout(tiny_model_dir, reviews_csv):
    with pytest.raises(ConfigError, match="train.dropout.*must be 'off' for the zeroth-order optimizer ZOSGD"):
        config(tiny_model_dir, reviews_csv, "train.dropout=model_default")


def test_summaries_carry_the_gpus_peak_memory_on_cuda(monkeypatch):
    from zotune.train.trainer import peak_memory

    assert set(peak_memory()) == {"peak_rss_mb"}  # CPU: host RSS only
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: 3 * 2**20)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda *a: 5 * 2**20)
    figures = peak_memory()
    assert (figures["peak_cuda_allocated_mb"], figures["peak_cuda_reserved_mb"]) == (3.0, 5.0) and figures["peak_rss_mb"] > 0


@pytest.mark.parametrize("dropout", ["off", "model_default"])
def test_first_order_steps_on_the_top_layers_through_the_activation_cache(tiny_model_dir, reviews_csv, tmp_path, dropout):
    """FO on tuning.scheme=top: the steps run through the frozen-prefix stand-in, whose mode follows the model."""
    cfg = config(tiny_model_dir, reviews_csv, "optimizer.name=AdamW", "optimizer.lr=1e-2", "tuning.scheme=top",
                 f"train.dropout={dropout}", "train.steps=2", "train.eval_every=0")
    summary = run_train(cfg, tmp_path / "run", log=lambda *_: None)
    assert summary["steps"] == 2 and summary["activation_cache_mb"] > 0
