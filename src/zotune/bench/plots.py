"""PNG plots of a grid's results (matplotlib, Agg); each drawn only when its axes exist.

- ``accuracy_vs_forward_passes.png``: per column (model x task x scheme), the score against
  forward passes per row (optimizer): dev-set curves when the cells evaluated during training
  (``train.eval_every``), the test score before (zero-shot, x = 0) and after training, and the
  training loss against forward passes below (mean over seeds);
- ``accuracy_vs_memory.png``: score against peak memory, one point per row and column, a panel per device;
- ``forwards_to_dev_level.png``: per column, the forward passes each row needed to first reach each of the
  grid's ``dev_levels`` (bars: the mean over the seeds that reached it, dots: each seed, k/n above);
- ``paired_differences.png``: with the grid's ``paired_with``, per column, each row's test and late dev scores
  minus its partner's on the same seed (a dot per seed, a bar at their mean);
- ``accuracy_vs_queries.png``: score against the query budget q (axis ``optimizer.n_queries``);
- ``alignment_gap.png``: score with and without task alignment (axis ``task.align``);
- ``memory_vs_seq_len.png``: from the grid's ``memory_csv`` (a ``zotune memory`` CSV), when given.
"""

from __future__ import annotations

import csv
import functools
import statistics
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .grid import Grid
from .results import Layout, Result, partner_differences, partners

MARKERS = "osD^v<>pPX*h"


def write_plots(grid: Grid, results: list[Result], root: Path) -> list[tuple[str, str]]:
    """Draw the plots that apply; returns ``(file name, title)`` of each one written."""
    ok = [r for r in results if r.ok and r.score is not None]
    if not ok:
        return []
    drawn = [learning_curves(grid, ok, root / "accuracy_vs_forward_passes.png"),
             accuracy_vs_memory(grid, ok, root / "accuracy_vs_memory.png")]
    if grid.dev_levels:
        drawn.append(forwards_to_dev_level(grid, ok, root / "forwards_to_dev_level.png"))
    if grid.paired_with is not None:
        drawn.append(paired_differences(grid, ok, root / "paired_differences.png"))
    if "optimizer.n_queries" in grid.axes:
        drawn.append(accuracy_vs_queries(grid, ok, root / "accuracy_vs_queries.png"))
    if "task.align" in grid.axes:
        drawn.append(alignment_gap(grid, ok, root / "alignment_gap.png"))
    if grid.memory_csv is not None:
        drawn.append(memory_vs_length(grid.memory_csv, root / "memory_vs_seq_len.png"))
    return [d for d in drawn if d is not None]


@functools.cache
def _pyplot():
    """matplotlib's pyplot on the Agg backend, imported on first use (``zotune bench`` imports this module)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _color(i: int, n: int):
    return _pyplot().get_cmap("tab10" if n <= 10 else "tab20")(i % (10 if n <= 10 else 20))


def _panels(n: int, rows: int = 1, height: float = 4.0):
    fig, axes = _pyplot().subplots(rows, n, figsize=(4.8 * n + 2.2, height * rows), squeeze=False)
    return fig, axes


def _save(fig, path: Path, title: str) -> tuple[str, str]:
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    _pyplot().close(fig)
    return path.name, title


def mean_by_x(curves: Iterable[list[tuple[float, float]]]) -> tuple[list[float], list[float]]:
    """Average several (x, y) curves point-wise at equal x (the seeds of one group)."""
    by_x: dict[float, list[float]] = {}
    for curve in curves:
        for x, y in curve:
            by_x.setdefault(x, []).append(y)
    xs = sorted(by_x)
    return xs, [statistics.fmean(by_x[x]) for x in xs]


def _smooth(values: list[float]) -> list[float]:
    window = max(1, len(values) // 10)
    return [statistics.fmean(values[max(0, i + 1 - window): i + 1]) for i in range(len(values))]


def _mean(results: list[Result], key: str) -> float | None:
    values = [v for r in results if (v := (r.score if key == "score" else r.get(key))) is not None]
    return statistics.fmean(values) if values else None


def _legend(fig, order: list[str] | None = None) -> None:
    """One legend for the figure: every panel's labels once (a row may be in some panels only), in ``order``."""
    seen: dict[str, Any] = {}
    for ax in fig.axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(label, handle)
    labels = sorted(seen, key=lambda x: order.index(x) if order and x in order else len(order or ()))
    if labels:
        fig.legend([seen[x] for x in labels], labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)


