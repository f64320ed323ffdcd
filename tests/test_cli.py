"""The command line: bad input gives one line on stderr and exit status 2, never a traceback."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def zotune(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "zotune", *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def assert_one_line_error(proc, needle):
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("zotune: error:"), proc.stderr
    assert needle in lines[-1]
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "args, needle",
    [
        (["train.steps=0"], "train.steps"),
        (["optimizer.lr=-1"], "optimizer.lr"),
        (["optimizer.eps=0"], "optimizer.eps"),
        (["trian.steps=3"], "unknown config key"),
        (["model.name=/no/such/model"], "not found"),
        (["task.name=nope"], "unknown task"),
        (["task.path=/no/such.csv", "task.text_template={text}", 'task.choices={"0": " a", "1": " b"}'], "not found"),
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path, args, needle):
    out = tmp_path / "run"
    assert_one_line_error(zotune("train", "--out", str(out), *args), needle)


def test_missing_config_file(tmp_path):
    assert_one_line_error(zotune("eval", "--config", str(tmp_path / "none.yaml"), "--out", str(tmp_path / "o")), "not found")


def test_empty_data_file(tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    proc = zotune("eval", "--out", str(tmp_path / "o"), f"task.path={empty}", "task.text_template={text}", 'task.choices={"0": " a", "1": " b"}')
    assert_one_line_error(proc, "empty")


def test_tasks_lists_sources():
    proc = zotune("tasks")
    assert proc.returncode == 0
    assert "rotten_tomatoes" in proc.stdout and "sst2" in proc.stdout and "source here" in proc.stdout


def test_optimizers_lists_every_optimizer_with_its_versioned_defaults(capsys):
    from zotune.cli import main
    from zotune.config import CONFIG_VERSION
    from zotune.optim.registry import ZEROTH_ORDER, optimizer_names

    assert main(["optimizers"]) == 0
    out = capsys.readouterr().out
    table = out.split("\n\n")[0].splitlines()[1:]  # the table, before the notes and the summaries
    rows = {line.split()[0]: line.split() for line in table}
    assert set(optimizer_names()) <= set(rows)
    assert rows["FZOO"][1:5] == ["ZO", "9", "3e-3*", "/"] and rows["AdamW"][1:4] == ["FO", "1", "1e-5"]
    # * marks an lr measured on the optimizer itself; ZO-SGD-Cons inherits the family's (ZO-SGD's sweeps)
    assert rows["HiZOO"][3] == "3e-5*" and rows["ZOSGDConservative"][3:6] == ["1e-4", "/", "1e-3"]
    assert f"config version {CONFIG_VERSION} (new runs)" in out
    assert all(cls.summary for cls in ZEROTH_ORDER.values())  # every optimizer says what it is and where from
    assert main(["optimizers", "--version", "2"]) == 0  # MeZO's published values
    old = capsys.readouterr().out
    assert "(runs recorded under it keep them)" in old and old.splitlines()[1].split()[:5] == ["ZOSGD", "ZO", "2", "1e-6", "/"]
    assert main(["optimizers", "--version", "99"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("zotune: error: --version must be one of")


def test_train_and_eval_from_the_command_line(tiny_model_dir, reviews_csv, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"model: {{name: {tiny_model_dir}}}\n"
        f"task: {{path: {reviews_csv}, text_template: '{{text}} It was', choices: {{0: ' bad', 1: ' good'}}, k_shot: 4}}\n"
        "train: {steps: 2, batch_size: 2}\n"
    )
    proc = zotune("train", "--config", str(cfg), "--out", str(tmp_path / "run"), "optimizer.lr=1e-4")
    assert proc.returncode == 0, proc.stderr
    assert "zero-shot accuracy" in proc.stdout and "-> after ZOSGD" in proc.stdout
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["forward_passes"] == 4
    again = zotune("train", "--config", str(cfg), "--out", str(tmp_path / "run"))
    assert_one_line_error(again, "already holds a run")


def test_a_closed_pipe_is_not_an_error():
    """`zotune tasks | head -1`: the reader stops early; zotune exits 0 without a traceback."""
    proc = subprocess.run(f"{sys.executable} -m zotune tasks | head -1", shell=True, capture_output=True, text=True,
                          timeout=120)
    assert proc.stdout.startswith("task ") and "Traceback" not in proc.stderr and "Error" not in proc.stderr
