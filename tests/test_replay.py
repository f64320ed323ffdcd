"""Trajectory replay: a step's record redoes its update bit for bit, without a forward pass."""

from __future__ import annotations

import json

import dataclasses

import pytest
import torch

from zotune.optim import ZOSGD, SparseMeZO, ZOAdam, ZOSGDConservative
from zotune.tuning import layer_blocks

from .conftest import tiny_llama
from .test_optim_family import FAMILY, IDS, prepared

NO_DECAY = (ZOSGDConservative, SparseMeZO)  # weight decay would move x off what they compare / leave out


def train(cls, lr, batch, steps=4, params_of=lambda m: m.parameters(), **kwargs):
    model = prepared(tiny_llama(), cls)
    opt = cls(params_of(model), lr=lr, eps=1e-2, seed=3, weight_decay=0.0 if issubclass(cls, NO_DECAY) else 0.1,
              **kwargs)
    records = []
    for step in range(steps):
        if step == 2:  # a schedule: the record carries the lr used
            for group in opt.param_groups:
                group["lr"] = lr / 2
        opt.step(lambda: model(**batch).loss)
        records.append(opt.last_record)
    return model, opt, records


def replayed(cls, lr, records, params_of=lambda m: m.parameters(), **kwargs):
    model = prepared(tiny_llama(), cls)
    opt = cls(params_of(model), lr=lr, eps=1e-2, seed=3, weight_decay=0.0 if issubclass(cls, NO_DECAY) else 0.1,
              **kwargs)
    forwards = []
    model.register_forward_hook(lambda *_: forwards.append(1))
    for record in records:
        opt.replay(record)
    assert not forwards  # no forward pass
    return model, opt


