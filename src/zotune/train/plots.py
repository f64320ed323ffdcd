"""PNG plots of a run: training loss and evaluation accuracy against steps."""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure


def _smooth(values: list[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def plot_training(
    path: Path,
    steps: list[int],
    losses: list[float],
    dev: list[tuple[int, float]],
    metric: str,
    before: float | None,
    after: float | None,
    title: str,
) -> None:
    """Two panels: loss per step (raw and smoothed); dev metric per evaluation with the
    test metric before and after training as reference lines. (A bare Figure with fixed margins: every
    run writes one, and pyplot's figure manager and tight_layout's extra draw would double its cost.)"""
    fig = Figure(figsize=(11, 4))
    ax_loss, ax_acc = fig.subplots(1, 2)
    if steps:
        ax_loss.plot(steps, losses, color="0.75", linewidth=0.8, label="loss (step)")
        ax_loss.plot(steps, _smooth(losses, max(1, len(losses) // 20)), color="C0", label="loss (smoothed)")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("training loss")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    if dev:
        ax_acc.plot([s for s, _ in dev], [v for _, v in dev], "o-", color="C1", label=f"dev {metric}")
    if before is not None:
        ax_acc.axhline(before, color="C3", linestyle="--", label=f"test {metric}, before: {before:.3f}")
    if after is not None:
        ax_acc.axhline(after, color="C2", linestyle="-", label=f"test {metric}, after: {after:.3f}")
    ax_acc.set_xlabel("step")
    ax_acc.set_ylabel(metric)
    ax_acc.legend(loc="lower right")
    ax_acc.grid(alpha=0.3)
    fig.suptitle(title)
    fig.subplots_adjust(left=0.065, right=0.985, bottom=0.12, top=0.9, wspace=0.2)
    fig.savefig(path, dpi=110)
