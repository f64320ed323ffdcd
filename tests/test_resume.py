"""Checkpoints and exact resume: after kill -9, SIGTERM or a damaged checkpoint, the same command
on the same --out finishes the run with weights bit-identical to an uninterrupted run's."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import weakref
from pathlib import Path

import pytest
import torch

from zotune.cli import main
from zotune.train import trainer
from zotune.optim import ZOAdam
from zotune.train.checkpoint import Checkpoints, Progress, join_state, split_state

STEPS = 10
LIGHT = ("tuning.scheme=lora", "tuning.hybrid.zo_layers=1", "optimizer.name=ZOAdam")  # fast; ZO and FO state

# The CLI in a subprocess, each step slowed by 0.15 s so that the test reliably catches it
# mid-run (nothing else differs from `python -m zotune`).
SLOW_CLI = ("import sys, time; from zotune.train import trainer; f = trainer.batch_indices; "
            "trainer.batch_indices = lambda *a: (time.sleep(0.15), f(*a))[1]; "
            "from zotune.cli import main; sys.exit(main(sys.argv[1:]))")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread, in this process and the subprocesses: the same arithmetic on both
    sides of an interruption whatever the machine, and several times faster on a busy one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def argv(model_dir: Path, csv: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--out", str(out), f"model.name={model_dir}", f"task.path={csv}",
            "task.text_template={text} It was", 'task.choices={"0": " bad", "1": " good"}', f"train.steps={STEPS}",
            "train.batch_size=4", "train.log_every=1", "train.eval_every=5", "train.checkpoint_every=3",
            "eval.batch_size=8", "eval.max_examples=8", "optimizer.lr=1e-3", *extra]


_references: dict[tuple[str, ...], Path] = {}


def reference(model_dir: Path, csv: Path, tmp_path_factory, *extra: str) -> Path:
    """An uninterrupted run of the same command (once per option set; the data is the same fixture)."""
    if extra not in _references:
        out = tmp_path_factory.mktemp("reference") / "run"
        assert main(argv(model_dir, csv, out, *extra)) == 0
        _references[extra] = out
    return _references[extra]


def metrics(run: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in ("wall_s", "eval_s")} for line in (run / "metrics.jsonl").open()]


def assert_same_run(run: Path, ref: Path) -> None:
    """Bit-identical weights and trajectory; the same metrics (but wall time), predictions, plot data."""
    assert (run / "weights.safetensors").read_bytes() == (ref / "weights.safetensors").read_bytes()
    if (ref / "trajectory.bin").exists():
        assert (run / "trajectory.bin").read_bytes() == (ref / "trajectory.bin").read_bytes()
    assert metrics(run) == metrics(ref)
    assert (run / "predictions.jsonl").read_text() == (ref / "predictions.jsonl").read_text()
    summary, expected = (json.loads((r / "summary.json").read_text()) for r in (run, ref))
    for key in ("eval", "eval_zero_shot", "forward_passes", "skipped_steps"):
        assert summary[key] == expected[key], key


def last_step(run: Path) -> int:
    try:
        lines = (run / "metrics.jsonl").read_text().splitlines()
        return json.loads(lines[-1])["step"] if lines else 0
    except (OSError, ValueError):
        return 0


def kill_9_at(args: list[str], out: Path, at_step: int) -> subprocess.CompletedProcess:
    """Run the CLI in a subprocess, SIGKILL it once step ``at_step`` is logged."""
    proc = subprocess.Popen([sys.executable, "-c", SLOW_CLI, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 120
    while last_step(out) < at_step and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, f"the run ended before step {at_step}: {proc.stderr.read()}"
    proc.kill()
    stdout, stderr = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def interrupt_in_process(args: list[str], at_step: int, monkeypatch, sig: signal.Signals = signal.SIGINT) -> None:
    """The CLI in this process, which sends itself ``sig`` during step ``at_step`` (1-based)."""
    original = trainer.batch_indices

    def signal_at(step: int, *rest):
        if step + 1 == at_step:
            os.kill(os.getpid(), sig)
        return original(step, *rest)

    with monkeypatch.context() as m:
        m.setattr(trainer, "batch_indices", signal_at)
        assert main(args) == 130


@pytest.mark.parametrize("optimizer", ["ZOSGD", "ZOAdam"])
def test_kill_9_at_a_random_step_then_resume_is_bit_identical(tiny_model_dir, reviews_csv, tmp_path,
                                                              tmp_path_factory, optimizer, capsys):
    extra = (f"optimizer.name={optimizer}",)
    ref = reference(tiny_model_dir, reviews_csv, tmp_path_factory, *extra)
    out = tmp_path / "run"
    args = argv(tiny_model_dir, reviews_csv, out, *extra)
    kill_at = random.Random(f"kill-{optimizer}").randint(4, STEPS - 4)
    proc = kill_9_at(args, out, kill_at)
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "summary.json").exists() and last_step(out) >= kill_at
    assert main(args) == 0  # the same command again
    assert "resuming at step" in capsys.readouterr().out
    assert_same_run(out, ref)


def track_weight_reads(monkeypatch) -> dict[str, int]:
    """Count the checkpoint weights read from files and the most of them alive at once (weak references)."""
    from zotune.tensorfile import TensorReader

    read, alive, stats = TensorReader.read, [], {"count": 0, "peak_alive": 0}

    def counting(self, name: str) -> torch.Tensor:
        out = read(self, name)
        if name.startswith("weights/"):
            alive[:] = [r for r in alive if r() is not None] + [weakref.ref(out)]
            stats["count"] += 1
            stats["peak_alive"] = max(stats["peak_alive"], len(alive))
        return out

    monkeypatch.setattr(TensorReader, "read", counting)
    return stats


def test_sigterm_checkpoints_and_stops_with_one_line_then_resumes(tiny_model_dir, reviews_csv, tmp_path,
                                                                 tmp_path_factory, monkeypatch, capsys):
    extra = ("optimizer.name=AdamW",)
    ref = reference(tiny_model_dir, reviews_csv, tmp_path_factory, *extra)
    out = tmp_path / "run"
    args = argv(tiny_model_dir, reviews_csv, out, *extra)
    handlers = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    capsys.readouterr()
    interrupt_in_process(args, 5, monkeypatch, signal.SIGTERM)  # the step finishes, then a checkpoint
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == handlers  # restored
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("zotune: warning:")]
    checkpoint = out / "checkpoints" / "step-000005"
    assert err == [f"zotune: interrupted (SIGTERM) at step 5; checkpoint written to {checkpoint}; "
                   "run the same command again to resume"]
    assert sorted(p.name for p in checkpoint.iterdir()) == ["state.json", "state.safetensors"]
    assert last_step(out) == 5 and not (out / "summary.json").exists()
    reads = track_weight_reads(monkeypatch)
    assert main(args) == 0
    assert reads["count"] > 0 and reads["peak_alive"] == 1  # the checkpoint's weights read one at a time
    out_text = capsys.readouterr().out
    assert "resuming at step 5" in out_text and "zero-shot accuracy" in out_text  # measured before, reported
    assert_same_run(out, ref)


@pytest.mark.parametrize("damage", ["newest", "all"])
def test_a_damaged_checkpoint_is_reported_and_the_previous_one_used(tiny_model_dir, reviews_csv, tmp_path,
                                                                   tmp_path_factory, damage, monkeypatch, capsys):
    ref = reference(tiny_model_dir, reviews_csv, tmp_path_factory, *LIGHT)
    out = tmp_path / "run"
    args = argv(tiny_model_dir, reviews_csv, out, *LIGHT)
    interrupt_in_process(args, 8, monkeypatch)
    root = out / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step-000006", "step-000008"]  # the newest 2 kept
    newest = root / "step-000008" / "state.safetensors"
    data = bytearray(newest.read_bytes())
    if damage == "newest":  # one flipped byte: the checksum catches it
        data[len(data) // 2] ^= 0xFF
        newest.write_bytes(bytes(data))
    else:  # a truncated newest, an unparsable older one: start over
        newest.write_bytes(data[: len(data) // 2])
        (root / "step-000006" / "state.json").write_text('{"format": "zotune-checkpoint", "vers')
    capsys.readouterr()
    assert main(args) == 0
    out_text = capsys.readouterr().out
    assert out_text.count("is damaged") == (1 if damage == "newest" else 2)
    assert ("resuming at step 6" in out_text) == (damage == "newest")
    assert ("starting the run over" in out_text) == (damage == "all")
    assert_same_run(out, ref)


def test_resuming_with_another_config_is_refused_and_changes_nothing(tiny_model_dir, reviews_csv, tmp_path,
                                                                    monkeypatch, capsys):
    out = tmp_path / "run"
    args = argv(tiny_model_dir, reviews_csv, out, *LIGHT)
    interrupt_in_process(args, 4, monkeypatch)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert main([*args, "optimizer.lr=2e-3"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "another config (optimizer.lr differs)" in err and "--overwrite" in err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_a_finished_run_is_refused_unless_overwrite(tiny_model_dir, reviews_csv, tmp_path, tmp_path_factory, capsys):
    ref = reference(tiny_model_dir, reviews_csv, tmp_path_factory, *LIGHT)
    out = tmp_path / "run"
    shutil.copytree(ref, out)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    args = argv(tiny_model_dir, reviews_csv, out, *LIGHT)
    assert main(args) == 2
    assert "already holds a run (summary.json)" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert not (out / "checkpoints").exists()  # a finished run keeps no checkpoints
    (out / "checkpoints" / "step-000099").mkdir(parents=True)  # a stale one would mislead a resume
    assert main([args[0], "--overwrite", *args[1:]]) == 0
    assert not (out / "checkpoints" / "step-000099").exists()
    assert_same_run(out, ref)


def test_state_splits_into_tensors_and_json_and_back():
    from zotune.optim import ZOAdam

    params = [torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(4))]
    opt = ZOAdam(params, lr=1e-2, eps=1e-2, seed=5)
    for _ in range(2):
        opt.step(lambda: (params[0] ** 2).sum() + params[1].sum())
    state = opt.state_dict()
    tensors, skeleton = split_state({"optimizer": state})
    assert all(isinstance(t, torch.Tensor) for t in tensors.values()) and "optimizer/state/0/exp_avg" in tensors
    rebuilt = join_state(json.loads(json.dumps(skeleton)), tensors)["optimizer"]
    assert rebuilt["param_groups"][0]["betas"] == (0.9, 0.999) and set(rebuilt["state"]) == {0, 1}
    twin = ZOAdam([torch.nn.Parameter(p.detach().clone()) for p in params], lr=1e-2, eps=1e-2, seed=0)
    twin.load_state_dict(rebuilt)
    for o, ps in ((opt, params), (twin, twin.param_groups[0]["params"])):
        o.step(lambda: (ps[0] ** 2).sum() + ps[1].sum())
    assert all(torch.equal(p, q) for p, q in zip(params, twin.param_groups[0]["params"]))
    with pytest.raises(TypeError, match="cannot checkpoint a set"):
        split_state({"x": {1, 2}})


def test_a_resume_holds_the_optimizer_state_once(tmp_path):
    """load_state_dict copies each saved tensor once (an optimizer never shares one with another); a checkpoint's
    restore hands over the tensors it read instead (take=True), so a resumed ZO-Adam holds its two moments once,
    not twice over, and continues bit for bit."""
    w = torch.nn.Parameter(torch.randn(6))
    opt = ZOAdam([w], lr=1e-2, eps=1e-2, seed=3)
    opt.step(lambda: (w ** 2).sum())
    saved = opt.state_dict()
    copier = ZOAdam([torch.nn.Parameter(w.detach().clone())], lr=1e-2, eps=1e-2)
    copier.load_state_dict(saved)
    moment = copier.state[copier.param_groups[0]["params"][0]]["exp_avg"]
    assert torch.equal(moment, saved["state"][0]["exp_avg"])
    assert moment.data_ptr() != saved["state"][0]["exp_avg"].data_ptr()

    Checkpoints(tmp_path, 1).save(Progress(step=1), [("w", w)], {"zo": opt})
    checkpoint = Checkpoints(tmp_path, 1).latest()
    read = checkpoint.state["optimizers"]["zo"]["state"][0]
    twin_w = torch.nn.Parameter(torch.zeros(6))
    twin = ZOAdam([twin_w], lr=1e-2, eps=1e-2)
    checkpoint.restore([("w", twin_w)], {"zo": twin})
    assert all(twin.state[twin_w][k] is read[k] for k in ("exp_avg", "exp_avg_sq"))
    for o, p in ((opt, w), (twin, twin_w)):
        o.step(lambda: (p ** 2).sum())
    assert torch.equal(w, twin_w) and torch.equal(opt.state[w]["exp_avg_sq"], twin.state[twin_w]["exp_avg_sq"])


def test_checkpoint_every_is_validated():
    from zotune.config import load_config
    from zotune.errors import ConfigError

    assert load_config(None, []).train.checkpoint_every == 50
    for value in ("-1", "often", "1.5"):
        with pytest.raises(ConfigError, match="train.checkpoint_every"):
            load_config(None, [f"train.checkpoint_every={value}"])


def test_resume_with_a_schedule_and_best_on_dev_is_bit_identical(tiny_model_dir, reviews_csv, tmp_path,
                                                                  tmp_path_factory, monkeypatch, capsys):
    """The lr schedule is a function of the step (nothing to checkpoint) and the base lrs are
    taken before a checkpoint's scheduled lr is loaded: an interrupted cosine run with warm-up and
    best-on-dev selection finishes as the uninterrupted one does."""
    extra = ("train.lr_schedule=cosine", "train.warmup_steps=3", "train.keep_best=true", "train.eval_every=2")
    ref = reference(tiny_model_dir, reviews_csv, tmp_path_factory, *extra)
    out = tmp_path / "run"
    args = argv(tiny_model_dir, reviews_csv, out, *extra)
    interrupt_in_process(args, 7, monkeypatch)
    assert main(args) == 0
    assert_same_run(out, ref)
    assert (out / "best.safetensors").read_bytes() == (ref / "best.safetensors").read_bytes()
    lrs = [m["lr"] for m in metrics(ref)]
    assert lrs[0] < lrs[3] == max(lrs) and lrs[-1] < lrs[4]  # rises over the warm-up, then decays


def test_a_run_recorded_before_config_versions_resumes_and_replays_with_its_directions(
        tiny_model_dir, reviews_csv, tmp_path, tmp_path_factory, monkeypatch, capsys):
    """New runs take z from a noise table (config version 2). A run whose config.yaml has no
    ``version`` (as zotune wrote them before versions) is version 1: the same command that
    started it resumes it with z drawn per chunk, bit-identical to an uninterrupted such run,
    and replay rebuilds its weights; a new run of that command draws other directions."""
    import yaml
    from safetensors.torch import load_file

    ref = reference(tiny_model_dir, reviews_csv, tmp_path_factory, "version=1")
    out = tmp_path / "old"
    interrupt_in_process(argv(tiny_model_dir, reviews_csv, out, "version=1"), 5, monkeypatch)
    recorded = yaml.safe_load((out / "config.yaml").read_text())
    assert recorded.pop("version") == 1 and recorded["optimizer"]["noise_table_mb"] == 0.0
    (out / "config.yaml").write_text(yaml.safe_dump(recorded, sort_keys=False))  # a pre-version run
    assert main(argv(tiny_model_dir, reviews_csv, out)) == 0  # its command, which never named a version
    assert "resuming at step" in capsys.readouterr().out
    assert_same_run(out, ref)
    assert main(["replay", "--run", str(out), "--out", str(tmp_path / "replayed")]) == 0
    trained, again = load_file(str(out / "weights.safetensors")), load_file(str(tmp_path / "replayed" / "weights.safetensors"))
    assert all(torch.equal(trained[k], again[k]) for k in trained)
    new = tmp_path / "new"
    assert main(argv(tiny_model_dir, reviews_csv, new)) == 0
    assert yaml.safe_load((new / "config.yaml").read_text())["optimizer"]["noise_table_mb"] == 64.0
    assert (new / "trajectory.bin").read_bytes() != (ref / "trajectory.bin").read_bytes()


def test_a_version_2_run_with_the_default_lr_resumes_with_the_lr_it_was_recorded_with(
        tiny_model_dir, reviews_csv, tmp_path, tmp_path_factory, monkeypatch):
    """Version 3 measured the default learning rates. A run recorded under version 2 with
    ``lr: null`` resumes under version 2's default (MeZO's 1e-6 for full fine-tuning), bit-identical
    to an uninterrupted such run, from the command that never named a version; a new run of that
    command takes version 3's."""
    import yaml

    ref = reference(tiny_model_dir, reviews_csv, tmp_path_factory, "version=2", "optimizer.lr=null")
    out = tmp_path / "v2"
    interrupt_in_process(argv(tiny_model_dir, reviews_csv, out, "version=2", "optimizer.lr=null"), 5, monkeypatch)
    recorded = yaml.safe_load((out / "config.yaml").read_text())
    assert recorded["version"] == 2 and recorded["optimizer"]["lr"] is None
    assert main(argv(tiny_model_dir, reviews_csv, out, "optimizer.lr=null")) == 0
    assert_same_run(out, ref)
    assert {m["lr"] for m in metrics(out)} == {1e-6}
    new = tmp_path / "new"
    assert main(argv(tiny_model_dir, reviews_csv, new, "optimizer.lr=null")) == 0
    assert {m["lr"] for m in metrics(new)} == {1e-4}


