"""The grid's results: ``results.csv`` (one row per cell) and ``report.md`` (ZO-Bench tables).

Every number comes from the cells' ``summary.json`` files. Tables follow ZO-Bench's layout:
rows are optimizers (with any other axis, e.g. ``n_queries=4`` or ``align=false``, in the row
label), columns are model x task x scheme (the axes among them), seeds are averaged (mean +- std,
sample standard deviation). The best value per column is bold: highest score, lowest memory and
time (forward passes are the budget, not a result: not marked).
"""

from __future__ import annotations

import csv
import json
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from ..tasks import task_spec
from .grid import Cell, Grid, axis_label, value_label
from .runner import BenchDir, Outcome

COLUMN_AXES = ("model.name", "task", "task.name", "tuning.scheme")  # ZO-Bench's columns; the rest are rows
SEED_AXIS = "seed"


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
    def records(self) -> list[dict[str, Any]]:
        """The cell's ``metrics.jsonl``."""
        path = self.run_dir / "metrics.jsonl"
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def collect(grid: Grid, bench: BenchDir) -> list[Result]:
    """Every cell's result, in grid order (a cell never run counts as failed: ``not run``)."""
    results = []
    for cell in grid.cells:
        outcome = bench.outcome(cell) or Outcome("failed", "not run")
        summary_path = bench.run_dir(cell) / "summary.json"
        summary = json.loads(summary_path.read_text(encoding="utf-8")) if outcome.status == "ok" else None
        results.append(Result(cell, outcome, summary, bench.run_dir(cell)))
    return results


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


# -- formatting ----------------------------------------------------------------------------
def mean_std(values: list[float]) -> tuple[float, float | None]:
    """The mean of ``values`` and their sample standard deviation (None for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


Format = Callable[[list[Result]], tuple[float | None, str]]  # a group -> (value compared for "best", text)


def score_format(results: list[Result]) -> tuple[float | None, str]:
    """A group's test scores as ``mean ± std`` (with ``k/n ok`` when some cells failed); compared by the mean,
    rounded to 3 digits."""
    values = [r.score for r in results if r.score is not None]
    if not values:
        return None, "failed" if results else ""
    mean, std = mean_std(values)
    text = f"{mean:.3f}" + (f" ± {std:.3f}" if std is not None else "")
    if len(values) < len(results):
        text += f" ({len(values)}/{len(results)} ok)"
    return round(mean, 3), text


def number_format(key: str, digits: int = 0) -> Format:
    """A :data:`Format` of the summary number ``key``: the group's mean, rounded to ``digits``."""
    def fmt(results: list[Result]) -> tuple[float | None, str]:
        values = [v for r in results if (v := r.get(key)) is not None]
        if not values:
            return None, "failed" if results else ""
        mean = round(statistics.fmean(values), digits)
        return mean, f"{mean:,.{digits}f}"
    return fmt


def forwards_format(results: list[Result]) -> tuple[float | None, str]:
    """A group's forward passes and steps (the distinct values of its finished cells, ``/``-joined); never
    compared."""
    ok = [r for r in results if r.ok]
    if not ok:
        return None, "failed" if results else ""
    fwd = sorted({int(r.get("forward_passes") or 0) for r in ok})
    steps = sorted({int(r.get("steps") or 0) for r in ok})
    return None, f"{'/'.join(map(str, fwd))} ({'/'.join(map(str, steps))} steps)"