def assert_same(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("cls, lr", FAMILY, ids=IDS)
def test_replay_is_bit_identical_for_every_optimizer(cls, lr, tiny_batch):
    model, opt, records = train(cls, lr, tiny_batch, n_queries=2)
    if cls is ZOSGDConservative:
        assert {r.extra["accepted"] for r in records} - {0}  # some step moved
    again, opt2 = replayed(cls, lr, records, n_queries=2)
    assert_same(model, again)
    for p, q in zip(model.parameters(), again.parameters()):  # momentum, moments, memory, counters
        assert opt.state[p].keys() == opt2.state[q].keys()
        for k, v in opt.state[p].items():
            assert torch.equal(v, opt2.state[q][k]) if isinstance(v, torch.Tensor) else v == opt2.state[q][k]
    assert opt2.steps_done == opt.steps_done


def test_replay_of_blockwise_steps(tiny_batch):
    def blocks(m):
        return layer_blocks(m, list(m.parameters()))

    model, _, records = train(ZOSGD, 1e-3, tiny_batch, params_of=blocks, blockwise=True)
    again, _ = replayed(ZOSGD, 1e-3, records, params_of=blocks, blockwise=True)
    assert_same(model, again)


def test_replay_to_an_intermediate_step_and_skipped_steps(tiny_batch):
    model = tiny_llama()
    opt = ZOAdam(model.parameters(), lr=1e-3, eps=1e-2, seed=3)
    records, snapshots = [], []
    for step in range(4):
        opt.step((lambda: torch.tensor(float("nan"))) if step == 1 else (lambda: model(**tiny_batch).loss))
        records.append(opt.last_record)
        snapshots.append([p.detach().clone() for p in model.parameters()])
    assert records[1].skipped
    again = tiny_llama()
    opt2 = ZOAdam(again.parameters(), lr=1e-3, eps=1e-2, seed=3)
    for record in records[:3]:
        opt2.replay(record)
    assert all(torch.equal(p, q) for p, q in zip(again.parameters(), snapshots[2]))
    assert opt2.skipped_steps == 1


def test_replay_refuses_a_foreign_or_reordered_record(tiny_batch):
    _, _, records = train(ZOSGD, 1e-3, tiny_batch)
    opt = ZOSGD(tiny_llama().parameters(), lr=1e-3, eps=1e-2, seed=4)
    with pytest.raises(ValueError, match="another run's trajectory"):
        opt.replay(records[0])
    opt = ZOSGD(tiny_llama().parameters(), lr=1e-3, eps=1e-2, seed=3)
    with pytest.raises(ValueError, match="out of order"):
        opt.replay(records[1])
    with pytest.raises(ValueError, match="learning rates"):
        opt.replay(dataclasses.replace(records[0], lrs=[1e-3, 1e-3]))


# -- the run directory: trajectory.bin, weights.safetensors, zotune replay -------------------------
from safetensors.torch import load_file  # noqa: E402

from zotune.cli import main  # noqa: E402
from zotune.trajectory import MAGIC, TrajectoryWriter, read_trajectory  # noqa: E402

from .test_trainer import config  # noqa: E402


@pytest.mark.parametrize("extra", [
    ["optimizer.name=ZOSGD"],
    ["optimizer.name=ZOSGDConservative", "optimizer.n_queries=2"],
    ["optimizer.name=ZOAdam", "optimizer.blockwise=true"],
    ["optimizer.name=JaguarSignSGD", "optimizer.options={coord_fraction: 0.2}"],
    ["optimizer.name=ZOSGDMomentum", "tuning.scheme=lora"],
    ["optimizer.name=ZOMuon", "tuning.scheme=prompt"],
    ["optimizer.name=ZOSGD", "tuning.scheme=lora", "tuning.lora.dropout=0.5"],
    ["optimizer.name=ZOSGD", "tuning.scheme=top", "tuning.top.layers=1"],
], ids=["ZOSGD", "Cons-q2", "ZOAdam-blockwise", "Jaguar", "Momentum-lora", "Muon-prompt", "ZOSGD-lora-dropout",
        "ZOSGD-top"])
def test_zotune_replay_rebuilds_the_trained_weights(tiny_model_dir, reviews_csv, tmp_path, extra, capsys):
    from zotune.train.trainer import run_train

    run = tmp_path / "run"
    run_train(config(tiny_model_dir, reviews_csv, "optimizer.lr=1e-3", "train.eval_every=0", *extra), run,
              log=lambda *_: None)
    trained = load_file(str(run / "weights.safetensors"))
    assert main(["replay", "--run", str(run), "--out", str(tmp_path / "again")]) == 0
    again = load_file(str(tmp_path / "again" / "model.safetensors"))  # the contract's name
    assert (tmp_path / "again" / "weights.safetensors").read_bytes() == (tmp_path / "again" / "model.safetensors").read_bytes()
    assert trained.keys() == again.keys() and all(torch.equal(trained[k], again[k]) for k in trained)
    # an intermediate step differs from both ends
    assert main(["replay", "--run", str(run), "--out", str(tmp_path / "mid"), "--step", "3"]) == 0
    mid = load_file(str(tmp_path / "mid" / "weights.safetensors"))
    assert any(not torch.equal(mid[k], again[k]) for k in mid)


def test_replay_refuses_another_base_model_and_bad_input(tiny_model_dir, reviews_csv, tmp_path, capsys):
    from zotune.train.trainer import run_train

    run = tmp_path / "run"
    run_train(config(tiny_model_dir, reviews_csv, "optimizer.lr=1e-3", "train.eval_every=0"), run, log=lambda *_: None)
    cfg = (run / "config.yaml").read_text()
    for edit, argv, needle in [
        (("dtype: float32", "dtype: bfloat16"), ["--run", str(run), "--out", str(tmp_path / "x")], "SHA-256 mismatch"),
        (("seed: 0", "seed: 1"), ["--run", str(run), "--out", str(tmp_path / "s")], "another run's trajectory"),
        (("", ""), ["--run", str(tmp_path / "nope"), "--out", str(tmp_path / "y")], "not a run directory"),
        (("", ""), ["--run", str(run), "--out", str(tmp_path / "z"), "--step", "99"], "outside the trajectory"),
    ]:
        (run / "config.yaml").write_text(cfg.replace(*edit) if edit[0] else cfg)
        assert edit[0] == "" or edit[0] in cfg
        assert main(["replay", *argv]) == 2
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err and err.count("\n") == 1
    (run / "config.yaml").write_text(cfg)
    (run / "trajectory.bin").write_bytes(b"not a trajectory")
    assert main(["replay", "--run", str(run), "--out", str(tmp_path / "w")]) == 2
    assert "bad magic bytes" in capsys.readouterr().err


def test_trajectory_file_is_compact_and_survives_a_torn_last_record(tmp_path):
    from zotune.optim.base import StepRecord

    path = tmp_path / "t.bin"
    writer = TrajectoryWriter(path, {"format": "zotune-trajectory"}, n_values=2, n_groups=1)
    for step in range(3):
        writer.append(StepRecord(step, 10 + step, [], [0.5 * step, -1.25], [1e-3], 0.7, step == 1, {"accepted": -1}))
    writer.close()
    data = path.read_bytes()
    assert data.startswith(MAGIC)
    header, records = read_trajectory(path)
    header_bytes = 12 + int.from_bytes(data[8:12], "little")
    assert header["record_size"] == 46 and len(data) == header_bytes + 3 * 46  # 22 + 8 * (2 grads + 1 lr)
    assert [r.projected_grads for r in records] == [[0.0, -1.25], [0.5, -1.25], [1.0, -1.25]]
    assert [r.skipped for r in records] == [False, True, False] and records[2].extra == {"accepted": -1}
    path.write_bytes(data[:-5])  # killed mid-write: the torn record is dropped
    assert len(read_trajectory(path)[1]) == 2


def test_a_loss_that_stays_nan_stops_the_run_with_weights_intact(tiny_model_dir, reviews_csv, tmp_path, monkeypatch, capsys):
    from zotune.train import scoring

    monkeypatch.setattr(scoring.ChoiceScorer, "loss", lambda self, model, batch: torch.tensor(float("nan")))
    argv = ["train", "--out", str(tmp_path / "run"), f"model.name={tiny_model_dir}", f"task.path={reviews_csv}",
            "task.text_template={text} It was", 'task.choices={"0": " bad", "1": " good"}', "train.steps=8",
            "train.max_skipped_in_a_row=3", "eval.zero_shot=false", "train.eval_every=0"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "NaN/inf for 3 steps in a row (steps 1-3" in err and "Traceback" not in err
    header, records = read_trajectory(tmp_path / "run" / "trajectory.bin")
    assert len(records) == 3 and all(r.skipped for r in records)


def test_a_diverged_run_ends_early_with_its_summary(tiny_model_dir, reviews_csv, tmp_path, monkeypatch, capsys):
    """train.divergence_ratio: once a step's loss passes that multiple of the first step's, the run ends there
    (evaluated, summarised, replayable from its shorter trajectory) instead of spending the rest of its steps."""
    from zotune.train import scoring

    loss, calls = scoring.ChoiceScorer.loss, []
    monkeypatch.setattr(scoring.ChoiceScorer, "loss",  # from the 3rd step's probes on, 50x the true loss
                        lambda self, model, batch: loss(self, model, batch) * (50.0 if len(calls.append(0) or calls) > 4 else 1.0))
    out = tmp_path / "run"
    argv = ["train", "--out", str(out), f"model.name={tiny_model_dir}", f"task.path={reviews_csv}",
            "task.text_template={text} It was", 'task.choices={"0": " bad", "1": " good"}', "train.steps=8",
            "train.divergence_ratio=10", "eval.zero_shot=false", "optimizer.lr=1e-6"]
    assert main(argv) == 0
    assert "diverged: the loss of step 3" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["diverged_at_step"] == 3 and summary["steps"] == 3 and summary["forward_passes"] == 6
    assert len(read_trajectory(out / "trajectory.bin")[1]) == 3
    assert main(["train", "--out", str(tmp_path / "bad"), "train.divergence_ratio=0.5"]) == 2


def test_early_stopping_ends_the_run_once_dev_stops_improving(tiny_model_dir, reviews_csv, tmp_path, monkeypatch, capsys):
    """train.early_stop_patience: the run ends after that many dev evaluations in a row below the best one
    (evaluated, summarised with the step, the best-dev weights kept); it is the same run as a longer one cut
    there, and --extend refuses it (it would end at the same step given more steps)."""
    from zotune.train import trainer

    devs = iter([0.50, 0.75, 0.75, 0.625, 0.75, 0.875, 0.875, 0.875])  # best 0.75 first at step 2
    evaluate = trainer.Session.evaluate

    def scripted(self, examples, desc, scorer=None):
        result = evaluate(self, examples, desc, scorer)
        if desc == "dev eval":
            result.metrics["accuracy"] = next(devs)
        return result

    monkeypatch.setattr(trainer.Session, "evaluate", scripted)
    common = [f"model.name={tiny_model_dir}", f"task.path={reviews_csv}", "task.text_template={text} It was",
              'task.choices={"0": " bad", "1": " good"}', "eval.zero_shot=false", "train.eval_every=1",
              "train.keep_best=true"]
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), *common, "train.steps=8", "train.early_stop_patience=3"]) == 0
    assert "early stop: dev accuracy has not passed 0.7500 (step 2) in 3 evaluations; the run ends at step 5" \
        in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped_early_at_step"] == 5 and summary["steps"] == 5 and summary["forward_passes"] == 10
    assert summary["best_step"] == 2 and summary["best_dev_accuracy"] == 0.75
    assert len(read_trajectory(out / "trajectory.bin")[1]) == 5
    assert main(["train", "--out", str(out), "--extend", *common, "train.steps=16", "train.early_stop_patience=3"]) == 2
    assert "it ended at step 5 (train.early_stop_patience)" in capsys.readouterr().err

    devs = iter([0.50, 0.75, 0.75, 0.625, 0.75])  # the same run without patience, 5 steps: the same trajectory
    assert main(["train", "--out", str(tmp_path / "cut"), *common, "train.steps=5"]) == 0
    assert (tmp_path / "cut" / "trajectory.bin").read_bytes() == (out / "trajectory.bin").read_bytes()
    assert main(["train", "--out", str(tmp_path / "bad"), *common, "train.early_stop_patience=-1"]) == 2
    assert main(["train", "--out", str(tmp_path / "bad"), *common, "train.eval_every=0", "train.keep_best=false",
                 "train.early_stop_patience=2"]) == 2
    assert "train.early_stop_patience" in capsys.readouterr().err


def test_out_of_memory_names_the_batch_shape(tiny_model_dir, reviews_csv, tmp_path, monkeypatch, capsys):
    from zotune.train import scoring

    def oom(self, model, batch):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(scoring.ChoiceScorer, "loss", oom)
    argv = ["train", "--out", str(tmp_path / "run"), f"model.name={tiny_model_dir}", f"task.path={reviews_csv}",
            "task.text_template={text} It was", 'task.choices={"0": " bad", "1": " good"}', "train.batch_size=4",
            "eval.zero_shot=false"]
    assert main(argv) == 2
    assert "out of memory on a batch of 4 sequences x" in capsys.readouterr().err
