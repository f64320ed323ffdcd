"""A grid's results: each cell with its outcome and summary (:class:`Result`, :func:`collect`), and
their layout into ZO-Bench's rows and columns (:class:`Layout`), for the report and the plots."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import EXIT_INTERRUPTED
from ..tasks import task_spec
from ..train.rundir import read_metrics
from .benchdir import BenchDir, Outcome, recorded_device
from .dev_scores import late_score
from .grid import Cell, Grid, axis_label, value_label

COLUMN_AXES = ("model.name", "task", "task.name", "tuning.scheme")  # ZO-Bench's columns; the rest are rows
SEED_AXIS = "seed"
NOT_RUN = "not run"  # the error of a cell without an outcome (its status is "failed", as the contract's CSV has it)


@dataclass
class Result:
    """One cell with its outcome and, when it finished, its summary."""

    cell: Cell
    outcome: Outcome
    summary: dict[str, Any] | None
    run_dir: Path

    @property
    def ok(self) -> bool:
        """Whether the cell finished (its summary was read)."""
        return self.summary is not None

    @property
    def not_run(self) -> bool:
        """Whether the cell has no outcome yet (never run, or still running: ``zotune bench --report-only``)."""
        return self.outcome.error == NOT_RUN

    @property
    def diverged(self) -> bool:
        """Whether the run ended early at ``train.divergence_ratio`` (its summary's ``diverged_at_step``)."""
        return self.get("diverged_at_step") is not None

    @cached_property
    def metric(self) -> str:
        """The task's metric (the score the tables show)."""
        return task_spec(self.cell.cfg.task).metric

    def column_value(self, key: str) -> str:
        """The model, task or scheme of the cell (the column axes), as a label."""
        cfg = self.cell.cfg
        if key == "model.name":
            return value_label(cfg.model.name)
        return cfg.tuning.scheme if key == "tuning.scheme" else task_spec(cfg.task).name

    def get(self, key: str) -> float | None:
        """A summary number: ``forward_passes``, ``eval.accuracy``, ``eval_zero_shot.accuracy``..."""
        node: Any = self.summary
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                return None
            node = node[part]
        return node if isinstance(node, (int, float)) and not isinstance(node, bool) else None

    @property
    def score(self) -> float | None:
        """The test score, ``eval.<metric>`` of the summary (None when the cell has none)."""
        return self.get(f"eval.{self.metric}")

    @cached_property
    def device(self) -> str:
        """Where the cell ran (``cpu``, ``cuda``): its summary's ``device``, else (a run from before summaries
        said) its trajectory's; "" when neither says."""
        recorded = (self.summary or {}).get("device")
        return str(recorded) if recorded else recorded_device(self.run_dir) or ""

    @cached_property
    def records(self) -> list[dict[str, Any]]:
        """The cell's ``metrics.jsonl``."""
        return read_metrics(self.run_dir / "metrics.jsonl")

    def progress(self, state: str) -> str:
        """Where the cell stands, for the dry run (``state`` its :meth:`BenchDir.state`): a finished cell's test
        score (``test accuracy 0.742``), an unfinished one's last step and dev score (``step 210/675, dev accuracy
        0.719``); "" otherwise."""
        if state == "done":
            return "" if self.score is None else f"test {self.metric} {self.score:.3f}"
        if state != "partial" or not self.records:
            return ""
        where = f"step {int(self.records[-1]['step']) + 1}/{self.cell.cfg.train.steps}"
        dev = self.dev_scores
        return where + (f", dev {self.metric} {dev[-1]:.3f}" if dev else "")

    @cached_property
    def dev_scores(self) -> list[float]:
        """The dev scores (the task's metric) of the cell's evaluations during training, in step order."""
        return [float(rec["dev"][self.metric]) for rec in self.records if self.metric in rec.get("dev", {})]

    @property
    def late_dev(self) -> float | None:
        """Where the dev curve ends up: :func:`~zotune.bench.dev_scores.late_score` of its scores (None without)."""
        return late_score(self.dev_scores)

    def forwards_to_dev(self, level: float) -> int | None:
        """Forward passes at the first dev evaluation that reached ``level`` (the task's metric); None if none did."""
        return next((rec["forward_passes"] for rec in self.records
                     if rec.get("dev", {}).get(self.metric, -1.0) >= level - 1e-9), None)


def seconds_left(result: Result, state: str, siblings: list[Result], device: str) -> float | None:
    """About how long the cell has left to run on ``device`` (``cpu``, ``cuda``), one cell at a time: 0 when it
    is done; an unfinished cell's remaining steps at its own pace so far (its last record's training
    ``wall_s`` a step); a cell not started, the mean wall time of the finished ``siblings`` (its configuration's
    other seeds) that ran on ``device``. None when neither is known."""
    if state == "done":
        return 0.0
    steps = result.cell.cfg.train.steps
    if state == "partial" and result.records and result.records[-1].get("wall_s"):
        done = int(result.records[-1]["step"]) + 1
        return float(result.records[-1]["wall_s"]) / done * max(steps - done, 0)
    walls = [r.get("wall_s") for r in siblings if r.ok and r.device == device and r.get("wall_s")]
    return sum(walls) / len(walls) if walls else None


def configuration(cell: Cell) -> tuple:
    """The cell's axis values but its seed: the cells that one configuration runs on several seeds share it."""
    return tuple(sorted((k, repr(v)) for k, v in cell.axes.items() if k != SEED_AXIS))


def collect(grid: Grid, bench: BenchDir) -> list[Result]:
    """Every cell's result, in grid order (a cell never run counts as failed: ``not run``)."""
    return [result_of(cell, bench) for cell in grid.cells]


def result_of(cell: Cell, bench: BenchDir) -> Result:
    """The cell's result in ``bench`` (a cell never run counts as failed: ``not run``, and so does one interrupted
    with a checkpoint to go on from, e.g. by ``--time-limit``: unfinished, not failed)."""
    outcome = bench.outcome(cell)
    if outcome is None or (outcome.returncode == EXIT_INTERRUPTED and bench.state(cell) == "partial"):
        outcome = Outcome("failed", NOT_RUN)
    summary_path = bench.run_dir(cell) / "summary.json"
    summary = json.loads(summary_path.read_text(encoding="utf-8")) if outcome.status == "ok" else None
    if summary and summary.get("wall_s", 0) < summary.get("train_wall_s", 0):
        # a resumed run's summary from before its wall_s counted the processes it resumed: their training time
        summary["wall_s"] = summary["train_wall_s"]
    return Result(cell, outcome, summary, bench.run_dir(cell))


def partners(grid: Grid, results: list[Result]) -> Callable[[Result], Result | None]:
    """Each result's ``paired_with`` partner: the result whose cell differs from it on that axis alone, where it has
    the grid's value (itself for those cells; None when the grid pairs nothing or the partner is not in ``results``)."""
    if grid.paired_with is None:
        return lambda r: None
    axis, value = grid.paired_with

    def key(axes: dict[str, Any]) -> str:
        return json.dumps(axes, sort_keys=True, default=str)
    by_axes = {key(r.cell.axes): r for r in results}
    return lambda r: by_axes.get(key({**r.cell.axes, axis: value})) if axis in r.cell.axes else None


def partner_differences(results: list[Result], partner: Callable[[Result], Result | None],
                        value: Callable[[Result], float | None]) -> list[float]:
    """``value`` of each finished result minus that of its finished ``partner`` (another cell), where both have one."""
    return [mine - theirs for r in results if r.ok and (p := partner(r)) is not None and p is not r and p.ok
            and (mine := value(r)) is not None and (theirs := value(p)) is not None]


# -- layout --------------------------------------------------------------------------------
@dataclass
class Layout:
    """Which axes make the rows and the columns (the seed axis is averaged over)."""

    rows: list[str]
    cols: list[str]
    fixed: dict[str, str] = field(default_factory=dict)  # model, task, scheme: the same in every cell
    row_keys: list[tuple] = field(default_factory=list)
    col_keys: list[tuple] = field(default_factory=list)
    groups: dict[tuple[tuple, tuple], list[Result]] = field(default_factory=dict)

    @property
    def row_labels(self) -> list[str]:
        """The rows' labels, in the layout's order (the plots' legends)."""
        return [self.row_label(row) for row in self.row_keys]

    @classmethod
    def of(cls, axes: dict[str, list], results: list[Result], exclude: tuple[str, ...] = ()) -> Layout:
        """The layout of ``results`` over ``axes`` (the seed axis and ``exclude`` left out): the column axes among
        ``COLUMN_AXES``, the others rows with the optimizer first, the results grouped by (row, column)."""
        keys = [k for k in axes if k != SEED_AXIS and k not in exclude]
        rows = sorted((k for k in keys if k not in COLUMN_AXES), key=lambda k: k != "optimizer.name")
        cols = [k for k in keys if k in COLUMN_AXES]
        fixed = {k: {r.column_value(k) for r in results} for k in ("model.name", "task.name", "tuning.scheme")
                 if k not in axes and not (k == "task.name" and "task" in axes)}
        layout = cls(rows, cols, {axis_label(k): v.pop() for k, v in fixed.items() if len(v) == 1})
        for r in results:
            row, col = layout.key(r, layout.rows), layout.key(r, layout.cols)
            if row not in layout.row_keys:
                layout.row_keys.append(row)
            if col not in layout.col_keys:
                layout.col_keys.append(col)
            layout.groups.setdefault((row, col), []).append(r)
        return layout

    @staticmethod
    def key(result: Result, axes: list[str]) -> tuple:
        """A result's values on ``axes`` as JSON texts: its row or column key."""
        return tuple(json.dumps(result.cell.axes[k], sort_keys=True, default=str) for k in axes)

    def row_label(self, row: tuple) -> str:
        """A row's label: the optimizer's name, then ``axis=value`` for the other row axes (``all cells`` when there
        are none)."""
        parts = [value_label(json.loads(v)) if k == "optimizer.name" else f"{axis_label(k)}={value_label(json.loads(v))}"
                 for k, v in zip(self.rows, row)]
        return ", ".join(parts) or "all cells"

    def col_label(self, col: tuple) -> str:
        """A column's label: its values joined by `` / ``, else the model, task and scheme every cell shares, else
        ``all cells``."""
        return " / ".join(value_label(json.loads(v)) for v in col) or " / ".join(self.fixed.values()) or "all cells"
