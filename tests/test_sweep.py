"""``zotune sweep``: the ranking rule, the lr ladder, and a sweep of a tiny model run, resumed, refused and picked."""

from __future__ import annotations

import json

import pytest
import yaml

from zotune.bench.sweep import (SweepCell, around, confirm_pick, late_dev, longer_run_note, parse_values, pick,
                                rank_key, read_cell, run_sweep, setting_fall, sweep_table)
from zotune.cli import main
from zotune.errors import ConfigError


def cell(name: str, dev: list[float], losses: tuple[float, ...] = (0.7, 0.6), done: bool = True) -> SweepCell:
    return SweepCell(name, dev=[(25 * (i + 1), d) for i, d in enumerate(dev)], losses=list(losses),
                     summary={"eval": {"accuracy": 0.5}} if done else None)


def test_the_best_dev_wins_and_ties_go_to_the_steadier_setting():
    early_peak = cell("lr=0.001,seed=0", [0.75, 0.5, 0.5, 0.5])
    steady = cell("lr=0.0001,seed=0", [0.7, 0.75, 0.75, 0.75])
    assert rank_key([early_peak])[0] == rank_key([steady])[0] == 0.75
    assert pick([early_peak, steady]) == "lr=0.0001"
    assert pick([early_peak, steady, cell("lr=0.01,seed=0", [0.5, 0.8])]) == "lr=0.01"


def test_seeds_are_averaged_and_a_diverged_seed_sinks_its_setting():
    cells = [cell("lr=0.001,seed=0", [0.8]), cell("lr=0.001,seed=1", [0.6]),  # mean best 0.7
             cell("lr=0.0001,seed=0", [0.75]), cell("lr=0.0001,seed=1", [0.7])]  # mean best 0.725
    assert pick(cells) == "lr=0.0001"
    cells[3] = cell("lr=0.0001,seed=1", [0.9], losses=(0.7, 8.0))  # loss > 10x the first: diverged
    assert cells[3].diverged and rank_key(cells[2:]) == (-1.0, -1.0)
    assert pick(cells) == "lr=0.001"
    assert pick([cell("lr=1,seed=0", [0.9], losses=(0.7, float("nan"))), cell("lr=2,seed=0", [])]) is None


def test_the_table_marks_the_pick_and_unfinished_cells():
    text = sweep_table("s", [cell("lr=0.01,seed=0", [0.5, 0.6], done=False), cell("lr=0.001,seed=0", [0.5, 0.55])])
    rows = [line for line in text.splitlines() if line.startswith("| lr=")]
    assert rows[0].startswith("| lr=0.001,seed=0 | 0.500 / 0.550 | 0.550 (50) | 0.500 |")  # ordered by value
    assert rows[1].endswith("| **picked** (unfinished) |")


def test_a_cell_still_running_is_read_up_to_its_torn_last_line(tmp_path):
    """A cell killed (or read) in the middle of writing a metrics line: the table reads what came before it."""
    lines = [json.dumps({"step": 1, "loss": 0.7}), json.dumps({"step": 2, "loss": 0.6, "dev": {"accuracy": 0.75}}),
             json.dumps({"step": 3, "loss": 0.5})[:9]]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines))
    read = read_cell(tmp_path)
    assert read.losses == [0.7, 0.6] and read.dev == [(2, 0.75)] and read.summary is None


@pytest.mark.parametrize("lr, ladder", [(1e-4, [1e-5, 3e-5, 1e-4, 3e-4]), (3e-2, [3e-3, 1e-2, 3e-2, 1e-1]),
                                        (1e-6, [1e-7, 3e-7, 1e-6, 3e-6])])
def test_the_default_grid_is_four_half_decades_around_the_default_lr(lr, ladder):
    assert around(lr) == ladder


def test_a_long_run_gets_the_rung_below_the_pick_to_check():
    assert longer_run_note(1e-2, [1e-3, 1e-2, 3e-2], sweep_steps=100, run_steps=149) is None  # under 1.5x: no note
    note = longer_run_note(1e-2, [1e-3, 1e-2, 3e-2], sweep_steps=100, run_steps=150)
    assert note is not None and "1.5x" in note and "run lr=0.001 for the 150 steps" in note  # the grid's next value down
    note = longer_run_note(1e-4, [1e-4, 3e-4], sweep_steps=100, run_steps=2000)
    assert "20x" in note and "run lr=3e-05 " in note and "--steps 2000" in note  # none below: a third, on the ladder