@pytest.mark.parametrize("optimizer", ["ZOSGD", "ZOAdam"])
def test_a_run_killed_between_checkpoints_replays_its_trajectory_past_the_newest(
        tiny_model_dir, reviews_csv, tmp_path, tmp_path_factory, optimizer, monkeypatch, capsys):
    """The steps a kill loses after the newest checkpoint are in the trajectory and metrics.jsonl: the resume
    restores the checkpoint, then replays them (no forward pass) instead of running them again."""
    extra = (f"optimizer.name={optimizer}", "train.keep_best=true", "train.eval_every=2")
    ref = reference(tiny_model_dir, reviews_csv, tmp_path_factory, *extra)
    out = tmp_path / "run"
    args = argv(tiny_model_dir, reviews_csv, out, *extra)
    interrupt_in_process(args, 8, monkeypatch)
    shutil.rmtree(out / "checkpoints" / "step-000008")  # as if killed after step 8: the newest is step 6's
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000006"]
    steps_run = []
    original = trainer.batch_indices
    monkeypatch.setattr(trainer, "batch_indices", lambda step, *rest: (steps_run.append(step), original(step, *rest))[1])
    capsys.readouterr()
    assert main(args) == 0
    out_text = capsys.readouterr().out
    assert "resuming at step 8 by replaying" in out_text and "(step 6) and trajectory.bin's steps 7-8" in out_text
    assert "zero-shot accuracy" in out_text  # kept in the checkpoint
    assert steps_run == [8, 9]  # 0-based: steps 9 and 10 only
    assert_same_run(out, ref)
    assert (out / "best.safetensors").read_bytes() == (ref / "best.safetensors").read_bytes()


