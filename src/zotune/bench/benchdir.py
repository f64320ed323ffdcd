"""The bench output directory: where a grid's cells, configs and logs live under ``--out DIR``
(layout in runner.py), each cell's recorded :class:`Outcome`, and its state (done, stale, ...)."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..config import CONFIG_VERSION, Config, from_dict, recorded_config
from ..errors import ConfigError, ZotuneError
from ..models.loader import resolve_device
from ..optim.factory import resolved_settings
from ..train.rundir import RUN_MARKERS, extension_refusal
from ..trajectory import FILENAME as TRAJECTORY, read_header
from .grid import Cell, Grid


@dataclass
class Outcome:
    """How a cell's last run went (``logs/<cell>.json``)."""

    status: str  # "ok" | "failed"
    error: str = ""
    seconds: float = 0.0
    returncode: int = 0


class BenchDir:
    """The paths of a bench output directory."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def run_dir(self, cell: Cell) -> Path:
        """The cell's run directory, ``cells/<cell>``."""
        return self.root / "cells" / cell.name

    def config(self, cell: Cell) -> Path:
        """The cell's train config file, ``configs/<cell>.yaml``."""
        return self.root / "configs" / f"{cell.name}.yaml"

    def log(self, cell: Cell, suffix: str) -> Path:
        """The cell's log file ``logs/<cell>.<suffix>`` (``out``, ``err`` or ``json``)."""
        return self.root / "logs" / f"{cell.name}.{suffix}"

    def outcome(self, cell: Cell) -> Outcome | None:
        """The recorded outcome of the cell's last run; ok whenever (and only while) its summary.json exists."""
        if (self.run_dir(cell) / "summary.json").is_file():
            return Outcome("ok")
        path = self.log(cell, "json")
        if not path.is_file():
            return None
        try:
            outcome = Outcome(**json.loads(path.read_text(encoding="utf-8")))
        except (ValueError, TypeError):
            return None
        return None if outcome.status == "ok" else outcome  # ok, but its summary.json is gone: not finished now

    def state(self, cell: Cell) -> str:
        """``done`` (finished, same config), ``short`` (a zeroth-order run of the same config but fewer steps:
        ``zotune train --extend`` goes on with it), ``stale`` (holds another config), ``partial`` (an unfinished
        run), ``failed`` (last run failed, nothing to resume) or ``todo``."""
        run = self.run_dir(cell)
        if (run / "config.yaml").is_file() and not _same_config(run / "config.yaml", cell):
            return "short" if _extends(run / "config.yaml", cell) else "stale"
        if (run / "summary.json").is_file():
            return "done"
        if any((run / m).exists() for m in RUN_MARKERS):
            return "partial"
        outcome = self.outcome(cell)
        return "failed" if outcome is not None and outcome.status == "failed" else "todo"

    def archive_into(self, archive: BenchDir, grid: Grid) -> tuple[list[str], list[str]]:
        """Copy into ``archive`` the report (``REPORT_FILES``, the plots) and every finished cell's
        ``ARCHIVED_FILES``: a record that outlives this directory's machine, enough to report on the
        cells again and to replay their weights (``zotune replay`` on the trajectory). An unfinished
        zeroth-order cell's config, metrics and trajectory go too: ``zotune train`` resumes it from them
        (train/trajectory_resume.py). Returns the names of the finished and of the unfinished cells archived."""
        try:
            archive.root.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ConfigError(f"cannot create {archive.root}: {err.strerror}") from None
        for path in [self.root / name for name in REPORT_FILES] + sorted(self.root.glob("*.png")):
            if path.is_file():
                shutil.copyfile(path, archive.root / path.name)
        done = [cell for cell in grid.cells if self.state(cell) == "done"]
        going = [cell for cell in grid.cells  # never over a cell the archive has finished (another machine's)
                 if self.state(cell) == "partial" and (self.run_dir(cell) / TRAJECTORY).is_file()
                 and archive.state(cell) != "done"]
        for cell in done + going:
            _copy_files(self.run_dir(cell), archive.run_dir(cell))
        return [cell.name for cell in done], [cell.name for cell in going]

    def restore_from(self, archive: BenchDir, grid: Grid) -> list[str]:
        """Copy in the cells finished in ``archive`` that are not finished here (never run, failed, or
        interrupted), so that they count as done, and its unfinished ones that have not started here, so
        that they resume from their trajectories (or, given fewer steps than the grid now asks, are extended);
        returns their names. A cell that holds another config
        here (stale) is left as it is."""
        restored = self.restorable_from(archive, grid)
        for cell in grid.cells:
            if cell.name in restored:
                _copy_files(archive.run_dir(cell), self.run_dir(cell))
        return restored

    def restorable_from(self, archive: BenchDir, grid: Grid) -> list[str]:
        """The names of the cells :meth:`restore_from` would copy in; nothing is copied."""
        return [cell.name for cell in grid.cells
                if (archive.state(cell) == "done" and self.state(cell) in ("todo", "failed", "partial"))
                or (archive.state(cell) in ("partial", "short") and self.state(cell) in ("todo", "failed")
                    and archive.resumable_here(cell))]

    def resumable_here(self, cell: Cell) -> bool:
        """Whether this machine can go on with the cell's unfinished run: its directions were drawn on the device
        type the cell would run on here (a CUDA generator's directions are not the CPU's)."""
        recorded = recorded_device(self.run_dir(cell))
        try:
            return recorded is None or recorded == resolve_device(cell.cfg.model.device).type
        except ZotuneError:
            return False

    def prepare(self, grid: Grid) -> None:
        """Create the layout, copy the grid file, write every cell's config."""
        if self.root.exists() and not self.root.is_dir():
            raise ConfigError(f"--out {self.root} exists and is not a directory")
        self.prepare_cells([])
        if grid.path.resolve() != (self.root / "grid.yaml").resolve():
            shutil.copyfile(grid.path, self.root / "grid.yaml")
        self.prepare_cells(grid.cells)

    def prepare_cells(self, cells: list[Cell]) -> None:
        """Create the layout's folders and write every cell's config."""
        try:
            for sub in ("cells", "configs", "logs"):
                (self.root / sub).mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ConfigError(f"cannot create {self.root}: {err.strerror}") from None
        for cell in cells:
            self.config(cell).write_text(yaml.safe_dump(cell.config, sort_keys=False), encoding="utf-8")