def test_the_confirm_stage_ranks_by_the_late_dev_score_and_ties_go_to_the_lower_lr():
    early = cell("lr=0.01,seed=0", [0.8, 0.7, 0.5, 0.5])  # best dev 0.8, but it ends at 0.5
    steady = cell("lr=0.003,seed=0", [0.6, 0.6, 0.7, 0.7])
    assert late_dev(early) == 0.5 and late_dev(steady) == 0.7  # the mean of the last half of the evaluations
    assert pick([early, steady]) == "lr=0.01" and confirm_pick([early, steady]) == "lr=0.003"
    level = cell("lr=0.01,seed=0", [0.6, 0.6, 0.7, 0.7])
    assert confirm_pick([level, steady]) == "lr=0.003"  # a tie: the lower lr
    blown = cell("lr=0.003,seed=0", [0.9, 0.9], losses=(0.7, 9.0))
    assert confirm_pick([early, blown]) == "lr=0.01" and confirm_pick([blown]) is None  # diverged: never picked
    assert "late dev (last half)" in sweep_table("t", [early, steady], late=True)
    assert setting_fall([early]) == pytest.approx(0.3) and setting_fall([steady]) == 0.0  # 0.8 -> 0.5: walks off; 0.7 -> 0.7


@pytest.mark.parametrize("text, message", [("1e-3,x", "comma-separated"), ("", "at least one"),
                                           ("1e-3,-1", "> 0"), ("1e-3,0.001", "twice")])
def test_bad_value_lists_are_one_line_errors(text, message):
    with pytest.raises(ConfigError, match=message):
        parse_values(text, "--lr")


