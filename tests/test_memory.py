"""`zotune memory`: exact optimizer-state accounting, the breakdown, the outputs, bad input."""

from __future__ import annotations

import csv

import pytest

from zotune.cli import main
from zotune.config import load_config
from zotune.profiling.memory import INFERENCE, PARTS, Cell, measure_cell, plot_memory, write_csv, write_markdown


def _cfg(model_dir):
    return load_config(None, [f"model.name={model_dir}"])


@pytest.fixture(scope="module")
def cells(tiny_model_dir):
    """ZOSGD, ZOAdam and AdamW cells measured in this process (exact tensor bytes; the RSS
    figures of a test process mean little)."""
    cfg = _cfg(tiny_model_dir)
    return {name: measure_cell(cfg, Cell(name, "full", 16, 2, 2, "cpu")) for name in ("ZOSGD", "ZOAdam", "AdamW")}


def test_zosgd_keeps_no_optimizer_state(cells):
    row = cells["ZOSGD"]
    assert row["trainable_bytes"] > 0 and row["trainable_bytes"] == 4 * row["trainable_params"]
    assert row["optimizer_state_bytes"] == 0 and row["gradients_bytes"] == 0


def test_zoadam_state_is_two_moments(cells):
    row = cells["ZOAdam"]
    assert row["optimizer_state_bytes"] == 2 * row["trainable_bytes"]
    assert row["gradients_bytes"] == 0


def test_adamw_state_is_two_moments_plus_step_counters(cells):
    row = cells["AdamW"]
    extra = row["optimizer_state_bytes"] - 2 * row["trainable_bytes"]
    assert 0 <= extra < 1024 and extra % 4 == 0  # one scalar `step` per parameter tensor
    assert row["gradients_bytes"] == row["trainable_bytes"]


def test_breakdown_sums_to_the_peak(cells):
    for row in cells.values():
        assert sum(row[f"{p}_bytes"] for p in PARTS) == row["peak_bytes"]
        assert row["weights_bytes"] >= row["trainable_bytes"]


def _row(length, optimizer, scheme, peak, status="ok"):
    parts = dict.fromkeys((f"{p}_bytes" for p in PARTS), 0)
    return {"length": length, "optimizer": optimizer, "scheme": scheme, "status": status, "error": "",
            **parts, "weights_bytes": peak, "peak_bytes": peak}


def test_outputs_from_rows(tmp_path):
    mb = 2**20
    rows = [r for n in (64, 128) for r in (
        _row(n, INFERENCE, "-", 100 * mb * n), _row(n, "ZOAdam", "full", 120 * mb * n), _row(n, "AdamW", "full", 300 * mb * n))]
    rows.append({**_row(128, "SGD", "full", 0, status="failed"), "error": "killed by signal 9 (out of memory?)"})
    write_csv(tmp_path / "memory.csv", rows)
    write_markdown(tmp_path / "memory.md", rows, "test")
    plot_memory(tmp_path / "memory_vs_length.png", rows, "test")
    assert len(list(csv.DictReader((tmp_path / "memory.csv").open()))) == 7
    md = (tmp_path / "memory.md").read_text()
    assert "| ZOAdam | full | 7680.0 | 15360.0 |" in md  # peak by length
    assert "| full | 128 | AdamW | ZOAdam | 2.50 |" in md  # FO / ZO
    assert "killed by signal 9" in md
    assert (tmp_path / "memory_vs_length.png").stat().st_size > 10_000


