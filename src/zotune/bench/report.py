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
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .benchdir import BenchDir
from .dev_scores import FELL_FAR, fell_far, late_score
from .grid import Grid, axis_label
from .plots import write_plots
from .results import SEED_AXIS, Layout, Result, collect, partner_differences, partners


# -- formatting ----------------------------------------------------------------------------
def mean_std(values: list[float]) -> tuple[float, float | None]:
    """The mean of ``values`` and their sample standard deviation (None for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


Format = Callable[[list[Result]], tuple[float | None, str]]  # a group -> (value compared for "best", text)


def missing(results: list[Result]) -> str:
    """What a group without a value shows: "" (no cells), "not run" (none has run yet), "-" (finished cells without
    it: the GPU's memory of cells run on a CPU) or "failed"."""
    if not results:
        return ""
    if all(r.not_run for r in results):
        return "not run"
    return "-" if any(r.ok for r in results) else "failed"


def score_format(results: list[Result]) -> tuple[float | None, str]:
    """A group's test scores as ``mean ± std``, with ``k/n ok`` when some of the n cells that ran failed and ``k/n
    run`` when some have not run yet (a grid run in pieces); compared by the mean, rounded to 3 digits."""
    values = [r.score for r in results if r.score is not None]
    if not values:
        return None, missing(results)
    mean, std = mean_std(values)
    text = f"{mean:.3f}" + (f" ± {std:.3f}" if std is not None else "")
    ran = [r for r in results if not r.not_run]
    if len(values) < len(ran):
        text += f" ({len(values)}/{len(ran)} ok)"
    if len(ran) < len(results):
        text += f" ({len(ran)}/{len(results)} run)"
    return round(mean, 3), text


def number_format(key: str, digits: int = 0) -> Format:
    """A :data:`Format` of the summary number ``key``: the group's mean, rounded to ``digits``."""
    def fmt(results: list[Result]) -> tuple[float | None, str]:
        values = [v for r in results if (v := r.get(key)) is not None]
        if not values:
            return None, missing(results)
        mean = round(statistics.fmean(values), digits)
        return mean, f"{mean:,.{digits}f}"
    return fmt


def forwards_format(results: list[Result]) -> tuple[float | None, str]:
    """A group's forward passes and steps (the distinct values of its finished cells, ``/``-joined; how many
    diverged, when any did); never compared."""
    ok = [r for r in results if r.ok]
    if not ok:
        return None, missing(results)
    fwd = sorted({int(r.get("forward_passes") or 0) for r in ok})
    steps = sorted({int(r.get("steps") or 0) for r in ok})
    diverged = sum(r.diverged for r in ok)
    note = f", {diverged} diverged" if diverged else ""
    return None, f"{'/'.join(map(str, fwd))} ({'/'.join(map(str, steps))} steps{note})"


def late_format(results: list[Result]) -> tuple[float | None, str]:
    """A group's late dev scores (:func:`~zotune.bench.dev_scores.late_score`: the mean of the last half of each
    finished cell's dev evaluations) as ``mean ± std``, with ``k fell > 0.1`` when k cells' dev fell more than
    ``FELL_FAR`` from its best to it and ``k diverged`` when k of them ended early at ``train.divergence_ratio``
    (which a dev curve misses when it happens after the last evaluation); compared by the mean."""
    scored = [r for r in results if r.ok and r.dev_scores]
    if not scored:
        return None, missing(results)
    mean, std = mean_std([late_score(r.dev_scores) for r in scored])
    fell = sum(fell_far(r.dev_scores) for r in scored)
    diverged = sum(r.diverged for r in scored)
    notes = [f"{fell} fell > {FELL_FAR:g}"] * bool(fell) + [f"{diverged} diverged"] * bool(diverged)
    text = f"{mean:.3f}" + (f" ± {std:.3f}" if std is not None else "") + (f" ({', '.join(notes)})" if notes else "")
    return round(mean, 3), text


def paired_format(value: Callable[[Result], float | None], partner: Callable[[Result], Result | None]) -> Format:
    """A :data:`Format` of paired differences: each cell's ``value`` minus that of its ``partner`` (the grid's
    ``paired_with`` cell on the same seed) as ``mean ± std (ahead on k/n)`` over the pairs where both have a value;
    "reference" for the partners' own row; compared by the mean."""
    def fmt(results: list[Result]) -> tuple[float | None, str]:
        if results and all(partner(r) is r for r in results):
            return None, "reference"
        diffs = partner_differences(results, partner, value)
        if not diffs:
            return None, missing(results) or "-"
        mean, std = mean_std(diffs)
        ahead = sum(d > 1e-9 for d in diffs)
        text = f"{mean:+.3f}" + (f" ± {std:.3f}" if std is not None else "") + f" (ahead on {ahead}/{len(diffs)})"
        return round(mean, 3), text
    return fmt


def on_device(fmt: Format, device: str | None) -> Format:
    """``fmt`` over the group's finished cells that ran on ``device`` (all of them for None); "-" when none did."""
    if device is None:
        return fmt

    def fmt_here(results: list[Result]) -> tuple[float | None, str]:
        here = [r for r in results if r.ok and r.device == device]
        return fmt(here) if here else (None, missing(results))
    return fmt_here


def reach_format(level: float) -> Format:
    """A :data:`Format`: the forward passes at the first dev evaluation that reached ``level`` (the task's metric),
    the mean over the group's cells that reached it, with ``(k/n)`` when not all of the ``n`` that ran did (then
    never the best); cells not run yet are not counted (a report of a grid run in pieces)."""
    def fmt(results: list[Result]) -> tuple[float | None, str]:
        ran = [r for r in results if not r.not_run]
        if not ran:
            return None, missing(results)
        reached = [h for r in ran if (h := r.forwards_to_dev(level)) is not None]
        if not reached:
            return None, f"- (0/{len(ran)})"
        mean = round(statistics.fmean(reached))
        every = len(reached) == len(ran)
        return (mean if every else None), f"{mean:,}" + ("" if every else f" ({len(reached)}/{len(ran)})")
    return fmt


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


LATE_EVALS = 4  # the late dev table: for cells evaluated on dev at least this often during training

GPU_MEMORY = ("peak_cuda_allocated_mb", "peak_cuda_reserved_mb")  # summary.json keys of cells run on CUDA


def write_csv(path: Path, grid: Grid, results: list[Result], root: Path) -> None:
    """The contract's columns (docs/contract.md: axes, status, run_dir, eval.*, forward_passes, peak_rss_mb, wall_s,
    error), then ``steps``, ``eval_zero_shot.*``, for cells run on CUDA the GPU's peaks, and each finished cell's
    ``device`` (cpu, cuda: where its trajectory was drawn)."""
    def metric_keys(section: str) -> list[str]:
        return list(dict.fromkeys(f"{section}.{m}" for r in results if r.ok for m in r.summary.get(section, {})))

    evals, zero_shot = metric_keys("eval"), metric_keys("eval_zero_shot")
    gpu = [k for k in GPU_MEMORY if any(r.get(k) is not None for r in results)]
    columns = [*grid.axes, "status", "run_dir", *evals, "forward_passes", "peak_rss_mb", "wall_s", "error",
               "steps", *zero_shot, *gpu, "device"]
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for r in results:
            row = {k: csv_value(v) for k, v in r.cell.axes.items()}
            row |= {"status": "ok" if r.ok else "failed", "run_dir": str(r.run_dir.relative_to(root)),
                    "error": "" if r.ok else r.outcome.error, "device": r.device if r.ok else ""}
            for key in [*evals, "forward_passes", "peak_rss_mb", "wall_s", "steps", *zero_shot, *gpu]:
                row[key] = csv_value(r.get(key))
            writer.writerow([row.get(c, "") for c in columns])


def write_report(grid: Grid, bench: BenchDir) -> Path:
    """results.csv, report.md and the plots into the bench directory; returns report.md's path."""
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
    n_ok, n_waiting = sum(r.ok for r in results), sum(r.not_run for r in results)
    waiting = f", {n_waiting} not run yet" if n_waiting else ""
    lines = [f"# {grid.description or f'Benchmark grid {grid.path.name}'}", "",
             f"`zotune bench --grid {grid.path}`: {len(results)} cells, {n_ok} ok, "
             f"{len(results) - n_ok - n_waiting} failed{waiting}.", "",
             *budget_lines(grid, results), ""]
    if layout.fixed:
        lines += ["Every cell: " + ", ".join(f"{k} {v}" for k, v in layout.fixed.items()) + ".", ""]
    lines += device_lines(results)
    if any(r.diverged for r in results):
        lines += ["A cell whose training loss passed `train.divergence_ratio` x its first step's stopped there (\"diverged\" "
                  "under forward passes) and was tested as it stood.", ""]
    score = metrics[0] if len(metrics) == 1 else "score"
    headers = None if len(metrics) == 1 else [f"{layout.col_label(c)} ({_col_metric(layout, c)})" for c in layout.col_keys]
    lines += [f"## Test {score} ({over})", "",
              *markdown_table(layout, score_format, "max", zero_shot_row(layout), headers), ""]
    if sum(len(r.dev_scores) >= LATE_EVALS for r in results if r.ok) > 1:
        lines += [f"## Late dev {score}: the mean of the last half of the dev evaluations ({over}; \"k fell > "
                  f"{FELL_FAR:g}\": k cells' dev score fell more than that from its best to it, as every run whose lr "
                  "was too long did in docs/sweeps.md; \"k diverged\": k cells ended early at `train.divergence_ratio`, "
                  "which their dev curves miss when it came after the last evaluation)", "",
                  *markdown_table(layout, late_format, "max", headers=headers), ""]
    if grid.paired_with is not None:
        lines += paired_lines(grid, results, layout, score, headers)
    if "task.align" in grid.axes:
        lines += alignment_lines(grid, results)
    if any(r.get("peak_cuda_allocated_mb") is not None for r in results):
        lines += ["## Peak GPU memory (MB: torch.cuda.max_memory_allocated; reserved in results.csv)", "",
                  *markdown_table(layout, number_format("peak_cuda_allocated_mb"), "min"), ""]
    devices = sorted({r.device for r in results if r.ok and r.device})
    for device in devices if len(devices) > 1 else [None]:  # mixed devices: a table each, as they compare
        on = "" if device is None else f", cells run on {device}"
        lines += [f"## Peak memory (MB: peak resident set size of the cell's process{on})", "",
                  *markdown_table(layout, on_device(number_format("peak_rss_mb"), device), "min"), "",
                  f"## Wall time (s: the whole cell, model load and evaluations included{on})", "",
                  *markdown_table(layout, on_device(number_format("wall_s"), device), "min"), ""]
    lines += ["## Forward passes (steps)", "", *markdown_table(layout, forwards_format, None), ""]
    for level in grid.dev_levels:
        lines += [f"## Forward passes to reach dev {metrics[0] if len(metrics) == 1 else 'score'} >= {level:g} "
                  "(first dev evaluation at the level; mean over seeds, (k/n) when not every seed reached it)", "",
                  *markdown_table(layout, reach_format(level), "min"), ""]
    failed = [r for r in results if not r.ok and not r.not_run]
    if failed:
        lines += ["## Failed cells", "", *[f"- `{r.cell.name}`: {r.outcome.error}" for r in failed], ""]
    waiting = [r for r in results if r.not_run]
    if waiting:
        lines += [f"## Not run yet ({len(waiting)} of {len(results)} cells)", "",
                  ", ".join(f"`{r.cell.name}`" for r in waiting), ""]
    if plots:
        lines += ["## Plots", "", *[f"![{title}]({name})" for name, title in plots], ""]
    return lines


def paired_lines(grid: Grid, results: list[Result], layout: Layout, score: str, headers: list[str] | None) -> list[str]:
    """The tables of ``paired_with``: each cell's test score, and its late dev score, minus its partner's."""
    axis, ref = grid.paired_with[0], grid.partner_label
    partner = partners(grid, results)
    others = [k for k in grid.axes if k not in (axis, SEED_AXIS)]
    same = " and ".join([*(axis_label(k) for k in others), "seed"])
    lines = [f"## Test {score} minus {ref}'s on the same {same} (paired: mean ± std of the differences, and on how "
             f"many pairs the cell is ahead; a seed's spread, which the tables above carry, cancels out)", "",
             *markdown_table(layout, paired_format(lambda r: r.score, partner), "max", headers=headers), ""]
    if sum(len(r.dev_scores) >= LATE_EVALS for r in results if r.ok) > 1:
        lines += [f"## Late dev {score} minus {ref}'s, paired the same way", "",
                  *markdown_table(layout, paired_format(lambda r: r.late_dev, partner), "max", headers=headers), ""]
    return lines


def device_lines(results: list[Result]) -> list[str]:
    """A note when the finished cells ran on several kinds of device (a grid run in pieces on several machines):
    how many on each; their wall times and memory are not comparable across them, their scores are."""
    counts = Counter(r.device for r in results if r.ok and r.device)
    if len(counts) < 2:
        return []
    each = ", ".join(f"{n} on {device}" for device, n in sorted(counts.items()))
    return [f"Cells ran on several devices ({each}: results.csv's `device`): scores and forward passes compare "
            "across them, memory and wall times only within one (a table each).", ""]


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