# -- the plots -----------------------------------------------------------------------------
def learning_curves(grid: Grid, results: list[Result], path: Path) -> tuple[str, str]:
    """Per column, the dev score (or the zero-shot and test scores) against forward passes above and the smoothed
    training loss below, one line per row (seeds averaged); returns ``(file name, title)``."""
    layout = Layout.of(grid.axes, results)
    fig, axes = _panels(len(layout.col_keys), rows=2, height=3.6)
    for j, col in enumerate(layout.col_keys):
        top, bottom = axes[0][j], axes[1][j]
        metric = ""
        for i, row in enumerate(layout.row_keys):
            group = layout.groups.get((row, col), [])
            if not group:
                continue
            metric, color, label = group[0].metric, _color(i, len(layout.row_keys)), layout.row_label(row)
            dev = mean_by_x([(rec["forward_passes"], rec["dev"][metric]) for rec in r.records
                             if metric in rec.get("dev", {})] for r in group)
            final = (_mean(group, "forward_passes"), _mean(group, "score"))
            zero = _mean(group, f"eval_zero_shot.{metric}")
            if dev[0]:
                top.plot(*dev, "-o", color=color, markersize=3, label=f"{label}")
                top.plot(*final, "*", color=color, markersize=11)
                if zero is not None:
                    top.plot(0, zero, "*", color=color, markersize=11, fillstyle="none")
            elif zero is not None:
                top.plot([0, final[0]], [zero, final[1]], "--*", color=color, markersize=9, label=label)
            else:
                top.plot(*final, "*", color=color, markersize=11, label=label)
            xs, losses = mean_by_x([(rec["forward_passes"], rec["loss"]) for rec in r.records] for r in group)
            if xs:
                bottom.plot(xs, _smooth(losses), color=color, label=label)
        for level in grid.dev_levels:
            top.axhline(level, color="grey", linestyle=":", linewidth=1)
        top.set_title(layout.col_label(col))
        top.set_ylabel(f"{metric} (lines: dev; stars: test)" if any(
            "dev" in rec for r in results for rec in r.records) else f"test {metric}")
        bottom.set_xlabel("forward passes")
        bottom.set_ylabel("training loss (smoothed)")
        for ax in (top, bottom):
            ax.grid(alpha=0.3)
    _legend(fig, layout.row_labels)
    return _save(fig, path, f"Score and training loss against forward passes ({grid.budget.short()})")


MEMORY_KEYS = {"cuda": ("peak_cuda_allocated_mb", "peak GPU memory (MB, torch's peak allocation)")}
RSS = ("peak_rss_mb", "peak memory (MB, peak RSS of the cell's process)")


def memory_points(grid: Grid, results: list[Result]) -> dict[str, list[tuple[int, int, str, float, float]]]:
    """Per device the cells ran on, ``(row index, column index, label, memory, score)`` of each row and column,
    averaged over that device's cells: memory on different devices does not compare, so each gets its own panel
    (a GPU's by torch's peak allocation, where it was recorded; a CPU's by peak RSS)."""
    layout = Layout.of(grid.axes, results)
    devices = sorted({r.device for r in results}) or [""]
    points: dict[str, list[tuple[int, int, str, float, float]]] = {}
    for device in devices:
        key = MEMORY_KEYS.get(device, RSS)[0]
        for j, col in enumerate(layout.col_keys):
            for i, row in enumerate(layout.row_keys):
                here = [r for r in layout.groups.get((row, col), []) if r.device == device]
                x = _mean(here, key)
                x = _mean(here, RSS[0]) if x is None else x
                y = _mean(here, "score")
                if x is not None and y is not None:
                    label = " | ".join(t for t in (layout.row_label(row), layout.col_label(col)) if t)
                    points.setdefault(device, []).append((i, j, label, x, y))
    return points


def accuracy_vs_memory(grid: Grid, results: list[Result], path: Path) -> tuple[str, str]:
    """The test score against peak memory, one point per row and column (seeds averaged), a panel per device the
    cells ran on; returns ``(file name, title)``."""
    points = memory_points(grid, results)
    n_rows = len(Layout.of(grid.axes, results).row_keys)
    fig, axes = _panels(max(1, len(points)))
    for ax, (device, device_points) in zip(axes[0], points.items()):
        for i, j, label, x, y in device_points:
            ax.plot(x, y, MARKERS[j % len(MARKERS)], color=_color(i, n_rows), markersize=8, label=label)
        ax.set_xlabel(MEMORY_KEYS.get(device, RSS)[1])
        ax.set_ylabel(f"test {results[0].metric}")
        if len(points) > 1:
            ax.set_title(f"cells run on {device}")
        ax.grid(alpha=0.3)
    _legend(fig)
    return _save(fig, path, "Score against peak memory")