# A cell in an archive (``zotune bench --archive``): what the report reads and what replays its weights or
# resumes it (an unfinished cell has no summary.json); no weights, checkpoints or predictions.
ARCHIVED_FILES = ("config.yaml", "summary.json", "metrics.jsonl", "trajectory.bin")
REPORT_FILES = ("report.md", "results.csv", "grid.yaml")


def recorded_device(run_dir: Path) -> str | None:
    """Where a run drew its directions (``cpu``, ``cuda``: its trajectory's header); None without a trajectory."""
    path = run_dir / TRAJECTORY
    try:
        return str(read_header(path).get("device_type", "cpu")) if path.is_file() else None
    except ZotuneError:
        return None


def _copy_files(source: Path, dest: Path) -> None:
    """Copy the ``ARCHIVED_FILES`` that ``source`` has into ``dest``."""
    try:
        dest.mkdir(parents=True, exist_ok=True)
        for name in ARCHIVED_FILES:
            if (source / name).is_file():
                shutil.copyfile(source / name, dest / name)
    except OSError as err:
        raise ConfigError(f"cannot copy {source} to {dest}: {err.strerror}") from None


def _same_config(path: Path, cell: Cell) -> bool:
    """Whether a cell's run directory holds the cell's config, compared under the defaults of the
    config version the run was recorded with (a cell run before a new version stays done) or of the
    current one (a run that gave, say, the lr a new version made the default is the cell's run now), with
    the optimizer's settings resolved (so a grid that pins another version matches the runs whose
    settings it does not change), and without the keys that change which files a run keeps, not
    its results (``RESULT_NEUTRAL``), nor where it runs (``PLACEMENT``)."""
    try:
        config = recorded_config(path)
        recorded = _results_config(config)
        return any(recorded == _results_config(from_dict(cell.config, default_version=version))
                   for version in {config.version, CONFIG_VERSION})
    except ZotuneError:
        return False


def _extends(path: Path, cell: Cell) -> bool:
    """Whether the run recorded in ``path`` is the cell's run cut short, which ``zotune train --extend`` makes the
    cell's run bit for bit (``extension_refusal``: fewer steps, the rest of the config the same but for the
    evaluation cadence). Only a ``zotune train`` cell (not eval, not memory)."""
    if cell.command != "train":
        return False
    try:
        recorded = recorded_config(path)
        wanted = from_dict(cell.config, default_version=recorded.version)
    except ZotuneError:
        return False
    return extension_refusal(_results_config(recorded), _results_config(wanted)) is None


RESULT_NEUTRAL = (("train", "save_weights"),)
# Where a cell runs, not what it is: a cell finished on a GPU counts as done in the same grid run on a CPU (and
# the default ``auto`` is either). Where each ran: results.csv's ``device`` (summary.json, else the trajectory).
PLACEMENT = (("model", "device"),)


def _results_config(cfg: Config) -> dict:
    """``cfg`` as a dict without the ``RESULT_NEUTRAL`` keys, its version's defaults filled into the optimizer's
    lr, eps and options, and the version itself left out (what it decides is then in the dict)."""
    data = cfg.to_dict()
    for section, key in RESULT_NEUTRAL + PLACEMENT:
        data[section].pop(key)
    data["optimizer"].update(resolved_settings(cfg))
    data.pop("version")
    return data