def markdown_table(layout: Layout, fmt: Format, best: str | None,
                   extra_rows: list[tuple[str, list[str]]] = (), headers: list[str] | None = None) -> list[str]:
    """Rows x columns of ``fmt`` over each group; ``best`` "max" | "min" bolds the best per column."""
    cells = {(row, col): fmt(layout.groups.get((row, col), [])) for row in layout.row_keys for col in layout.col_keys}
    bests = {}
    for col in layout.col_keys:
        values = [cells[(row, col)][0] for row in layout.row_keys if cells[(row, col)][0] is not None]
        if best and len(values) > 1:
            bests[col] = max(values) if best == "max" else min(values)
    head = ["optimizer" if layout.rows and layout.rows[0] == "optimizer.name" else "cells"]
    head += headers or [layout.col_label(c) for c in layout.col_keys]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += [f"| {label} | " + " | ".join(values) + " |" for label, values in extra_rows]
    for row in layout.row_keys:
        texts = []
        for col in layout.col_keys:
            value, text = cells[(row, col)]
            texts.append(f"**{text}**" if value is not None and bests.get(col) == value else text)
        lines.append(f"| {layout.row_label(row)} | " + " | ".join(texts) + " |")
    return lines


def zero_shot_row(layout: Layout) -> list[tuple[str, list[str]]]:
    """The score before training, per column, from cells that measured it (``eval.zero_shot``)."""
    texts = []
    for col in layout.col_keys:
        values = [v for row in layout.row_keys for r in layout.groups.get((row, col), [])
                  if (v := r.get(f"eval_zero_shot.{r.metric}")) is not None]
        texts.append(f"{statistics.fmean(values):.3f}" if values else "-")
    return [("zero-shot (before training)", texts)] if any(t != "-" for t in texts) else []


# -- the files -----------------------------------------------------------------------------
def csv_value(value: Any) -> str:
    """A value as a CSV field: ``true``/``false`` for booleans, JSON for mappings and lists, empty for None."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True)
    return "" if value is None else str(value)


GPU_MEMORY = ("peak_cuda_allocated_mb", "peak_cuda_reserved_mb")  # summary.json keys of cells run on CUDA


def write_csv(path: Path, grid: Grid, results: list[Result], root: Path) -> None:
    """The contract's columns (docs/contract.md: axes, status, run_dir, eval.*, forward_passes, peak_rss_mb, wall_s,
    error), then ``steps``, ``eval_zero_shot.*`` and, for cells run on CUDA, the GPU's peaks."""
    def metric_keys(section: str) -> list[str]:
        return list(dict.fromkeys(f"{section}.{m}" for r in results if r.ok for m in r.summary.get(section, {})))

    evals, zero_shot = metric_keys("eval"), metric_keys("eval_zero_shot")
    gpu = [k for k in GPU_MEMORY if any(r.get(k) is not None for r in results)]
    columns = [*grid.axes, "status", "run_dir", *evals, "forward_passes", "peak_rss_mb", "wall_s", "error",
               "steps", *zero_shot, *gpu]
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for r in results:
            row = {k: csv_value(v) for k, v in r.cell.axes.items()}
            row |= {"status": "ok" if r.ok else "failed", "run_dir": str(r.run_dir.relative_to(root)),
                    "error": "" if r.ok else r.outcome.error}
            for key in [*evals, "forward_passes", "peak_rss_mb", "wall_s", "steps", *zero_shot, *gpu]:
                row[key] = csv_value(r.get(key))
            writer.writerow([row.get(c, "") for c in columns])


def write_report(grid: Grid, bench: BenchDir) -> Path:
    """results.csv, report.md and the plots into the bench directory; returns report.md's path."""
    from .plots import write_plots

    results = collect(grid, bench)
    write_csv(bench.root / "results.csv", grid, results, bench.root)
    plots = write_plots(grid, results, bench.root)
    path = bench.root / "report.md"
    path.write_text("\n".join(report_lines(grid, results, plots)) + "\n", encoding="utf-8")
    return path