def forwards_to_dev_level(grid: Grid, results: list[Result], path: Path) -> tuple[str, str]:
    """Per column, grouped bars: for each of the grid's ``dev_levels``, the forward passes each row's cells needed to
    first reach it (mean over the cells that did; a dot per cell; ``k/n`` of them above the bar, ``0/n`` where none
    did); returns ``(file name, title)``."""
    layout = Layout.of(grid.axes, results)
    fig, axes = _panels(len(layout.col_keys))
    levels, n_rows = list(grid.dev_levels), len(layout.row_keys)
    width = 0.8 / max(1, n_rows)
    for j, col in enumerate(layout.col_keys):
        ax = axes[0][j]
        for i, row in enumerate(layout.row_keys):
            group = layout.groups.get((row, col), [])
            if not group:
                continue
            color = _color(i, n_rows)
            for k, level in enumerate(levels):
                x = k + (i - (n_rows - 1) / 2) * width
                hits = [h for r in group if (h := r.forwards_to_dev(level)) is not None]
                if hits:
                    ax.bar(x, statistics.fmean(hits), width, color=color, alpha=0.75,
                           label=layout.row_label(row) if k == 0 else None)
                    ax.plot([x] * len(hits), hits, ".", color="black", markersize=4)
                elif k == 0:
                    ax.bar(x, 0, width, color=color, label=layout.row_label(row))  # in the legend all the same
                ax.annotate(f"{len(hits)}/{len(group)}", (x, max(hits, default=0)), ha="center", va="bottom",
                            fontsize=6, xytext=(0, 2), textcoords="offset points")
        ax.set_xticks(range(len(levels)), [f"dev >= {level:g}" for level in levels])
        ax.set_ylabel("forward passes to first reach it (fewer is better)")
        ax.set_title(layout.col_label(col))
        ax.grid(alpha=0.3, axis="y")
    _legend(fig, layout.row_labels)
    return _save(fig, path, f"Forward passes to reach a dev score ({grid.budget.short()})")


def paired_differences(grid: Grid, results: list[Result], path: Path) -> tuple[str, str] | None:
    """Per column, a row per optimizer (the partners' own row left out): its cells' test score and late dev score
    minus their ``paired_with`` partners' on the same seed, a dot per pair and a bar at their mean, with the zero
    line (level with the partner); returns ``(file name, title)``, None when no pair has finished."""
    layout = Layout.of(grid.axes, results)
    partner = partners(grid, results)
    measures = (("test", lambda r: r.score), ("late dev", lambda r: r.late_dev))
    diffs: dict[tuple, list[list[float]]] = {}
    for (row, col), group in layout.groups.items():
        diffs[(row, col)] = [partner_differences(group, partner, f) for _, f in measures]
    rows = [row for row in layout.row_keys if any(any(diffs.get((row, col), [[], []])) for col in layout.col_keys)]
    if not rows:
        return None
    fig, axes = _panels(len(layout.col_keys), height=0.45 * len(rows) + 1.6)
    for j, col in enumerate(layout.col_keys):
        ax = axes[0][j]
        for i, row in enumerate(rows):
            for k, (name, _) in enumerate(measures):
                values = diffs.get((row, col), [[], []])[k]
                if not values:
                    continue
                y = i + (k - 0.5) * 0.35
                ax.barh(y, statistics.fmean(values), 0.32, color=f"C{k}", alpha=0.45, label=f"{name}: mean of the seeds")
                ax.plot(values, [y] * len(values), "o", color=f"C{k}", markersize=4)
        ax.axvline(0, color="black", linewidth=0.8)
        ax.set_yticks(range(len(rows)), [layout.row_label(row) for row in rows])
        ax.invert_yaxis()
        ax.set_xlabel(f"minus {grid.partner_label}'s {results[0].metric}, same seed (right: ahead)")
        ax.set_title(layout.col_label(col))
        ax.grid(alpha=0.3, axis="x")
    _legend(fig)
    return _save(fig, path, f"Each cell minus {grid.partner_label} on the same seed (dots: seeds, bars: their mean)")


