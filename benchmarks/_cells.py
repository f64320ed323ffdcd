"""Shared by the benchmark scripts: one `zotune train` process per cell (its peak memory is its own)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any


def train_cell(out: Path, overrides: list[str], config: str = "configs/demo.yaml") -> dict[str, Any] | str:
    """Run ``zotune train`` into ``out``; its summary.json (plus ``last_loss``), or the error line."""
    zotune = Path(sys.executable).with_name("zotune")
    cmd = [str(zotune), "train", "--config", config, "--out", str(out), "--overwrite", *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return "failed: " + (proc.stderr.strip().splitlines() or ["?"])[-1]
    summary = json.loads((out / "summary.json").read_text())
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {**summary, "last_loss": losses[-1]}