def test_an_early_stopped_run_interrupted_before_its_stop_stops_at_the_same_step(tiny_model_dir, reviews_csv, tmp_path,
                                                                                 tmp_path_factory, monkeypatch):
    """train.early_stop_patience counts dev evaluations across a resume: interrupted after step 2, the run ends
    at the step the uninterrupted one ended at, bit-identical."""
    extra = ("train.eval_every=1", "train.early_stop_patience=2", "optimizer.lr=1e-9")  # dev stays at its first
    ref = reference(tiny_model_dir, reviews_csv, tmp_path_factory, *extra)
    stopped = json.loads((ref / "summary.json").read_text()).get("stopped_early_at_step")
    assert stopped is not None and 2 < stopped < STEPS
    out = tmp_path / "run"
    args = argv(tiny_model_dir, reviews_csv, out, *extra)
    interrupt_in_process(args, 2, monkeypatch)
    assert main(args) == 0
    assert_same_run(out, ref)
    assert json.loads((out / "summary.json").read_text())["stopped_early_at_step"] == stopped


def test_a_finished_run_extended_to_more_steps_is_the_longer_run(tiny_model_dir, reviews_csv, tmp_path,
                                                                 tmp_path_factory, capsys):
    """--extend: a finished 6-step ZOAdam run given 10 steps replays its trajectory (weights, Adam's moments,
    best-on-dev weights) and goes on, bit-identical to the 10-step run; its config.yaml says 10 steps."""
    extra = ("optimizer.name=ZOAdam", "train.keep_best=true", "train.eval_every=2")
    ref = reference(tiny_model_dir, reviews_csv, tmp_path_factory, *extra)
    out = tmp_path / "run"
    assert main(argv(tiny_model_dir, reviews_csv, out, *extra, "train.steps=6")) == 0
    assert main(argv(tiny_model_dir, reviews_csv, out, *extra)) == 2  # finished: not without --extend
    capsys.readouterr()
    assert main(["train", "--extend", *argv(tiny_model_dir, reviews_csv, out, *extra)[1:]]) == 0
    assert "resuming at step 6 by replaying" in capsys.readouterr().out
    assert_same_run(out, ref)
    assert (out / "best.safetensors").read_bytes() == (ref / "best.safetensors").read_bytes()
    assert "steps: 10" in (out / "config.yaml").read_text()


