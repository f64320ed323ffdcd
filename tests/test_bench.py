"""`zotune bench`: grid validation and expansion, cells as processes (skip, fail, resume), report."""

from __future__ import annotations

import csv
import json
import re
import signal
import statistics
import struct
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from zotune.bench import load_grid, run_bench
from zotune.bench.grid import cell_names, whole_grid
from zotune.bench.benchdir import Outcome, _same_config
from zotune.bench.dev_scores import dev_fall, fell_far, late_score
from zotune.bench.plots import memory_points, paired_differences
from zotune.bench.report import late_format, report_lines
from zotune.bench.results import Result, collect
from zotune.bench.runner import BenchDir, plan_rows
from zotune.cli import main
from zotune.config import CONFIG_VERSION, OptimizerConfig, from_dict, load_config
from zotune.errors import ConfigError
from zotune.optim.factory import build_optimizer, forwards_per_step
from zotune.optim.registry import optimizer_names
from zotune.tuning import layer_blocks

from .conftest import tiny_llama

GRIDS = sorted(p for p in (Path(__file__).parents[1] / "configs" / "bench").rglob("*.yaml")
               if "paper" not in p.parts)  # the paper grids: tests/test_paper_grids.py


def write_grid(path: Path, grid: dict) -> Path:
    path.write_text(yaml.safe_dump(grid, sort_keys=False), encoding="utf-8")
    return path


def states(rows: list[tuple[str, ...]]) -> list[str]:
    """The state column of :func:`plan_rows`."""
    return [row[6] for row in rows]


def tiny_grid(model_dir: Path, csv_path: Path) -> dict:
    """ZOSGD and AdamW x 2 seeds at 8 forward passes; (AdamW, seed 1) fails at run time."""
    return {
        "description": "tiny grid",
        "base": {
            "model": {"name": str(model_dir)},
            "task": {"path": str(csv_path), "text_template": "{text} It was", "choices": {"0": " bad", "1": " good"},
                     "k_shot": 4},
            "train": {"batch_size": 4, "log_every": 1, "eval_every": 2},
            "eval": {"batch_size": 8, "max_examples": 8},
            "optimizer.lr": 1.0e-3,
        },
        "axes": {"optimizer.name": ["ZOSGD", "AdamW"], "seed": [0, 1]},
        "overrides": [{"when": {"optimizer.name": "AdamW", "seed": 1}, "set": {"model.name": "/no/such/model"}}],
        "budget": {"forward_passes": 8},
    }


# -- forward passes per step -------------------------------------------------------------------
@pytest.mark.parametrize("name", optimizer_names())
@pytest.mark.parametrize("n_queries, blockwise", [(1, False), (3, False), (2, True)])
def test_forwards_per_step_matches_the_optimizer(name, n_queries, blockwise):
    """The count without a model is the instantiated optimizer's (block-wise: over the tiny
    model's layer blocks); an optimizer that refuses block-wise is refused by both."""
    cfg = OptimizerConfig(name=name, n_queries=n_queries, blockwise=blockwise)
    model = tiny_llama()
    params = list(model.parameters())
    groups = layer_blocks(model, params) if blockwise else params
    n_blocks = len(groups) if blockwise else 1
    try:
        opt = build_optimizer(cfg, groups, "full", seed=0)
    except ConfigError:
        with pytest.raises(ConfigError):
            forwards_per_step(cfg, n_blocks)
        return
    expected = getattr(opt, "forwards_per_step", 1)  # first-order: one forward (+ backward) per step
    assert forwards_per_step(cfg, n_blocks) == expected


