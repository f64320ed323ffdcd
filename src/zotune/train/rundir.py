"""The run directory: config.yaml, metrics.jsonl, trajectory.bin, checkpoints/, predictions, summary.json, plots."""

from __future__ import annotations

import itertools
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from ..config import recorded_config
from ..errors import ConfigError, DataError
from ..optim.registry import is_zeroth_order

RUN_MARKERS = ("summary.json", "metrics.jsonl", "config.yaml")


def run_config(path: str | Path):
    """The resolved config of a finished run directory (its ``config.yaml``)."""
    if not (Path(path) / "config.yaml").is_file():
        raise DataError(f"--run {path} is not a run directory (no config.yaml)")
    return recorded_config(Path(path) / "config.yaml")


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The step records of a ``metrics.jsonl`` (finished or still being written), up to the first unreadable
    (torn) line; [] when there is no such file."""
    return [record for _, record in _step_lines(path)]


def _step_lines(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """(line, record) for each line of a JSON-lines step log, up to the first that is not a record with a step."""
    if not path.is_file():
        return
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
            int(record["step"])
        except (ValueError, KeyError, TypeError):
            return
        yield line, record


class RunDir:
    """Owns one run's output directory; appends are flushed as they happen.

    ``config`` (the resolved config, given by ``zotune train``): a directory holding an
    unfinished run (``config.yaml``, no ``summary.json``) of the same config is kept for
    resuming (``resuming`` is True); another config there is a :class:`ConfigError` naming the
    first key that differs. A finished run is refused unless ``overwrite``, which starts over.

    ``extend``: the run there, finished or not, goes on to the config's larger ``train.steps``; the
    config may differ from the recorded one in ``train.steps`` and the evaluation cadence
    (``EXTENDABLE``) only, with a constant lr schedule (a decaying one depends on ``train.steps``).
    Its ``summary.json`` stays until :meth:`forget_summary` (training is about to start).
    """

    def __init__(self, path: str | Path, overwrite: bool = False, config: dict[str, Any] | None = None,
                 extend: bool = False):
        self.path = Path(path)
        self.resuming = False
        if self.path.exists() and not self.path.is_dir():
            raise ConfigError(f"--out {self.path} exists and is not a directory")
        existing = [m for m in RUN_MARKERS if (self.path / m).exists()]
        if extend:
            if overwrite or config is None:
                raise ConfigError("--extend goes on with the run in --out: it does not go with --overwrite")
            _check_extendable(self.path, config)
            self.resuming = True
        elif existing and not overwrite:
            if config is None or "summary.json" in existing or "config.yaml" not in existing:
                raise ConfigError(
                    f"--out {self.path} already holds a run ({existing[0]}); choose another directory "
                    "or pass --overwrite"
                )
            _check_same_config(self.path, config)
            self.resuming = True
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ConfigError(f"cannot create run directory {self.path}: {err.strerror}") from None
        if not self.resuming:  # a fresh start: nothing of an earlier run may be taken for this one's
            for name in ("summary.json", "metrics.jsonl", "trajectory.jsonl", "trajectory.bin"):
                (self.path / name).unlink(missing_ok=True)
            shutil.rmtree(self.path / "checkpoints", ignore_errors=True)

    def forget_summary(self) -> None:
        """An extended run: its old final results go (training is about to go on past them)."""
        for name in ("summary.json", "predictions.jsonl"):
            (self.path / name).unlink(missing_ok=True)

    def file(self, name: str) -> Path:
        """The path of ``name`` in the run directory."""
        return self.path / name

    def write_yaml(self, name: str, data: dict[str, Any]) -> None:
        """Write ``data`` as YAML to ``name``, atomically (a temporary file, then a rename)."""
        self._atomic_write(name, yaml.safe_dump(data, sort_keys=False))

    def write_json(self, name: str, data: dict[str, Any]) -> None:
        """Write ``data`` as indented JSON to ``name``, atomically."""
        self._atomic_write(name, json.dumps(data, indent=2) + "\n")

    def append_jsonl(self, name: str, record: dict[str, Any]) -> None:
        """Append ``record`` to ``name`` as one JSON line, flushed."""
        with open(self.path / name, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()

    def keep_records(self, name: str, last_step: int) -> None:
        """Resuming: keep the JSON lines of ``name`` up to step ``last_step`` (and none torn)."""
        path = self.path / name
        if not path.exists():
            return
        kept = itertools.takewhile(lambda pair: pair[1]["step"] <= last_step, _step_lines(path))
        self._atomic_write(name, "".join(line + "\n" for line, _ in kept))

    def _atomic_write(self, name: str, text: str) -> None:
        tmp = self.path / f".{name}.tmp"
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, self.path / name)


# what an extended run's config may change: its length and how often it evaluates, logs and checkpoints
EXTENDABLE = ("train.steps", "train.eval_every", "train.test_every", "train.log_every", "train.checkpoint_every")


def _recorded(path: Path, what: str) -> dict[str, Any]:
    """The resolved config recorded in ``path``, as plain data (ConfigError naming ``what`` run it is)."""
    try:
        return _plain(recorded_config(path / "config.yaml").to_dict())
    except (OSError, ValueError, yaml.YAMLError, ConfigError):
        raise ConfigError(f"--out {path} holds {what} whose config.yaml cannot be read; "
                          "pass --overwrite to start over") from None


def _plain(data: dict[str, Any]) -> Any:
    return yaml.safe_load(yaml.safe_dump(data))


def _check_same_config(path: Path, config: dict[str, Any]) -> None:
    """An unfinished run in ``path`` may be resumed only by the same resolved config."""
    key = _first_difference(_recorded(path, "an unfinished run"), _plain(config))
    if key is not None:
        raise ConfigError(f"--out {path} holds an unfinished run of another config ({key} differs); run its "
                          "command again to resume it, or pass --overwrite to start over")


def _check_extendable(path: Path, config: dict[str, Any]) -> None:
    """``--extend``: ``path`` holds a run whose config differs from ``config`` only in ``EXTENDABLE`` keys, and
    ``config`` asks for more steps under a constant lr schedule."""
    if not (path / "config.yaml").is_file():
        raise ConfigError(f"--extend: --out {path} holds no run (no config.yaml) to go on with")
    refusal = extension_refusal(_recorded(path, "a run"), _plain(config)) or _ended_early(path)
    if refusal is not None:
        raise ConfigError(f"--extend: the run in {path}: {refusal}")


def _ended_early(path: Path) -> str | None:
    """Why a finished run that ended before its train.steps does not extend (None: it did not end early): given
    more steps from the start, it would have ended at the same step."""
    summary = path / "summary.json"
    try:
        figures = json.loads(summary.read_text(encoding="utf-8")) if summary.is_file() else {}
    except ValueError:
        return None
    for key, why in (("diverged_at_step", "train.divergence_ratio"), ("stopped_early_at_step", "train.early_stop_patience")):
        if figures.get(key):
            return (f"it ended at step {figures[key]} ({why}), where it would end given more steps too; "
                    "nothing to extend (--overwrite runs it again from the start)")
    return None


def extension_refusal(theirs: dict[str, Any], ours: dict[str, Any]) -> str | None:
    """Why a run recorded with config ``theirs`` cannot go on bit for bit as a run of config ``ours`` (nested plain
    data), or None: only ``EXTENDABLE`` keys may differ, to more steps, under a constant lr schedule, with a
    zeroth-order optimizer and no first-order part (what its trajectory rebuilds)."""
    key = _first_difference(_without(theirs, EXTENDABLE), _without(ours, EXTENDABLE))
    if key is not None:
        return f"another config ({key} differs); an extension may change only {', '.join(EXTENDABLE)}"
    if ours["train"]["lr_schedule"] != "constant":
        return (f"train.lr_schedule {ours['train']['lr_schedule']} depends on train.steps, so its steps so far "
                "would differ; only a constant schedule extends")
    if ours["train"]["steps"] <= theirs["train"]["steps"]:
        return f"train.steps must be above the run's {theirs['train']['steps']}, got {ours['train']['steps']}"
    if not is_zeroth_order(ours["optimizer"]["name"]) or ours["tuning"]["hybrid"]["zo_layers"] is not None:
        return "an extension replays the run's trajectory: a zeroth-order optimizer (not hybrid), in one process"
    return None


def _without(config: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    """``config`` (nested) without the dotted ``keys``."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in config.items()}
    for key in keys:
        section, name = key.split(".")
        out.get(section, {}).pop(name, None)
    return out


def _first_difference(a: Any, b: Any, prefix: str = "") -> str | None:
    """The first dotted key whose value differs between two nested dicts (None: equal)."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in list(a) + [k for k in b if k not in a]:
            if k not in a or k not in b:
                return f"{prefix}{k}"
            found = _first_difference(a[k], b[k], f"{prefix}{k}.")
            if found is not None:
                return found
        return None
    return None if a == b else prefix.rstrip(".")