def report_lines(grid: Grid, results: list[Result], plots: list[tuple[str, str]]) -> list[str]:
    """The lines of ``report.md``: title, budget, the score table, the alignment gap, the memory, wall-time and
    forward-pass tables, failed cells and plots."""
    layout = Layout.of(grid.axes, results)
    metrics = list(dict.fromkeys(r.metric for r in results))
    seeds = grid.axes.get(SEED_AXIS)
    over = f"mean ± std over seeds {', '.join(map(str, seeds))}" if seeds and len(seeds) > 1 else "one seed"
    n_ok = sum(r.ok for r in results)
    lines = [f"# {grid.description or f'Benchmark grid {grid.path.name}'}", "",
             f"`zotune bench --grid {grid.path}`: {len(results)} cells, {n_ok} ok, {len(results) - n_ok} failed.", "",
             *budget_lines(grid, results), ""]
    if layout.fixed:
        lines += ["Every cell: " + ", ".join(f"{k} {v}" for k, v in layout.fixed.items()) + ".", ""]
    score = metrics[0] if len(metrics) == 1 else "score"
    headers = None if len(metrics) == 1 else [f"{layout.col_label(c)} ({_col_metric(layout, c)})" for c in layout.col_keys]
    lines += [f"## Test {score} ({over})", "",
              *markdown_table(layout, score_format, "max", zero_shot_row(layout), headers), ""]
    if "task.align" in grid.axes:
        lines += alignment_lines(grid, results)
    if any(r.get("peak_cuda_allocated_mb") is not None for r in results):
        lines += ["## Peak GPU memory (MB: torch.cuda.max_memory_allocated; reserved in results.csv)", "",
                  *markdown_table(layout, number_format("peak_cuda_allocated_mb"), "min"), ""]
    lines += ["## Peak memory (MB: peak resident set size of the cell's process)", "",
              *markdown_table(layout, number_format("peak_rss_mb"), "min"), "",
              "## Wall time (s: the whole cell, model load and evaluations included)", "",
              *markdown_table(layout, number_format("wall_s"), "min"), "",
              "## Forward passes (steps)", "", *markdown_table(layout, forwards_format, None), ""]
    failed = [r for r in results if not r.ok]
    if failed:
        lines += ["## Failed cells", "", *[f"- `{r.cell.name}`: {r.outcome.error}" for r in failed], ""]
    if plots:
        lines += ["## Plots", "", *[f"![{title}]({name})" for name, title in plots], ""]
    return lines


def _col_metric(layout: Layout, col: tuple) -> str:
    return next((r.metric for (_, c), rs in layout.groups.items() if c == col for r in rs), "")


def budget_lines(grid: Grid, results: list[Result]) -> list[str]:
    """What the cells have in common, and what a forward pass is here."""
    lines = [f"Cells compare at {grid.budget.describe()}. A forward pass is one forward of a training batch: "
             "a ZO step costs 2q (ZO-SGD-Cons 2q + 3, block-wise 2q per block), a Forward-Grad step q "
             "(forward-mode JVPs), a first-order step 1 (its backward is not counted but is in the wall time); "
             "evaluation is not counted."]
    if grid.budget.kind is None:
        steps = sorted({r.cell.cfg.train.steps for r in results})
        lines[0] += (f" Every cell trains {steps[0]} steps." if len(steps) == 1
                     else f" Steps differ between cells ({', '.join(map(str, steps))}): not an equal budget.")
    off = [r.cell.name for r in results if r.ok and r.cell.planned_forward_passes is not None
           and r.get("forward_passes") != r.cell.planned_forward_passes]
    if off:
        lines.append(f"Forward passes differ from the plan (steps x forward passes per step) in: {', '.join(off)}.")
    return lines


def alignment_lines(grid: Grid, results: list[Result]) -> list[str]:
    """ZO-Bench's task alignment: the score with the task's prompt and verbalizer (align: true)
    minus the score with a linear head instead (align: false), per optimizer and column."""
    layout = Layout.of(grid.axes, results, exclude=("task.align",))

    def gap(group: list[Result]) -> tuple[float | None, str]:
        by = {flag: [r.score for r in group if r.cell.axes["task.align"] is flag and r.score is not None]
              for flag in (True, False)}
        if not by[True] or not by[False]:
            return None, "-"
        value = statistics.fmean(by[True]) - statistics.fmean(by[False])
        return round(value, 3), f"{value:+.3f}"

    return ["## Task alignment gap (score with align: true minus align: false)", "",
            *markdown_table(layout, gap, None), ""]
