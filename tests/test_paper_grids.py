"""The papers' grids (configs/bench/paper/): each expands with the paper's models and tasks, states
its GPU hours, and runs its tiny version here: every cell, through the same configs, on a tiny
random model, one step, with the offline default task in place of the hub's."""

from __future__ import annotations

from pathlib import Path

import pytest

from zotune.bench import load_grid
from zotune.cli import main
from zotune.train.trainer import run_eval, run_train

PAPER = sorted((Path(__file__).parents[1] / "configs" / "bench" / "paper").glob("*.yaml"))
QUICK = ["seed=0", "model.dtype=float32", "tuning.trainable_dtype=null", "task.name=rotten_tomatoes", "task.k_shot=2",
         "task.n_train=4", "task.n_dev=2", "task.n_test=4", "train.steps=1", "train.eval_every=1",
         "train.batch_size=2", "train.max_length=48", "train.log_every=1", "eval.max_length=160", "eval.icl_shots=2",
         "eval.batch_size=4", "eval.zero_shot=false"]


def test_there_are_paper_grids():
    assert {p.stem for p in PAPER} >= {"zo-bench-sst2", "zo-bench-copa-winogrande", "mezo-opt13b", "jaguar-muon-sst2",
                                       "mezo-roberta-k16"}


@pytest.mark.parametrize("path", PAPER, ids=lambda p: p.stem)
def test_paper_grid_expands_with_its_models_and_states_its_gpu_hours(path, tmp_path, capsys):
    text = path.read_text()
    assert "GPU hours" in text and "zotune bench --grid configs/bench/paper/" in text
    assert main(["bench", "--grid", str(path), "--out", str(tmp_path / "b"), "--dry-run"]) == 0
    listing = capsys.readouterr().out.splitlines()
    grid = load_grid(path)
    assert len(listing) == len(grid.cells) + 3 and listing[-1].startswith("time left: not known")
    models = {c.cfg.model.name for c in grid.cells}
    assert all(m.count("/") == 1 for m in models)  # hub models of the papers, not the embedded one
    assert not (tmp_path / "b").exists()  # a dry run writes nothing


@pytest.mark.parametrize("path", PAPER, ids=lambda p: p.stem)
def test_paper_grid_runs_its_tiny_version(path, tiny_model_dir, tiny_opt_dir, tiny_roberta_dir, tmp_path):
    """A tiny OPT stands in for a grid of OPT models, a tiny RoBERTa (with LM-BFF's template on the
    default task) for masked LMs, a tiny Llama for the others."""
    models = {c.cfg.model.name for c in load_grid(path).cells}
    extra = []
    if all(m.startswith("facebook/opt") for m in models):
        tiny = tiny_opt_dir
    elif all("roberta" in m for m in models):
        tiny = tiny_roberta_dir
        extra = ["task={text_template: '{text} It was {mask} .', choices: {0: ' terrible', 1: ' great'}}"]
    else:
        tiny = tiny_model_dir
    grid = load_grid(path, [f"model.name={tiny}", *extra, *QUICK])
    assert {c.cfg.model.name for c in grid.cells} == {str(tiny)}
    for cell in grid.cells:
        run = run_eval if cell.command == "eval" else run_train
        summary = run(cell.cfg, tmp_path / cell.name, log=lambda *_: None)
        assert summary["steps"] == (0 if cell.command == "eval" else 1), cell.name
        assert 0.0 <= summary["eval"][next(iter(summary["eval"]))] <= 1.0
