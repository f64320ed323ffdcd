"""The run directory: config.yaml, metrics.jsonl, trajectory.jsonl, predictions, summary.json, plots."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError

RUN_MARKERS = ("summary.json", "metrics.jsonl", "config.yaml")


def run_config(path: str | Path):
    """The resolved config of a finished run directory (its ``config.yaml``)."""
    from ..config import load_config
    from ..errors import DataError

    if not (Path(path) / "config.yaml").is_file():
        raise DataError(f"--run {path} is not a run directory (no config.yaml)")
    return load_config(Path(path) / "config.yaml")


class RunDir:
    """Owns one run's output directory; appends are flushed as they happen."""

    def __init__(self, path: str | Path, overwrite: bool = False):
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise ConfigError(f"--out {self.path} exists and is not a directory")
        existing = [m for m in RUN_MARKERS if (self.path / m).exists()]
        if existing and not overwrite:
            raise ConfigError(
                f"--out {self.path} already holds a run ({existing[0]}); choose another directory "
                "or pass --overwrite"
            )
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ConfigError(f"cannot create run directory {self.path}: {err.strerror}") from None
        for name in ("metrics.jsonl", "trajectory.jsonl"):
            (self.path / name).unlink(missing_ok=True)

    def file(self, name: str) -> Path:
        return self.path / name

    def write_yaml(self, name: str, data: dict[str, Any]) -> None:
        self._atomic_write(name, yaml.safe_dump(data, sort_keys=False))

    def write_json(self, name: str, data: dict[str, Any]) -> None:
        self._atomic_write(name, json.dumps(data, indent=2) + "\n")

    def append_jsonl(self, name: str, record: dict[str, Any]) -> None:
        with open(self.path / name, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()

    def _atomic_write(self, name: str, text: str) -> None:
        tmp = self.path / f".{name}.tmp"
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, self.path / name)