@pytest.mark.parametrize("both, change, needle", [
    ((), ("optimizer.lr=2e-3",), "(optimizer.lr differs); an extension may change only train.steps"),
    ((), ("train.steps=5",), "train.steps must be above the run's 6, got 5"),
    (("train.lr_schedule=cosine",), (), "train.lr_schedule cosine depends on train.steps"),
    (("optimizer.name=AdamW",), (), "a zeroth-order optimizer (not hybrid), in one process"),
    ((), ("--overwrite",), "it does not go with --overwrite"),
    ((), ("--nproc", "2"), "drop --nproc"),
])
def test_an_extension_that_would_not_be_the_longer_run_is_refused_in_one_line(
        tiny_model_dir, reviews_csv, tmp_path, both, change, needle, capsys):
    """``both``: how the run was made and its extension asked for; ``change``: what the extension changes."""
    out = tmp_path / "run"
    made = ("train.steps=6", "eval.zero_shot=false", *both)
    assert main(argv(tiny_model_dir, reviews_csv, out, *made)) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    flags = [c for c in change if c.startswith("--") or c.isdigit()]
    overrides = [c for c in change if c not in flags]
    capsys.readouterr()
    assert main(["train", "--extend", *flags, *argv(tiny_model_dir, reviews_csv, out, *made, "train.steps=10", *overrides)[1:]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before  # nothing touched
    assert main(["train", "--extend", "--out", str(tmp_path / "none"), f"model.name={tiny_model_dir}"]) == 2
    assert "holds no run (no config.yaml)" in capsys.readouterr().err


@pytest.mark.parametrize("optimizer", ["ZOAdam", "HiZOO"])
def test_without_checkpoints_a_run_resumes_from_its_trajectory_bit_identically(
        tiny_model_dir, reviews_csv, tmp_path, tmp_path_factory, optimizer, monkeypatch, capsys):
    """What an archive keeps of an unfinished run, config.yaml, metrics.jsonl and trajectory.bin, resumes it:
    the replay rebuilds weights, optimizer state (Adam's moments, HiZOO's Hessian) and the best-on-dev
    weights; a record that metrics.jsonl never logged is cut off and its step runs again."""
    extra = (f"optimizer.name={optimizer}", "train.keep_best=true", "train.eval_every=2")
    ref = reference(tiny_model_dir, reviews_csv, tmp_path_factory, *extra)
    first = tmp_path / "first"
    interrupt_in_process(argv(tiny_model_dir, reviews_csv, first, *extra), 7, monkeypatch)
    out = tmp_path / "run"
    out.mkdir()
    for name in ("config.yaml", "metrics.jsonl", "trajectory.bin"):
        shutil.copyfile(first / name, out / name)
    lines = (out / "metrics.jsonl").read_text().splitlines(keepends=True)
    kept = [*lines[:-2], json.dumps({**json.loads(lines[-2]), "wall_s": 1000.0}) + "\n"]  # as if steps 1-6 took 1,000 s
    (out / "metrics.jsonl").write_text("".join(kept))  # step 7's record is in the trajectory only
    capsys.readouterr()
    assert main(argv(tiny_model_dir, reviews_csv, out, *extra)) == 0
    summary = json.loads((out / "summary.json").read_text())  # the wall times count the resumed run's time
    assert summary["wall_s"] > summary["train_wall_s"] > 1000
    out_text = capsys.readouterr().out
    assert "resuming at step 6 by replaying" in out_text and "zero-shot accuracy" in out_text
    assert_same_run(out, ref)
    assert (out / "best.safetensors").read_bytes() == (ref / "best.safetensors").read_bytes()
    assert json.loads((out / "summary.json").read_text())["best_step"] == json.loads(
        (ref / "summary.json").read_text())["best_step"]