def test_command_writes_csv_md_png(tiny_model_dir, tmp_path, capsys):
    """End to end, each cell in its own process (two cells: each costs a Python start)."""
    out = tmp_path / "mem"
    args = ["memory", "--out", str(out), f"model.name={tiny_model_dir}", "--optimizers", "ZOSGD",
            "--schemes", "full", "--lengths", "16", "--steps", "1", "--batch-size", "2"]
    assert main(args) == 0
    assert "[2/2] ZOSGD (full), 2x16 tokens: peak" in capsys.readouterr().out
    rows = list(csv.DictReader((out / "memory.csv").open()))
    assert [(r["optimizer"], r["scheme"], r["length"]) for r in rows] == [(INFERENCE, "-", "16"), ("ZOSGD", "full", "16")]
    for r in rows:
        assert r["status"] == "ok" and r["peak_reset"] == "True", r
        assert sum(int(r[f"{p}_bytes"]) for p in PARTS) == int(r["peak_bytes"])
    assert int(rows[1]["optimizer_state_bytes"]) == 0 and int(rows[1]["trainable_bytes"]) > 0
    assert float(rows[1]["peak_vs_inference"]) > 0
    assert "## Peak (MB) by sequence length" in (out / "memory.md").read_text()
    assert (out / "memory_vs_length.png").stat().st_size > 10_000
    assert main(args) == 2  # an existing memory.csv: only with --overwrite
    assert "--overwrite" in capsys.readouterr().err
    # the cells are zotune bench cells: an interrupted run (no memory.csv yet) keeps the cells it measured
    assert sorted(p.name for p in (out / "cells").iterdir()) == ["ZOSGD-full-L16", "inference-L16"]
    measured = (out / "cells" / "ZOSGD-full-L16" / "summary.json").stat().st_mtime_ns
    (out / "memory.csv").unlink()
    assert main(args) == 0
    assert "(2 measured before, kept)" in capsys.readouterr().out
    assert (out / "cells" / "ZOSGD-full-L16" / "summary.json").stat().st_mtime_ns == measured
    assert list(csv.DictReader((out / "memory.csv").open())) == rows
    assert main([*args, "--overwrite"]) == 0  # every cell measured again
    assert "(0 measured before, kept)" in capsys.readouterr().out


@pytest.mark.parametrize("args, needle", [
    (["--optimizers", "ZOSGDD"], "unknown optimizer 'ZOSGDD' in --optimizers (did you mean 'ZOSGD'?)"),
    (["--schemes", "ful"], "unknown scheme 'ful'"),
    (["--lengths", "64,abc"], "--lengths must be comma-separated integers"),
    (["--lengths", "1"], "--lengths must be integers >= 2"),
    (["--steps", "0"], "--steps and --batch-size must be >= 1"),
    (["--config", "/no/such.yaml"], "config file not found"),
    (["optimizer.lr=-1"], "optimizer.lr"),
    (["--lengths", "64,512"], "sequence length 512 is beyond"),  # the tiny model reads 256 positions
    (["optimizer.options={rank: 0}", "--optimizers", "LOZO", "--lengths", "16"], "optimizer LOZO: rank must be an int >= 1"),
])
def test_bad_input_one_line_exit_2(tiny_model_dir, tmp_path, capsys, args, needle):
    out = tmp_path / "mem"
    assert main(["memory", "--out", str(out), f"model.name={tiny_model_dir}", *args]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("zotune: error:") and needle in lines[0], lines
    assert not out.exists()


def test_each_cell_gets_its_own_optimizers_versioned_defaults():
    """A memory grid varies the optimizer over one config: the defaults that depend on it (the
    noise table, LoRA-FA under ZO) are each cell's own, and what the config set stays set."""
    from zotune.config import load_config
    from zotune.profiling.memory import Cell, cell_config

    def cell(name):
        return Cell(optimizer=name, scheme="lora", length=16, batch_size=1, steps=1, device="cpu")

    default = load_config(None)  # ZOSGD: a 64 MB table, LoRA-FA
    fo, zo = cell_config(default, cell("AdamW")), cell_config(default, cell("ZOAdam"))
    assert (fo.optimizer.noise_table_mb, fo.tuning.lora.freeze_a) == (0.0, False)
    assert (zo.optimizer.noise_table_mb, zo.tuning.lora.freeze_a) == (64.0, True)
    pinned = cell_config(load_config(None, ["tuning.lora.freeze_a=false", "optimizer.noise_table_mb=32"]), cell("ZOAdam"))
    assert (pinned.optimizer.noise_table_mb, pinned.tuning.lora.freeze_a) == (32.0, False)
