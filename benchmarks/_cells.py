"""Shared by the benchmark scripts: one `zotune train` process per cell (its peak memory is its own).

A cell whose directory already holds a finished run of the same resolved config is not run
again (``rerun=False``): a benchmark interrupted, or extended by one more optimizer, picks up
where it was and prints the whole table."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from zotune.config import load_config, recorded_config
from zotune.errors import ZotuneError


def finished_run(out: Path, overrides: list[str], config: str) -> bool:
    """Whether ``out`` holds a finished run (summary.json) of ``config`` with ``overrides``
    (whether it also scored the zero-shot model does not matter)."""
    if not (out / "summary.json").is_file():
        return False

    def resolved(cfg: dict[str, Any]) -> dict[str, Any]:
        return {**cfg, "eval": {k: v for k, v in cfg["eval"].items() if k != "zero_shot"}}

    try:
        recorded = recorded_config(out / "config.yaml")
        return resolved(recorded.to_dict()) == resolved(load_config(config, overrides).to_dict())
    except ZotuneError:
        return False


def train_cell(
    out: Path, overrides: list[str], config: str = "configs/demo.yaml", rerun: bool = False
) -> dict[str, Any] | str:
    """Run ``zotune train`` into ``out`` (unless it holds this finished run already, and not
    ``rerun``); its summary.json (plus ``last_loss``), or the error line."""
    if not rerun and finished_run(out, overrides, config):
        print(f"  reusing the finished run in {out}", file=sys.stderr, flush=True)
    else:
        zotune = Path(sys.executable).with_name("zotune")
        cmd = [str(zotune), "train", "--config", config, "--out", str(out), "--overwrite", *overrides]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            return "failed: " + (proc.stderr.strip().splitlines() or ["?"])[-1]
    summary = json.loads((out / "summary.json").read_text())
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {**summary, "last_loss": losses[-1]}