def test_a_sweep_runs_picks_resumes_and_refuses_to_clobber(tiny_model_dir, reviews_csv, tmp_path, capsys):
    config = tmp_path / "mine.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"name": str(tiny_model_dir)}, "optimizer": {"name": "ZOSGD"},
        "task": {"path": str(reviews_csv), "text_template": "{text} It was", "choices": {"0": " bad", "1": " good"},
                 "k_shot": 4},
        "train": {"batch_size": 4, "log_every": 1}, "eval": {"batch_size": 8, "max_examples": 8}}))
    out = tmp_path / "sweep"
    lines: list[str] = []

    assert run_sweep(config, out, lrs=[1e-3, 1e-1], steps=4, dry_run=True, log=lines.append) == 0
    assert not out.exists() and any("lr=0.1,seed=0" in line and "todo" in line for line in lines)

    run_sweep(config, out, lrs=[1e-3, 1e-1], steps=4, jobs=2, log=lines.append)
    grid = yaml.safe_load((out / "grid.yaml").read_text())
    assert grid["axes"] == {"optimizer.lr": [1e-3, 1e-1], "seed": [0]} and grid["budget"] == {"steps": 4}
    assert grid["base"]["train"]["keep_best"] is True and grid["base"]["train"]["eval_every"] == 1  # 4 steps / 4

    def rank(name):  # the rule, from the cell's own records
        dev = [json.loads(x)["dev"]["accuracy"] for x in (out / "cells" / name / "metrics.jsonl").read_text().splitlines()
               if "dev" in json.loads(x)]
        stopped = json.loads((out / "cells" / name / "summary.json").read_text()).get("diverged_at_step")
        assert len(dev) == (stopped or 4)  # dev at every step, up to the sweep's divergence stop (ratio 10)
        return (-1.0, -1.0) if stopped else (max(dev), sum(dev) / len(dev))  # a diverged cell ranks last

    expected = max(["lr=0.001", "lr=0.1"], key=lambda s: rank(f"{s},seed=0"))
    picked = yaml.safe_load((out / "picked.yaml").read_text())
    assert picked["optimizer"] == {"name": "ZOSGD", "lr": float(expected.split("=")[1])}
    assert picked["version"] >= 8 and picked["train"] == {"batch_size": 4, "log_every": 1}  # the user's own settings
    assert any(line.startswith(f"picked: {expected} ") for line in lines)
    assert "**picked**" in (out / "sweep.md").read_text()
    assert any("note: the picked lr" in line for line in lines)  # two values: the pick is always at an edge
    lower = "lr=0.001 " if expected == "lr=0.1" else "lr=0.0003 "  # the grid's value below, else a rung down
    assert any("note: train.steps (1000) is 250x the sweep's 4 steps" in line and lower in line for line in lines)
    assert "train.steps (1000) is 250x" in (out / "sweep.md").read_text()  # the notes stay with the table

    lines.clear()
    run_sweep(config, out, lrs=[1e-3, 1e-1], steps=4, log=lines.append)  # the same sweep again: nothing re-run
    assert any("2 finished (skipped), 0 to run" in line for line in lines)

    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    with pytest.raises(ConfigError, match="holds a sweep with other settings"):
        run_sweep(config, out, lrs=[1e-3], steps=2, log=lines.append)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before  # nothing touched

    assert main(["sweep", "--config", str(config), "--out", str(tmp_path / "x"), "--lr", "1e-3,oops"]) == 2
    assert main(["sweep", "--config", str(config), "--out", str(tmp_path / "x"), "--eps", "1e-3",
                 "optimizer.name=AdamW"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["zotune: error: --lr takes comma-separated floats, got '1e-3,oops'",
                   "zotune: error: --eps sweeps a zeroth-order optimizer's perturbation; AdamW has none"]
    assert not (tmp_path / "x").exists()


def test_confirm_runs_the_pick_and_the_rung_below_at_the_long_run_s_length(tiny_model_dir, reviews_csv, tmp_path):
    config = tmp_path / "mine.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"name": str(tiny_model_dir)}, "optimizer": {"name": "ZOSGD"},
        "task": {"path": str(reviews_csv), "text_template": "{text} It was", "choices": {"0": " bad", "1": " good"},
                 "k_shot": 4},
        "train": {"batch_size": 4, "log_every": 1, "steps": 8}, "eval": {"batch_size": 8, "max_examples": 8}}))
    out = tmp_path / "sweep"
    lines: list[str] = []
    with pytest.raises(ConfigError, match=r"train.steps \(8\), which must be more than the sweep's --steps \(8\)"):
        run_sweep(config, out, lrs=[1e-3, 1e-1], steps=8, confirm=True, log=lines.append)
    assert not out.exists()

    run_sweep(config, out, lrs=[1e-3, 1e-1], steps=4, confirm=True, log=lines.append)
    first = next(line.split()[1] for line in lines if line.startswith("picked: "))
    lower = "lr=0.001" if first == "lr=0.1" else "lr=0.0003"
    assert not any(line.startswith("note: train.steps") for line in lines)  # --confirm does what the note asks
    grid = yaml.safe_load((out / "confirm" / "grid.yaml").read_text())
    assert grid["axes"] == {"optimizer.lr": sorted([float(lower[3:]), float(first[3:])]), "seed": [0]}
    assert grid["budget"] == {"steps": 8} and grid["base"]["train"]["eval_every"] == 1  # 8 steps, at most 16 evaluations
    assert grid["base"]["train"]["keep_best"] is False  # the long run keeps the config's own setting

    def late(setting):  # the rule, from the long runs' own records: the mean dev over the last half
        records = (out / "confirm" / "cells" / f"{setting},seed=0" / "metrics.jsonl").read_text().splitlines()
        dev = [json.loads(x)["dev"]["accuracy"] for x in records if "dev" in json.loads(x)]
        stopped = json.loads((out / "confirm" / "cells" / f"{setting},seed=0" / "summary.json").read_text())
        return -1.0 if stopped.get("diverged_at_step") else sum(dev[len(dev) // 2:]) / len(dev[len(dev) // 2:])

    expected = max([lower, first], key=lambda s: (late(s), -float(s[3:])))  # a tie: the lower lr
    picked = yaml.safe_load((out / "picked.yaml").read_text())
    assert picked["optimizer"]["lr"] == float(expected[3:]) and picked["train"]["steps"] == 8
    assert any(line.startswith(f"confirmed: {expected} ") and f"confirm/cells/{expected},seed=0" in line for line in lines)
    table = (out / "sweep.md").read_text()
    assert "late dev (last half)" in table and f"picked: {first} " in table and f"confirmed: {expected} " in table

    lines.clear()
    run_sweep(config, out, lrs=[1e-3, 1e-1], steps=4, confirm=True, log=lines.append)  # again: nothing re-run
    assert sum("2 finished (skipped), 0 to run" in line for line in lines) == 2