def accuracy_vs_queries(grid: Grid, results: list[Result], path: Path) -> tuple[str, str]:
    """Per column, the test score (mean ± std over seeds) against the query budget ``optimizer.n_queries``, one line
    per row; returns ``(file name, title)``."""
    layout = Layout.of(grid.axes, results, exclude=("optimizer.n_queries",))
    fig, axes = _panels(len(layout.col_keys))
    for j, col in enumerate(layout.col_keys):
        ax = axes[0][j]
        for i, row in enumerate(layout.row_keys):
            by_q: dict[int, list[float]] = {}
            for r in layout.groups.get((row, col), []):
                by_q.setdefault(r.cell.cfg.optimizer.n_queries, []).append(r.score)
            qs = sorted(by_q)
            means = [statistics.fmean(by_q[q]) for q in qs]
            stds = [statistics.stdev(by_q[q]) if len(by_q[q]) > 1 else 0.0 for q in qs]
            ax.errorbar(qs, means, yerr=stds, fmt="-o", capsize=3, color=_color(i, len(layout.row_keys)),
                        label=layout.row_label(row))
        qs = sorted({r.cell.cfg.optimizer.n_queries for r in results})
        ax.set_xscale("log", base=2)
        ax.set_xticks(qs, [str(q) for q in qs])
        ax.minorticks_off()
        ax.set_xlabel("query budget q (directions per step)")
        ax.set_ylabel(f"test {results[0].metric}")
        ax.set_title(layout.col_label(col))
        ax.grid(alpha=0.3)
    _legend(fig, layout.row_labels)
    return _save(fig, path, f"Score against the query budget q ({grid.budget.short()})")


def alignment_gap(grid: Grid, results: list[Result], path: Path) -> tuple[str, str]:
    """Per column, bars of the mean test score with and without task alignment (``task.align``) for each row;
    returns ``(file name, title)``."""
    layout = Layout.of(grid.axes, results, exclude=("task.align",))
    fig, axes = _panels(len(layout.col_keys))
    width = 0.38
    for j, col in enumerate(layout.col_keys):
        ax = axes[0][j]
        for k, (flag, name) in enumerate(((True, "aligned (prompt + verbalizer)"), (False, "not aligned (linear head)"))):
            means = [_mean([r for r in layout.groups.get((row, col), []) if r.cell.axes["task.align"] is flag], "score")
                     for row in layout.row_keys]
            xs = [i + (k - 0.5) * width for i in range(len(means))]
            ax.bar(xs, [m if m is not None else 0 for m in means], width, color=f"C{k}", label=name)
        ax.set_xticks(range(len(layout.row_keys)), [layout.row_label(r) for r in layout.row_keys],
                      rotation=30, ha="right")
        ax.set_ylabel(f"test {results[0].metric}")
        ax.set_title(layout.col_label(col))
        ax.grid(alpha=0.3, axis="y")
    _legend(fig, layout.row_labels)
    return _save(fig, path, "Task alignment: score with and without the prompt's verbalizer")


def memory_vs_length(csv_path: Path, path: Path) -> tuple[str, str] | None:
    """Peak memory against sequence length from a ``zotune memory`` CSV (``length``,
    ``peak_bytes`` or a ``*mb*`` column, ``status``): one line per combination of the text
    columns that vary (optimizer, scheme). Skipped (None) when the file or its columns are missing."""
    if not csv_path.is_file():
        return None
    with open(csv_path, newline="", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r.get("status", "ok") in ("ok", "")]
    if not rows:
        return None
    columns = list(rows[0])
    x_col = next((c for c in columns if "len" in c.lower() and _numeric(rows, c)), None)
    y_col = "peak_bytes" if "peak_bytes" in columns else next((c for c in columns if "mb" in c.lower()), None)
    if x_col is None or y_col is None or not _numeric(rows, y_col):
        return None
    scale = 2**20 if y_col.endswith("bytes") else 1
    groups = [c for c in columns if c not in (x_col, y_col, "status", "error", "peak_reset")
              and not _numeric(rows, c) and len({r[c] for r in rows}) > 1]
    lines: dict[str, list[tuple[float, float]]] = {}
    for row in rows:
        if row[y_col]:
            label = " ".join(row[c] for c in groups) or y_col
            lines.setdefault(label, []).append((float(row[x_col]), float(row[y_col]) / scale))
    fig, axes = _panels(1)
    ax = axes[0][0]
    for label, points in lines.items():
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], "-o", markersize=3, label=label)
    ax.set_xlabel(f"{x_col} (tokens per sequence)")
    ax.set_ylabel("peak memory (MB)")
    ax.grid(alpha=0.3)
    _legend(fig)
    return _save(fig, path, f"Peak memory against sequence length ({csv_path.name})")


def _numeric(rows: list[dict[str, str]], column: str) -> bool:
    try:
        for row in rows:
            if row[column] not in ("", None):
                float(row[column])
    except (TypeError, ValueError):
        return False
    return True