# -- grids -------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", GRIDS, ids=[p.name for p in GRIDS])
def test_ready_made_grids_expand(path, capsys):
    grid = load_grid(path)
    assert grid.cells and len({c.name for c in grid.cells}) == len(grid.cells)
    assert grid.budget.kind in ("forward_passes", "steps")
    assert main(["bench", "--grid", str(path), "--out", "/nonexistent/never-written", "--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == len(grid.cells) + 3  # a line about the grid, the header, the cells, the time left
    assert out[-1] == f"time left: not known until a cell of each configuration has run here ({len(grid.cells)} to run)"
    assert not Path("/nonexistent/never-written").exists()


def test_expansion_overrides_and_budget(tmp_path):
    grid = load_grid(write_grid(tmp_path / "g.yaml", {
        "base": {"train": {"steps": 5}},
        "axes": {"optimizer.name": ["ZOSGD", "ZOSGDConservative", "ForwardGrad", "AdamW"],
                 "tuning.scheme": ["full", "lora"], "optimizer.n_queries": [1, 2]},
        "overrides": [{"when": {"tuning.scheme": "lora", "optimizer.name": ["ZOSGD", "AdamW"]},
                       "set": {"optimizer.lr": 1.0e-4}}],
        "budget": {"forward_passes": 24},
    }))
    assert len(grid.cells) == 16
    by = {(c.axes["optimizer.name"], c.axes["tuning.scheme"], c.axes["optimizer.n_queries"]): c for c in grid.cells}
    steps = {k: c.cfg.train.steps for k, c in by.items() if k[1] == "full"}
    assert steps == {("ZOSGD", "full", 1): 12, ("ZOSGD", "full", 2): 6, ("ZOSGDConservative", "full", 1): 4,
                     ("ZOSGDConservative", "full", 2): 3, ("ForwardGrad", "full", 1): 24, ("ForwardGrad", "full", 2): 12,
                     ("AdamW", "full", 1): 24, ("AdamW", "full", 2): 24}
    assert by[("ZOSGD", "lora", 1)].cfg.optimizer.lr == 1e-4 and by[("AdamW", "lora", 2)].cfg.optimizer.lr == 1e-4
    assert by[("ZOSGD", "full", 1)].cfg.optimizer.lr is None and by[("ForwardGrad", "lora", 1)].cfg.optimizer.lr is None
    assert by[("ZOSGD", "lora", 2)].name == "optimizer=ZOSGD,scheme=lora,n_queries=2"
    assert grid.cells[0].name == "optimizer=ZOSGD,scheme=full,n_queries=1"  # first axis slowest


def test_cell_names_are_safe_and_unique():
    names = cell_names([{"model.name": "a/b c", "task.name": "x"}, {"model.name": "a_b_c", "task.name": "x"}])
    assert len(set(names)) == 2 and all(re.fullmatch(r"[A-Za-z0-9._+=,-]+", n) for n in names)
    assert names[0].startswith("model=a_b_c,task=x-")


@pytest.mark.parametrize("grid, needle", [
    ({"axes": {"seed": [0]}, "axis": {}}, "unknown key 'axis'"),
    ({"axes": {"seed": 0}}, "axis 'seed' must be a non-empty list"),
    ({"axes": {"seed": [0, 0]}}, "lists a value twice"),
    ({"axes": {"optimizer.nam": ["ZOSGD"]}}, "unknown config key 'optimizer.nam'"),
    ({"axes": {"optimizer.name": ["ZOSGD", "Nope"]}}, "unknown optimizer.name 'Nope'"),
    ({"base": {"train": {"stepz": 3}}}, "unknown config key 'train.stepz'"),
    ({"base": {"task": {"name": "nope"}}}, "unknown task 'nope'"),
    ({"overrides": {"when": {}, "set": {}}}, "overrides must be a list"),
    ({"overrides": [{"when": {"seed": 0}}]}, "exactly the keys 'when' and 'set'"),
    ({"overrides": [{"when": {"sed": 0}, "set": {"seed": 1}}]}, "unknown config key 'sed'"),
    ({"overrides": [{"when": {"seed": 0}, "set": {"optimizer.lr": -1}}]}, "optimizer.lr"),
    ({"budget": {"forward_passes": 0}}, "budget.forward_passes must be an integer >= 1"),
    ({"budget": {"flops": 3}}, "budget must be {forward_passes: N} or {steps: N}"),
    ({"budget": {"steps": 3}, "axes": {"train.steps": [1, 2]}}, "train.steps is set by the budget"),
    ({"budget": {"forward_passes": 4}, "base": {"optimizer": {"name": "ZOSGDConservative"}}}, "less than one step"),
    ({"budget": {"forward_passes": 40}, "base": {"optimizer": {"blockwise": True}}}, "block-wise"),
    ({"dev_levels": [0.7, 70]}, "dev_levels must be a list of dev scores in (0, 1]"),
    ({"dev_levels": 0.7}, "dev_levels must be a list"),
    ({"axes": {"seed": [0, 1]}, "paired_with": {"seed": 0}}, "paired_with: 'seed' is not an axis"),
    ({"axes": {"optimizer.name": ["ZOSGD"]}, "paired_with": {"optimizer.name": "FZOO"}}, "has no value 'FZOO'"),
    ({"axes": {"optimizer.name": ["ZOSGD"]}, "paired_with": "ZOSGD"}, "paired_with must name one axis"),
    ([1, 2], "must hold a mapping"),
])
def test_malformed_grid_is_one_line_and_exit_2(tmp_path, capsys, grid, needle):
    path = write_grid(tmp_path / "bad.yaml", grid)
    assert main(["bench", "--grid", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("zotune: error: ") and needle in err, err
    assert not (tmp_path / "out").exists()


def test_missing_grid_file(tmp_path, capsys):
    assert main(["bench", "--grid", str(tmp_path / "none.yaml"), "--out", str(tmp_path / "o")]) == 2
    assert "grid file" in capsys.readouterr().err


# -- a tiny grid, end to end -------------------------------------------------------------------
def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def table_row(report: str, title: str, label: str) -> list[str]:
    section = report.split(f"## {title}", 1)[1].split("\n## ", 1)[0]
    line = next(line for line in section.splitlines() if line.startswith(f"| {label} |"))
    return [c.strip() for c in line.strip("|").split("|")][1:]


def test_a_run_at_the_lr_a_new_version_made_the_default_is_the_cell_s_run(tiny_model_dir, reviews_csv, tmp_path):
    """A cell without an lr in a grid without a version: a run recorded at an older version is its run when it
    used that version's default lr (it stays done) or, given explicitly, the current version's (version 17 made
    JAGUAR's full lr 3e-5: an lr sweep's 3e-5 run at version 16 is the grid's cell now); another lr is not."""
    grid = tiny_grid(tiny_model_dir, reviews_csv)
    del grid["base"]["optimizer.lr"]
    grid.update(axes={"optimizer.name": ["JaguarSignSGD"], "seed": [0]}, overrides=[])
    (cell,) = load_grid(write_grid(tmp_path / "grid.yaml", grid)).cells
    assert CONFIG_VERSION >= 17
    run = tmp_path / "run"
    run.mkdir()
    same = {}
    for lr in (None, 1e-4, 3e-5, 1e-5):  # version 16's default is 1e-4
        raw = {**cell.config, "version": 16, "optimizer": {**cell.config["optimizer"], "lr": lr}}
        recorded = from_dict(raw, check_device=False)
        (run / "config.yaml").write_text(yaml.safe_dump(recorded.to_dict(), sort_keys=False))
        same[lr] = _same_config(run / "config.yaml", cell)
    assert same == {None: True, 1e-4: True, 3e-5: True, 1e-5: False}


def test_tiny_grid_runs_skips_fails_and_reports(tiny_model_dir, reviews_csv, tmp_path, capsys):
    grid_path = write_grid(tmp_path / "grid.yaml", {**tiny_grid(tiny_model_dir, reviews_csv), "dev_levels": [0.001, 1.0]})
    out = tmp_path / "bench"
    lines: list[str] = []
    assert run_bench(grid_path, out, jobs=2, log=lines.append, interactive=False) == 1  # one cell failed
    cells = {c.name: c for c in load_grid(grid_path).cells}
    ok = [n for n in cells if "AdamW,seed=1" not in n]
    failed = "optimizer=AdamW,seed=1"
    assert any("FAILED" in line and failed in line for line in lines) and any("ETA" in line for line in lines)

    # results.csv: the contract's columns, numbers from each cell's summary.json
    rows = {r["run_dir"]: r for r in read_csv(out / "results.csv")}
    header = list(next(iter(rows.values())))
    assert header[:5] == ["optimizer.name", "seed", "status", "run_dir", "eval.accuracy"]
    assert header[header.index("forward_passes"):header.index("error") + 1] == ["forward_passes", "peak_rss_mb", "wall_s", "error"]
    summaries = {}
    for name in ok:
        row = rows[f"cells/{name}"]
        summaries[name] = s = json.loads((out / "cells" / name / "summary.json").read_text())
        assert row["status"] == "ok" and row["error"] == ""
        assert float(row["eval.accuracy"]) == s["eval"]["accuracy"]
        assert int(row["forward_passes"]) == s["forward_passes"] == 8
        assert float(row["peak_rss_mb"]) == s["peak_rss_mb"] and float(row["wall_s"]) == s["wall_s"]
        # a cell keeps no weights unless the grid asks (train.save_weights; ZO cells keep their trajectory)
        assert not list((out / "cells" / name).glob("*.safetensors")) and load_config(out / "configs" / f"{name}.yaml").train.save_weights is False
    assert (out / "cells" / "optimizer=ZOSGD,seed=0" / "trajectory.bin").is_file()
    bad = rows[f"cells/{failed}"]
    assert bad["status"] == "failed" and "not found" in bad["error"] and bad["eval.accuracy"] == ""
    assert (bad["optimizer.name"], bad["seed"]) == ("AdamW", "1")

    # report.md: mean +- std over seeds, from the same summaries; best in bold; the budget stated
    report = (out / "report.md").read_text()
    zo = [summaries[f"optimizer=ZOSGD,seed={s}"]["eval"]["accuracy"] for s in (0, 1)]
    adamw = summaries["optimizer=AdamW,seed=0"]["eval"]["accuracy"]
    zo_text = f"{statistics.fmean(zo):.3f} ± {statistics.stdev(zo):.3f}"
    assert table_row(report, "Test accuracy", "ZOSGD")[0].strip("*") == zo_text
    assert table_row(report, "Test accuracy", "AdamW")[0].strip("*") == f"{adamw:.3f} (1/2 ok)"
    best = max(round(statistics.fmean(zo), 3), round(adamw, 3))
    assert table_row(report, "Test accuracy", "ZOSGD" if round(statistics.fmean(zo), 3) == best else "AdamW")[0].startswith("**")
    memory = statistics.fmean(summaries[f"optimizer=ZOSGD,seed={s}"]["peak_rss_mb"] for s in (0, 1))
    assert table_row(report, "Peak memory", "ZOSGD")[0].strip("*") == f"{round(memory):,}"
    assert table_row(report, "Forward passes", "AdamW")[0] == "8 (8 steps)"
    assert "equal forward-pass budget of 8" in report and failed in report.split("## Failed cells")[1]
    for png in ("accuracy_vs_forward_passes.png", "accuracy_vs_memory.png", "forwards_to_dev_level.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"]({png})" in report
    assert "Peak GPU memory" not in report and "peak_cuda_allocated_mb" not in header

    # forward passes to a dev level, from each cell's metrics.jsonl: any dev score is >= 0.001 at the first
    # evaluation (step 2: 4 forward passes for ZOSGD, 2 for AdamW); the failed cell never reached anything
    def first_dev(name, level):
        records = [json.loads(x) for x in (out / "cells" / name / "metrics.jsonl").read_text().splitlines()]
        return next((r["forward_passes"] for r in records if r.get("dev", {}).get("accuracy", -1) >= level), None)

    assert table_row(report, "Forward passes to reach dev accuracy >= 0.001", "ZOSGD")[0].strip("*") == f"{first_dev('optimizer=ZOSGD,seed=0', 0.001):,}"
    assert table_row(report, "Forward passes to reach dev accuracy >= 0.001", "AdamW")[0] == f"{first_dev('optimizer=AdamW,seed=0', 0.001):,} (1/2)"
    perfect = [first_dev(f"optimizer=ZOSGD,seed={s}", 1.0) for s in (0, 1)]
    if perfect == [None, None]:
        assert table_row(report, "Forward passes to reach dev accuracy >= 1", "ZOSGD")[0] == "- (0/2)"

    # cells run on CUDA carry the GPU's peaks (summary.json), which the CSV and the report show
    from zotune.bench.report import write_report

    for s in summaries.values():
        s.update(peak_cuda_allocated_mb=1234.5, peak_cuda_reserved_mb=2000.0)
    for name, s in summaries.items():
        (out / "cells" / name / "summary.json").write_text(json.dumps(s))
    write_report(load_grid(grid_path), BenchDir(out))
    row = next(r for r in read_csv(out / "results.csv") if r["status"] == "ok")
    assert (row["peak_cuda_allocated_mb"], row["peak_cuda_reserved_mb"]) == ("1234.5", "2000.0")
    assert table_row((out / "report.md").read_text(), "Peak GPU memory", "ZOSGD")[0].strip("*") == "1,234"

    # the same command again: finished cells are skipped, the failed one runs again; an
    # unfinished cell (summary.json gone) is resumed or, if train cannot, started over
    stamps = {n: (out / "cells" / n / "summary.json").stat().st_mtime_ns for n in ok}
    unfinished = ok[0]
    (out / "cells" / unfinished / "summary.json").unlink()
    lines.clear()
    assert run_bench(grid_path, out, log=lines.append, interactive=False) == 1
    assert lines[0].endswith("4 cells, 2 finished (skipped), 2 to run")
    assert all(stamps[n] == (out / "cells" / n / "summary.json").stat().st_mtime_ns for n in ok if n != unfinished)
    assert (out / "cells" / unfinished / "summary.json").is_file()
    assert sum(r["status"] == "ok" for r in read_csv(out / "results.csv")) == 3

    # a changed grid makes its cells stale (run again with --overwrite); the dry run says so
    changed = tiny_grid(tiny_model_dir, reviews_csv)
    changed["base"]["eval"]["batch_size"] = 4
    assert states(plan_rows(load_grid(write_grid(tmp_path / "g2.yaml", changed)), BenchDir(out))) == \
        ["stale", "stale", "stale", "failed"]
    # ... but not one that changes only which files a cell keeps
    keeps = tiny_grid(tiny_model_dir, reviews_csv)
    keeps["base"]["train"]["save_weights"] = True
    assert states(plan_rows(load_grid(write_grid(tmp_path / "g3.yaml", keeps)), BenchDir(out))) == \
        ["done", "done", "done", "failed"]
    # a grid that pins a config version matches the cells whose resolved settings it leaves as they were
    # (version 3: the same defaults as now for these cells, lr given) and no others (version 1: ZOSGD without the
    # noise table; AdamW's settings are the same)
    for version, expected in ((3, ["done", "done", "done", "failed"]), (1, ["stale", "stale", "done", "failed"])):
        pinned = tiny_grid(tiny_model_dir, reviews_csv)
        pinned["base"]["version"] = version
        grid = load_grid(write_grid(tmp_path / f"v{version}.yaml", pinned))
        assert states(plan_rows(grid, BenchDir(out))) == expected
    assert load_config(out / "configs" / f"{ok[0]}.yaml").train.steps == 4

    # --report-only: the report of the cells finished so far, a third seed's cells "not run yet", nothing run
    more = {**tiny_grid(tiny_model_dir, reviews_csv), "dev_levels": [0.001]}
    more["axes"]["seed"] = [0, 1, 2]
    assert main(["bench", "--grid", str(write_grid(tmp_path / "g4.yaml", more)), "--out", str(out), "--report-only"]) == 0
    report = (out / "report.md").read_text()
    assert "6 cells, 3 ok, 1 failed, 2 not run yet." in report
    assert report.split("## Not run yet (2 of 6 cells)")[1].split("##")[0].strip() == \
        "`optimizer=ZOSGD,seed=2`, `optimizer=AdamW,seed=2`"
    assert not (out / "cells" / "optimizer=ZOSGD,seed=2").exists()
    reach = table_row(report, "Forward passes to reach dev accuracy >= 0.001", "AdamW")[0]
    assert reach == f"{first_dev('optimizer=AdamW,seed=0', 0.001):,} (1/2)"  # of the cells that ran: seed 2 waits
    with pytest.raises(ConfigError, match="holds no bench run"):
        run_bench(grid_path, tmp_path / "empty", report_only=True)

    # --archive: the report and each finished cell's record (config, summary, metrics, trajectory; no weights)
    # outlive --out; a new --out with the same archive starts from the archived cells and runs only the rest.
    # An unfinished ZO cell (here: cut back to step 2) is archived without a summary and resumes from its trajectory
    going = out / "cells" / "optimizer=ZOSGD,seed=1"
    finished_summary = json.loads((going / "summary.json").read_text())
    (going / "summary.json").unlink()
    (going / "metrics.jsonl").write_text("".join((going / "metrics.jsonl").read_text().splitlines(keepends=True)[:2]))
    kept = tmp_path / "docs" / "bench"
    assert main(["bench", "--grid", str(grid_path), "--out", str(out), "--report-only", "--archive", str(kept)]) == 0
    assert "2 finished cells and 1 unfinished (to resume" in capsys.readouterr().out
    assert (kept / "report.md").read_text() == (out / "report.md").read_text()
    assert (kept / "results.csv").read_text() == (out / "results.csv").read_text()
    assert sorted(p.name for p in kept.glob("*.png")) == sorted(p.name for p in out.glob("*.png"))
    assert sorted(p.name for p in (kept / "cells").iterdir()) == sorted(ok)
    zo_cell = "optimizer=ZOSGD,seed=0"
    assert sorted(p.name for p in (kept / "cells" / zo_cell).iterdir()) == \
        ["config.yaml", "metrics.jsonl", "summary.json", "trajectory.bin"]
    assert sorted(p.name for p in (kept / "cells" / going.name).iterdir()) == ["config.yaml", "metrics.jsonl", "trajectory.bin"]
    fresh = tmp_path / "fresh"
    lines.clear()  # the dry run shows what a run would copy in, and copies nothing
    assert run_bench(grid_path, fresh, log=lines.append, dry_run=True, archive=kept) == 0
    columns = [re.split(r"\s{2,}", line) for line in lines[2:-1]]  # columns: two spaces or more apart
    assert [c[6] for c in columns] == ["done (archived)", "partial (archived)", "done (archived)", "todo"]
    # progress: a finished cell's test score, an unfinished one's last step (of 4) and its last dev score
    scores = [json.loads((kept / "cells" / c[0] / "summary.json").read_text())["eval"]["accuracy"]
              for c in columns if c[6] == "done (archived)"]
    assert [c[8] for c in columns if c[6] == "done (archived)"] == [f"test accuracy {s:.3f}" for s in scores]
    last = [json.loads(line) for line in (kept / "cells" / going.name / "metrics.jsonl").read_text().splitlines()][-1]
    assert columns[1][8] == f"step {last['step'] + 1}/4, dev accuracy {last['dev']['accuracy']:.3f}"
    assert len(columns[3]) == 8  # todo: no progress
    # time left: none for a finished cell, an unfinished one's steps to go at its own pace, a todo cell its
    # configuration's finished seeds' wall time (AdamW seed 1: seed 0's); in all, a line under the table
    assert [c[7] for c in columns] == ["-", "<1m", "-", "<1m"]
    assert lines[-1] == ("time left: about <1m for 2 of the 2 unfinished cells, one at a time, at the pace of their "
                         "configurations' cells run here so far")
    assert not fresh.exists()
    lines.clear()
    assert run_bench(grid_path, fresh, log=lines.append, report_only=True, archive=kept) == 0
    assert lines[0] == f"3 cells copied in from {kept}"
    assert states(plan_rows(load_grid(grid_path), BenchDir(fresh))) == ["done", "partial", "done", "todo"]
    assert [r["eval.accuracy"] for r in read_csv(fresh / "results.csv")] == [r["eval.accuracy"] for r in read_csv(out / "results.csv")]
    assert run_bench(grid_path, fresh, log=lines.append, interactive=False) == 1  # (AdamW, seed 1) fails again
    assert "resuming at step 2 by replaying" in (fresh / "logs" / f"{going.name}.out").read_text()
    resumed = fresh / "cells" / going.name
    assert (resumed / "trajectory.bin").read_bytes() == (going / "trajectory.bin").read_bytes()
    assert json.loads((resumed / "summary.json").read_text())["eval"] == finished_summary["eval"]
    assert main(["replay", "--run", str(kept / "cells" / zo_cell), "--out", str(tmp_path / "replayed")]) == 0
    assert json.loads((tmp_path / "replayed" / "summary.json").read_text())["replayed_steps"] == 4
    with pytest.raises(ConfigError, match="another directory than --out"):
        run_bench(grid_path, fresh, archive=fresh)


def test_a_grid_whose_budget_grew_extends_its_zo_cells(tiny_model_dir, reviews_csv, tmp_path):
    """Steps 2 -> 4: the finished ZOSGD cell (here archived, then copied into a fresh --out) is "short" and goes on
    with zotune train --extend, to the trajectory a 4-step cell has from the start; FO cells run again."""
    grid = tiny_grid(tiny_model_dir, reviews_csv)
    grid.update(axes={"optimizer.name": ["ZOSGD", "AdamW"], "seed": [0]}, overrides=[], budget={"steps": 2})
    kept = tmp_path / "kept"
    assert run_bench(write_grid(tmp_path / "g2.yaml", grid), tmp_path / "b2", log=lambda _: None, archive=kept) == 0
    grid["budget"] = {"steps": 4}
    longer = write_grid(tmp_path / "g4.yaml", grid)
    assert run_bench(longer, tmp_path / "ref", overrides=["optimizer.name=ZOSGD"], log=lambda _: None) == 0
    fresh = tmp_path / "fresh"
    lines: list[str] = []
    assert run_bench(longer, fresh, log=lines.append, report_only=True, archive=kept) == 0
    assert lines[0] == f"1 cells copied in from {kept}"  # ZOSGD's, which can go on; AdamW's is another run
    assert states(plan_rows(load_grid(longer), BenchDir(fresh))) == ["short", "todo"]
    assert run_bench(longer, fresh, log=lambda _: None, interactive=False) == 0
    zo, fo = "optimizer=ZOSGD,seed=0", "optimizer=AdamW,seed=0"
    assert "resuming at step 2 by replaying" in (fresh / "logs" / f"{zo}.out").read_text()
    ours, ref = fresh / "cells" / zo, tmp_path / "ref" / "cells" / zo
    assert json.loads((ours / "summary.json").read_text())["eval"] == json.loads((ref / "summary.json").read_text())["eval"]
    assert (ours / "trajectory.bin").read_bytes() == (ref / "trajectory.bin").read_bytes()
    assert json.loads((fresh / "cells" / fo / "summary.json").read_text())["steps"] == 4  # run again, from the start


def test_command_line_overrides_and_baseline_cells(tiny_model_dir, reviews_csv, tmp_path, capsys):
    """`zotune bench --grid G key=value`: applied to every cell last (an axis becomes one value);
    `baselines:` adds `zotune eval` cells that are rows of the report beside the optimizers."""
    grid = tiny_grid(tiny_model_dir, reviews_csv)
    grid["base"]["model"] = {"name": "facebook/opt-13b"}  # the paper's model; the tiny one by override
    grid["axes"] = {"optimizer.name": ["ZOSGD", "AdamW"], "optimizer.lr": [1.0e-3, 1.0e-4], "seed": [0]}
    grid["overrides"] = []
    grid["baselines"] = ["zero_shot", "icl"]
    path = write_grid(tmp_path / "grid.yaml", grid)
    override = [f"model.name={tiny_model_dir}", "optimizer.name=ZOSGD", "eval.icl_shots=2"]
    assert main(["bench", "--grid", str(path), "--out", str(tmp_path / "b"), "--dry-run", *override]) == 0
    listing = capsys.readouterr().out
    cells = [line.split()[0] for line in listing.splitlines()[2:-1]]  # the last line: the time left
    assert cells == ["optimizer=ZOSGD,lr=0.001,seed=0", "optimizer=ZOSGD,lr=0.0001,seed=0",
                     "baseline=zero_shot,seed=0", "baseline=icl,seed=0"]  # lr is a training axis: not repeated
    assert f"overrides: {' '.join(override)}" in listing and "eval (icl)" in listing
    assert all(str(tiny_model_dir) in line and "custom" in line for line in listing.splitlines()[2:-1])

    assert run_bench(path, tmp_path / "b", jobs=2, log=lambda *_: None, interactive=False, overrides=override) == 0
    rows = {r["run_dir"]: r for r in read_csv(tmp_path / "b" / "results.csv")}
    icl = json.loads((tmp_path / "b" / "cells" / "baseline=icl,seed=0" / "summary.json").read_text())
    assert icl["baseline"] == "icl" and icl["steps"] == 0
    assert float(rows["cells/baseline=icl,seed=0"]["eval.accuracy"]) == icl["eval"]["accuracy"]
    report = (tmp_path / "b" / "report.md").read_text()
    assert table_row(report, "Test accuracy", "ICL, lr=-")[0].strip("*") == f"{icl['eval']['accuracy']:.3f}"
    assert table_row(report, "Test accuracy", "zero-shot, lr=-") and "ZOSGD, lr=0.0001" in report

    with pytest.raises(ConfigError, match="baselines must be a list of distinct values of zero_shot, icl, linear_probe"):
        load_grid(write_grid(tmp_path / "bad.yaml", {**grid, "baselines": ["oracle"]}))
    with pytest.raises(ConfigError, match="not of the form key=value"):
        load_grid(path, ["model.name"])


def test_a_grid_run_in_pieces_reports_on_the_whole_grid(tiny_model_dir, reviews_csv, tmp_path):
    """Overrides that only pick cells (``seed=1``: a grid run in pieces, on machines that share an --archive) write the
    report of the whole grid, the other pieces' archived cells included, never one of the piece alone; an override
    that changes the cells (or picks a value the axis lacks) reports on its cells."""
    grid = tiny_grid(tiny_model_dir, reviews_csv)
    grid["overrides"] = []
    path, kept = write_grid(tmp_path / "grid.yaml", grid), tmp_path / "kept"
    assert run_bench(path, tmp_path / "a", log=lambda _: None, overrides=["seed=0"], archive=kept) == 0
    assert "4 cells, 2 ok, 0 failed, 2 not run yet." in (kept / "report.md").read_text()
    score = table_row((kept / "report.md").read_text(), "Test accuracy", "ZOSGD")[0].strip("*")
    assert score.endswith(" (1/2 run)") and "ok)" not in score  # a cell not run yet has not failed
    assert sorted(p.name for p in (kept / "cells").iterdir()) == ["optimizer=AdamW,seed=0", "optimizer=ZOSGD,seed=0"]
    piece = ["optimizer.name=ZOSGD", "seed=1"]  # another machine, another --out
    assert run_bench(path, tmp_path / "b", log=lambda _: None, overrides=piece, archive=kept) == 0
    for report in (kept / "report.md", tmp_path / "b" / "report.md"):
        assert "4 cells, 3 ok, 0 failed, 1 not run yet." in report.read_text()
    assert sorted(r["run_dir"] for r in read_csv(kept / "results.csv")) == \
        sorted(f"cells/{cell.name}" for cell in load_grid(path).cells)
    assert len(whole_grid(load_grid(path, piece)).cells) == 4
    for alone in (["seed=7"], ["seed=0", "eval.max_examples=4"]):
        assert len(whole_grid(load_grid(path, alone)).cells) == 2


def _recorded_on(cell_dir: Path, device_type: str) -> None:
    """Rewrite a cell's trajectory header as if its directions had been drawn on ``device_type``."""
    path = cell_dir / "trajectory.bin"
    data = path.read_bytes()
    length = struct.unpack("<I", data[8:12])[0]
    header = json.loads(data[12 : 12 + length])
    blob = json.dumps({**header, "device_type": device_type}, sort_keys=True).encode()
    path.write_bytes(data[:8] + struct.pack("<I", len(blob)) + blob + data[12 + length :])


def test_where_a_cell_ran_is_placement_not_identity(tiny_model_dir, reviews_csv, tmp_path, capsys):
    """A cell finished with model.device=cpu is done for the same grid at the default device (auto: a GPU machine's
    cells and a CPU machine's make one grid); results.csv says where each ran, the report notes mixed devices, and an
    unfinished cell drawn on a device this machine lacks is not copied in to resume (replay would refuse it)."""
    grid = tiny_grid(tiny_model_dir, reviews_csv)
    grid.update(axes={"optimizer.name": ["ZOSGD"], "seed": [0, 1]}, overrides=[])
    path, out, kept = write_grid(tmp_path / "grid.yaml", grid), tmp_path / "bench", tmp_path / "kept"
    assert run_bench(path, out, log=lambda _: None, interactive=False, overrides=["model.device=cpu"]) == 0
    assert states(plan_rows(load_grid(path), BenchDir(out))) == ["done", "done"]
    assert main(["bench", "--grid", str(path), "--out", str(out), "--report-only", "--archive", str(kept)]) == 0
    assert [r["device"] for r in read_csv(out / "results.csv")] == ["cpu", "cpu"]
    assert "several devices" not in (out / "report.md").read_text()
    cpu_summary = out / "cells" / "optimizer=ZOSGD,seed=0" / "summary.json"  # an older resumed run's summary:
    cpu_summary.write_text(json.dumps({**json.loads(cpu_summary.read_text()), "wall_s": 1.0, "train_wall_s": 50.0}))
    assert main(["bench", "--grid", str(path), "--out", str(out), "--report-only"]) == 0  # its wall_s, this process's
    assert read_csv(out / "results.csv")[0]["wall_s"] == "50.0"  # alone, is at least its training time

    assert json.loads((out / "cells" / "optimizer=ZOSGD,seed=0" / "summary.json").read_text())["device"] == "cpu"
    cuda_cell = "optimizer=ZOSGD,seed=1"  # as a GPU would have written it: summary and trajectory
    _recorded_on(out / "cells" / cuda_cell, "cuda")
    summary = json.loads((out / "cells" / cuda_cell / "summary.json").read_text())
    (out / "cells" / cuda_cell / "summary.json").write_text(json.dumps({**summary, "device": "cuda", "peak_rss_mb": 12345.0,
                                                                     "peak_cuda_allocated_mb": 678.0}))
    assert main(["bench", "--grid", str(path), "--out", str(out), "--report-only"]) == 0
    assert [r["device"] for r in read_csv(out / "results.csv")] == ["cpu", "cuda"]
    report = (out / "report.md").read_text()
    assert "Cells ran on several devices (1 on cpu, 1 on cuda" in report
    rss = [row["peak_rss_mb"] for row in read_csv(out / "results.csv")]  # a table per device, each of its own cells
    assert rss[1] == "12345.0"
    for device, value in zip(("cpu", "cuda"), rss):
        table = f"Peak memory (MB: peak resident set size of the cell's process, cells run on {device})"
        assert table_row(report, table, "ZOSGD") == [f"{float(value):,.0f}"]
    grid_now = load_grid(path)  # the memory plot: a panel per device, a GPU's by torch's peak allocation
    points = memory_points(grid_now, [r for r in collect(grid_now, BenchDir(out)) if r.ok])
    assert {device: [p[3] for p in ps] for device, ps in points.items()} == {"cpu": [float(rss[0])], "cuda": [678.0]}

    for device in ("cuda", "cpu"):  # an unfinished cell of each kind in the archive; this machine has no GPU
        _recorded_on(kept / "cells" / cuda_cell, device)
        (kept / "cells" / cuda_cell / "summary.json").unlink(missing_ok=True)
        fresh = tmp_path / f"fresh-{device}"
        lines: list[str] = []
        assert run_bench(path, fresh, log=lines.append, report_only=True, archive=kept) == 0
        restored = 2 if device == "cpu" or torch.cuda.is_available() else 1
        assert lines[0] == f"{restored} cells copied in from {kept}"
        assert (fresh / "cells" / cuda_cell / "trajectory.bin").is_file() == (restored == 2)

    # archiving never writes a cell unfinished here over the archive's finished one (run to the end elsewhere)
    done_cell = "optimizer=ZOSGD,seed=0"
    archived = {f: (kept / "cells" / done_cell / f).read_bytes() for f in ("summary.json", "trajectory.bin")}
    (out / "cells" / done_cell / "summary.json").unlink()
    _recorded_on(out / "cells" / done_cell, "cuda")
    done, going = BenchDir(out).archive_into(BenchDir(kept), load_grid(path))  # as a bench that began before
    assert done_cell not in done + going
    assert {f: (kept / "cells" / done_cell / f).read_bytes() for f in archived} == archived


def test_time_limit_stops_the_bench_seed_by_seed(tiny_model_dir, reviews_csv, tmp_path, capsys):
    """--time-limit: the running cell stops at a step and checkpoints, the report and the archive are written (the
    unfinished cell's trajectory kept to resume), exit 130, also with SIGINT ignored (a job started with ``nohup ... &``:
    the limit once was a SIGINT to itself). Cells run seed by seed: after (ZOSGD, 0), which fails at once, comes
    (ZOAdam, 0), not (ZOSGD, 1). 30 s: two cells start (a process each, up to ~10 s on a loaded 2-core machine) and one trains."""
    grid = tiny_grid(tiny_model_dir, reviews_csv)
    grid.update(axes={"optimizer.name": ["ZOSGD", "ZOAdam"], "seed": [0, 1]}, budget={"forward_passes": 20_000},
                overrides=[{"when": {"optimizer.name": "ZOSGD", "seed": 0}, "set": {"model.name": "/no/such/model"}}])
    grid["base"]["train"].update(eval_every=100_000, log_every=100_000)
    path, out, kept = write_grid(tmp_path / "grid.yaml", grid), tmp_path / "bench", tmp_path / "kept"
    sigint = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        assert main(["bench", "--grid", str(path), "--out", str(out), "--archive", str(kept), "--time-limit", "30"]) == 130
    finally:
        signal.signal(signal.SIGINT, sigint)
    assert signal.getsignal(signal.SIGALRM) == signal.SIG_DFL and signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    printed = capsys.readouterr()
    assert "--time-limit 30 s reached" in printed.out and "interrupted" in printed.err
    started = list(dict.fromkeys(re.findall(r"\] (optimizer=\S+?):", printed.out)))
    assert started == ["optimizer=ZOSGD,seed=0", "optimizer=ZOAdam,seed=0"]
    going = "optimizer=ZOAdam,seed=0"
    assert (out / "cells" / going / "checkpoints").is_dir() and not (out / "cells" / going / "summary.json").exists()
    # the cell stopped by the limit is unfinished, not failed (it goes on from its checkpoint); the bad model failed
    assert "4 cells, 0 ok, 1 failed, 3 not run yet." in (out / "report.md").read_text()
    assert sorted(p.name for p in (kept / "cells" / going).iterdir()) == ["config.yaml", "trajectory.bin"]  # no log yet
    assert main(["bench", "--grid", str(path), "--out", str(out), "--time-limit", "0"]) == 2
    assert "--time-limit must be a positive number" in capsys.readouterr().err


def test_one_legend_names_every_panels_rows():
    """A row finished in one column only (here: the second panel's) is in the legend, in the layout's order."""
    from zotune.bench.plots import _legend, _panels

    fig, axes = _panels(2)
    axes[0][0].plot([0, 1], [0, 1], label="ZOSGD")
    axes[0][1].plot([0, 1], [1, 0], label="JaguarSignSGD")
    axes[0][1].plot([0, 1], [0, 1], label="ZOSGD")
    _legend(fig, ["ZOSGD", "ZOAdam", "JaguarSignSGD"])
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["ZOSGD", "JaguarSignSGD"]


def test_forwards_table_says_how_many_cells_diverged():
    """A cell stopped by train.divergence_ratio is finished (tested as it stood); the forward-pass table says so."""
    from zotune.bench.benchdir import Outcome
    from zotune.bench.report import forwards_format
    from zotune.bench.results import Result

    def ok(**summary) -> Result:
        return Result(None, Outcome("ok"), {"forward_passes": 1350, "steps": 675, **summary}, Path("."))

    assert forwards_format([ok(), ok()]) == (None, "1350 (675 steps)")
    diverged = ok(forward_passes=882, steps=441, diverged_at_step=441)
    assert forwards_format([ok(), diverged]) == (None, "882/1350 (441/675 steps, 1 diverged)")


def test_the_late_dev_score_reads_where_a_curve_ends_and_how_far_it_fell():
    peak = [0.6, 0.8, 0.7, 0.6, 0.6, 0.5]  # an early peak, then down: the last half's mean is 0.567
    assert late_score(peak) == pytest.approx(0.5666667) and dev_fall(peak) == pytest.approx(0.2333333)
    assert fell_far(peak) and not fell_far([0.5, 0.6, 0.7, 0.7])  # a rising curve ends at its best
    assert late_score([0.7]) == 0.7 and late_score([]) is None and dev_fall([]) is None and not fell_far([])

    def result(dev, diverged=False):  # what late_format reads of a Result
        return SimpleNamespace(ok=dev is not None, not_run=dev is None, dev_scores=dev or [], diverged=diverged)

    value, text = late_format([result(peak), result([0.5, 0.6, 0.7, 0.7]), result(None)])
    assert value == pytest.approx(round((0.5666667 + 0.7) / 2, 3)) and text.endswith(" (1 fell > 0.1)")
    assert text.startswith(f"{(0.5666667 + 0.7) / 2:.3f} ± ")  # mean ± std over the finished cells
    assert late_format([result(None)]) == (None, "not run")
    # a run that diverged after its last evaluation: its curve holds, the table still says so
    _, text = late_format([result([0.6, 0.7, 0.7], diverged=True), result([0.6, 0.7])])
    assert text.endswith(" ± 0.000 (1 diverged)")
    _, text = late_format([result(peak, diverged=True)])
    assert text == f"{0.5666667:.3f} (1 fell > 0.1, 1 diverged)"


def test_paired_tables_subtract_the_partner_on_the_same_seed(tmp_path):
    """``paired_with: {optimizer.name: ZOSGD}``: each cell minus ZOSGD's on its scheme and seed, so a seed that
    lifts every method (seed 1 here, +0.2) cancels: FZOO is ahead on both seeds by 0.02 and 0.04, though its
    scores' spread (0.1 apart) would hide that in a mean ± std table. A piece of the grid (an axis override) keeps
    the pairing; an unfinished partner leaves its pair out."""
    path = write_grid(tmp_path / "grid.yaml", {
        "base": {"task": {"name": "rotten_tomatoes"}, "train": {"steps": 2}},
        "axes": {"optimizer.name": ["ZOSGD", "FZOO"], "tuning.scheme": ["full"], "seed": [0, 1]},
        "paired_with": {"optimizer.name": "ZOSGD"}})
    grid = load_grid(path)
    assert grid.paired_with == ("optimizer.name", "ZOSGD")
    assert load_grid(path, ["optimizer.name=FZOO"]).paired_with == ("optimizer.name", "ZOSGD")
    scores = {("ZOSGD", 0): 0.50, ("ZOSGD", 1): 0.70, ("FZOO", 0): 0.52, ("FZOO", 1): 0.74}
    devs = {("ZOSGD", 0): [0.5] * 4, ("ZOSGD", 1): [0.6, 0.6, 0.7, 0.7], ("FZOO", 0): [0.6] * 4, ("FZOO", 1): [0.6] * 4}
    results = []
    for cell in grid.cells:
        key = (cell.axes["optimizer.name"], cell.axes["seed"])
        run_dir = tmp_path / cell.name
        run_dir.mkdir()
        (run_dir / "metrics.jsonl").write_text("".join(
            json.dumps({"step": i, "forward_passes": 2 * i + 2, "dev": {"accuracy": d}}) + "\n"
            for i, d in enumerate(devs[key])))
        results.append(Result(cell, Outcome("ok"), {"eval": {"accuracy": scores[key]}, "forward_passes": 4}, run_dir))
    report = "\n".join(report_lines(grid, results, []))
    title = "Test accuracy minus ZOSGD's on the same scheme and seed"
    assert table_row(report, title, "ZOSGD") == ["reference"]
    assert table_row(report, title, "FZOO") == [f"+0.030 ± {statistics.stdev([0.02, 0.04]):.3f} (ahead on 2/2)"]
    # late dev: FZOO 0.6 and 0.6 against ZOSGD's 0.5 and 0.7 (the mean of each curve's last half)
    assert table_row(report, "Late dev accuracy minus ZOSGD's", "FZOO") == [
        f"+0.000 ± {statistics.stdev([0.1, -0.1]):.3f} (ahead on 1/2)"]
    assert paired_differences(grid, results, tmp_path / "paired.png")[0] == "paired.png"
    assert (tmp_path / "paired.png").stat().st_size > 0
    results[1] = Result(results[1].cell, Outcome("failed", "not run"), None, results[1].run_dir)  # ZOSGD seed 1
    report = "\n".join(report_lines(grid, results, []))
    assert table_row(report, title, "FZOO") == ["+0.020 (ahead on 1/1)"]
    assert paired_differences(grid, [r for r in results if r.cell.axes["seed"] == 1], tmp_path / "none.png") is None
