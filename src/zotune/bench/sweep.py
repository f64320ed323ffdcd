"""``zotune sweep``: a learning-rate sweep of one train config, picked by dev score (MeZO's protocol).

The sweep is a ``zotune bench`` grid written into ``--out`` (``grid.yaml``): the config as its base,
``optimizer.lr`` (and ``optimizer.eps`` when given) and ``seed`` as its axes, a short budget of steps,
dev evaluations every ``eval_every`` steps with the best-on-dev weights kept (``train.keep_best``) and
a diverged cell ended early (``train.divergence_ratio``). Its cells are ordinary run directories under
``cells/``; a finished cell is skipped when the same sweep (or one with more values) runs again.

The pick: the setting with the best dev score averaged over its seeds, ties broken by its mean dev score
over all evaluations (the steadier setting); a diverged or never-evaluated cell ranks last. ``sweep.md``
holds the table, ``picked.yaml`` the config with the picked values, ready for the long run::

    zotune sweep --config my.yaml --out runs/sweep/mine --lr 1e-5,3e-5,1e-4,3e-4
    zotune train --config runs/sweep/mine/picked.yaml --out runs/mine train.steps=2000

A long run (the config's ``train.steps``, 1.5x the sweep's steps or more) gets a note naming the rung below
the pick to run at its length too (:func:`longer_run_note`): picks measured here held or needed less, never more.
``--confirm`` runs it: the pick and that rung for ``train.steps`` each, picked by their late dev score
(:func:`confirm_sweep`).
``benchmarks/sweeps.py`` builds the tables of docs/sweeps.md with the same reading and ranking.
"""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..config import Config, from_dict, raw_config, set_dotted
from ..errors import ConfigError
from ..optim.factory import defaults_row, resolved_settings
from ..optim.registry import is_zeroth_order
from ..tasks import task_spec
from ..train.rundir import read_metrics
from .benchdir import BenchDir
from .dev_scores import FELL_FAR, dev_fall, late_score
from .grid import load_grid
from .runner import run_bench, say

DEFAULT_STEPS = 100  # the sweeps of docs/sweeps.md: 100 ZO steps
DIVERGENCE_RATIO = 10.0  # a cell whose loss passes 10x its first step's ends there
LONGER_RUN = 1.5  # a long run this many times the sweep's steps or more: longer_run_note names a shorter lr to try
CONFIRM, CONFIRM_EVALS = "confirm", 16  # --confirm: its directory under --out; dev evaluations in each long run
PICKED, TABLE = "picked.yaml", "sweep.md"


@dataclass
class SweepCell:
    """What the ranking reads of one cell: its dev scores by step, its losses, its summary (None: unfinished)."""

    name: str
    dev: list[tuple[int, float]] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    summary: dict | None = None
    metric: str = "accuracy"
    marked_diverged: bool = False  # read back from a table that marked it so

    @property
    def diverged(self) -> bool:
        """Ended by ``train.divergence_ratio``, a non-finite loss, or a loss over 10x the first one."""
        if self.marked_diverged or (self.summary or {}).get("diverged_at_step") is not None:
            return True
        finite = [x for x in self.losses if math.isfinite(x)]
        return len(finite) < len(self.losses) or (bool(finite) and max(finite) > DIVERGENCE_RATIO * finite[0])

    @property
    def best(self) -> tuple[float, int] | None:
        """(best dev score, minus its step): the earliest of equal scores ranks first."""
        return max(((score, -step) for step, score in self.dev), default=None)

    @property
    def scores(self) -> list[float]:
        """The dev scores in step order."""
        return [score for _, score in sorted(self.dev)]

    @property
    def test(self) -> float | None:
        """The final test score (with the best-dev weights under ``train.keep_best``)."""
        return ((self.summary or {}).get("eval") or {}).get(self.metric)

    @property
    def setting(self) -> str:
        """The cell's name without its seed: the cells of one setting run with several seeds share it."""
        return ",".join(part for part in self.name.split(",") if not part.startswith("seed="))


def read_cell(path: Path, metric: str = "accuracy") -> SweepCell:
    """A cell's run directory (finished or not) -> :class:`SweepCell`."""
    cell = SweepCell(path.name, metric=metric)
    for record in read_metrics(path / "metrics.jsonl"):
        if "loss" in record:
            cell.losses.append(float(record["loss"]))
        if metric in record.get("dev", {}):
            cell.dev.append((record["step"], record["dev"][metric]))
    if (path / "summary.json").is_file():
        cell.summary = json.loads((path / "summary.json").read_text())
    return cell


def rank_key(cells: Sequence[SweepCell]) -> tuple[float, float]:
    """A setting's rank: its best dev score averaged over its seeds, then its mean dev over all their
    evaluations; a diverged or unevaluated cell makes it -1."""
    if any(c.diverged or not c.dev for c in cells):
        return (-1.0, -1.0)
    scores = [s for c in cells for _, s in c.dev]
    return (sum(max(s for _, s in c.dev) for c in cells) / len(cells), sum(scores) / len(scores))


def by_setting(cells: Sequence[SweepCell]) -> dict[str, list[SweepCell]]:
    """The cells grouped by :attr:`SweepCell.setting` (a setting's seeds together), in order of appearance."""
    settings: dict[str, list[SweepCell]] = {}
    for c in cells:
        settings.setdefault(c.setting, []).append(c)
    return settings


def pick(cells: Sequence[SweepCell]) -> str | None:
    """The picked setting (:attr:`SweepCell.setting`), or None when every setting diverged or has no dev score."""
    ranked = {s: rank_key(cs) for s, cs in by_setting(cells).items()}
    best = max(ranked, key=ranked.get, default=None)
    return best if best is not None and ranked[best][0] >= 0 else None


def setting_values(setting: str) -> dict[str, str]:
    """``lr=3e-05,eps=0.001`` -> {"lr": "3e-05", "eps": "0.001"}."""
    return dict(part.split("=", 1) for part in setting.split(","))


def cell_order(name: str) -> list:
    """Cells in the order of their axis values, numbers as numbers (``lr=1e-05,seed=0``)."""
    key = []
    for part in name.split(","):
        value = part.partition("=")[2]
        try:
            key.append((0, float(value), ""))
        except ValueError:
            key.append((1, 0.0, value))
    return key


def sweep_table(title: str, cells: Sequence[SweepCell], late: bool = False) -> str:
    """The markdown table of a sweep: a row per cell (dev at every evaluation, best dev and its step, test,
    last loss), the picked setting's rows marked. ``late``: the confirm stage's table, with each cell's
    :func:`late_dev` and the pick by it (:func:`confirm_pick`)."""
    cells = sorted(cells, key=lambda c: cell_order(c.name))
    if not cells:
        return f"### {title}\n\n(no cells yet)\n"
    picked = confirm_pick(cells) if late else pick(cells)
    steps = sorted({s for c in cells for s, _ in c.dev})
    late_head, late_rule = (" late dev (last half) |", "---:|") if late else ("", "")
    test_head = "test" if late else "test, best-dev weights"  # a long run keeps the config's train.keep_best
    lines = [f"### {title}", "",
             f"| cell | dev at steps {' / '.join(map(str, steps))} | best dev (step) |{late_head} {test_head} | last loss | |",
             f"|---|---|---|{late_rule}---:|---:|---|"]
    for c in cells:
        by_step = dict(c.dev)
        dev = " / ".join(f"{by_step[s]:.3f}" if s in by_step else "-" for s in steps)
        best = f"{c.best[0]:.3f} ({-c.best[1]})" if c.best else "-"
        score = late_dev(c) if late else None
        late_cell = (f" {score:.3f} |" if score is not None else " - |") if late else ""
        test = f"{c.test:.3f}" if c.test is not None else "-"
        loss = f"{c.losses[-1]:.3f}" if c.losses else "-"
        status = "diverged" if c.diverged else "unfinished" if c.summary is None else ""
        if c.setting == picked:
            status = "**picked**" + (" (unfinished)" if c.summary is None else "")
        lines.append(f"| {c.name} | {dev} | {best} |{late_cell} {test} | {loss} | {status} |")
    return "\n".join(lines) + "\n"


# -- zotune sweep ----------------------------------------------------------------------------
def parse_values(text: str, flag: str, kind: Callable[[str], Any] = float, positive: bool = True) -> list:
    """``1e-5,3e-5`` -> [1e-05, 3e-05]: distinct values (> 0 for ``positive``), a one-line ConfigError otherwise."""
    try:
        values = [kind(v.strip()) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{flag} takes comma-separated {kind.__name__}s, got {text!r}") from None
    if not values:
        raise ConfigError(f"{flag} needs at least one value")
    if positive and any(not v > 0 or not math.isfinite(v) for v in values):
        raise ConfigError(f"{flag} values must be > 0, got {text!r}")
    if len(set(values)) < len(values):
        raise ConfigError(f"{flag} lists a value twice: {text!r}")
    return values


def around(lr: float) -> list[float]:
    """Four half-decade values around ``lr``: lr / 10, lr / 3, lr, 3 lr, on the 1-3-10 ladder (1e-4 ->
    1e-5, 3e-5, 1e-4, 3e-4)."""
    rung = round(2 * math.log10(lr))
    return [float(f"{10 ** ((rung + j) / 2):.0e}") for j in (-2, -1, 0, 1)]


def sweep_grid(raw: dict[str, Any], lrs: list[float], eps: list[float] | None, seeds: list[int], steps: int,
               eval_every: int, label: str = "", keep_best: bool = True) -> dict[str, Any]:
    """The bench grid of a sweep of the config mapping ``raw`` (``label``: what it tunes, for the description;
    ``keep_best``: each cell's final weights are its best on dev, as in MeZO's sweeps)."""
    base = yaml.safe_load(yaml.safe_dump(raw))  # a deep copy, plain data
    set_dotted(base, "train.eval_every", eval_every)
    set_dotted(base, "train.keep_best", keep_best)
    if not (base.get("train") or {}).get("divergence_ratio"):
        set_dotted(base, "train.divergence_ratio", DIVERGENCE_RATIO)
    axes: dict[str, list] = {"optimizer.lr": lrs}
    if eps:
        axes["optimizer.eps"] = eps
    axes["seed"] = seeds
    what = ("lr x eps" if eps else "lr") + " sweep" + (f": {label}" if label else "")
    return {"description": f"{what}, {steps} steps, picked by dev", "base": base, "axes": axes, "budget": {"steps": steps}}


def run_sweep(config: str | Path | None, out: str | Path, lrs: list[float] | None = None,
              eps: list[float] | None = None, seeds: Sequence[int] | None = None, steps: int = DEFAULT_STEPS,
              eval_every: int | None = None, jobs: int = 1, overrides: Sequence[str] = (), overwrite: bool = False,
              dry_run: bool = False, confirm: bool = False, log: Callable[[str], None] = say) -> int:
    """``zotune sweep``: run (or resume) the sweep, print its table and pick, write ``sweep.md`` and
    ``picked.yaml``. With ``confirm``, then run the pick and the rung below it for the config's ``train.steps``
    under ``out/confirm`` and pick between them by their late dev score (:func:`confirm_sweep`). Exit status 0
    with a pick, 1 without one (every setting diverged) or when a cell failed. Every input is checked before
    anything is written; ``dry_run`` writes nothing."""
    if jobs < 1:
        raise ConfigError(f"--jobs must be >= 1, got {jobs}")
    if steps < 1:
        raise ConfigError(f"--steps must be >= 1, got {steps}")
    eval_every = eval_every if eval_every is not None else max(1, steps // 4)
    if not 1 <= eval_every <= steps:
        raise ConfigError(f"--eval-every must be between 1 and --steps ({steps}), got {eval_every}")
    raw = raw_config(config, overrides)
    cfg = from_dict(raw)
    if eps and not is_zeroth_order(cfg.optimizer.name):
        raise ConfigError(f"--eps sweeps a zeroth-order optimizer's perturbation; {cfg.optimizer.name} has none")
    if confirm and cfg.train.steps <= steps:
        raise ConfigError(f"--confirm runs the pick for train.steps ({cfg.train.steps}), which must be more than "
                          f"the sweep's --steps ({steps})")
    lrs = lrs or around(resolved_settings(cfg)["lr"])
    label = f"{cfg.optimizer.name}, {defaults_row(cfg.tuning)}, {task_spec(cfg.task).name}"
    seeds = list(seeds) if seeds else [cfg.seed]
    grid = sweep_grid(raw, lrs, eps, seeds, steps, eval_every, label)
    out = Path(out)
    cells = _checked_cells(grid, out, overwrite, dry_run, log)
    if dry_run:
        if confirm:
            log(f"then (--confirm): the pick and the lr below it, {cfg.train.steps} steps each, in {out / CONFIRM}")
        return 0
    status = run_bench(out / "grid.yaml", out, jobs=jobs, log=log)
    metric = task_spec(cfg.task).metric
    swept = [read_cell(BenchDir(out).run_dir(c), metric) for c in cells]
    text = sweep_table(f"{out.name}: {grid['description']} ({metric})", swept)
    (out / TABLE).write_text(text, encoding="utf-8")
    log(text)
    picked = pick(swept)
    if picked is None:
        log("no pick: every setting diverged or has no dev score; try smaller learning rates (--lr)")
        return 1
    write_picked(out / PICKED, raw, cfg.version, picked)
    chosen = [c for c in swept if c.setting == picked]
    dev = rank_key(chosen)[0]  # its best dev, averaged over its seeds
    lines = [f"picked: {picked} (best dev {metric} {dev:.3f}{' averaged over seeds' if len(chosen) > 1 else ''}); "
             f"its config: {out / PICKED}"]
    values = setting_values(picked)
    for axis, ladder in (("lr", lrs), ("eps", eps or [])):
        if len(ladder) > 1 and float(values[axis]) in (min(ladder), max(ladder)):
            lines.append(f"note: the picked {axis} ({values[axis]}) is at the edge of the grid: a value beyond it may do better")
    longer = None if confirm else longer_run_note(float(values["lr"]), lrs, steps, cfg.train.steps)
    lines += [longer] if longer else []
    for line in lines:
        log(line)
    text += "\n" + "\n\n".join(lines) + "\n"
    (out / TABLE).write_text(text, encoding="utf-8")
    if confirm:
        status = max(status, confirm_sweep(raw, cfg, values, rung_below(float(values["lr"]), lrs), seeds, out,
                                           text, jobs, overwrite, log))
    return status


def _checked_cells(grid: dict[str, Any], out: Path, overwrite: bool, dry_run: bool, log: Callable[[str], None]) -> list:
    """The grid's cells, every one validated and none stale in ``out`` (unless ``overwrite``) before anything is
    written; then ``out/grid.yaml`` written (a dry run lists the cells instead and writes nothing)."""
    grid_text = yaml.safe_dump(grid, sort_keys=False)
    bench = BenchDir(out)
    with tempfile.TemporaryDirectory() as tmp:
        draft = Path(tmp) / "grid.yaml"
        draft.write_text(grid_text, encoding="utf-8")
        cells = load_grid(draft).cells
        if dry_run:  # the listing names the grid file a real run writes
            run_bench(draft, out, dry_run=True, log=lambda line: log(line.replace(str(draft), str(out / "grid.yaml"))))
            return cells
    stale = [c.name for c in cells if bench.state(c) == "stale"]
    if stale and not overwrite:
        raise ConfigError(f"{out} holds a sweep with other settings (cells {', '.join(stale)}): use another --out, "
                          "or --overwrite to run those cells again")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    (out / "grid.yaml").write_text(grid_text, encoding="utf-8")
    return cells


def confirm_sweep(raw: dict[str, Any], cfg: Config, picked: dict[str, str], lower: float, seeds: list[int], out: Path,
                  text: str, jobs: int, overwrite: bool, log: Callable[[str], None]) -> int:
    """``--confirm``: the sweep's pick (``picked``, its lr and eps) and the rung below its lr (``lower``), each run
    for the config's ``train.steps`` (the long run itself, dev every ``steps / CONFIRM_EVALS``) in
    ``out/confirm``, picked by :func:`late_dev`, ties to the lower lr. Why: of issue 24's seven such pairs at 675
    steps (seed 0) the late dev score picked the better-testing lr in 6 (the seventh walks off at both lrs and is
    flagged: :func:`setting_fall`) and the best dev score in 5; over three seeds (two pairs) the late dev score in
    both, the best dev score in neither (docs/sweeps.md).
    ``picked.yaml`` becomes the confirmed setting; ``text`` (the sweep's table) gets the confirm table."""
    steps = cfg.train.steps
    eval_every = cfg.train.eval_every or max(1, steps // CONFIRM_EVALS)
    eps = [float(picked["eps"])] if "eps" in picked else None
    grid = sweep_grid(raw, [lower, float(picked["lr"])], eps, seeds, steps, eval_every,
                      keep_best=cfg.train.keep_best)
    grid["description"] = (f"confirm at the long run's length: the pick ({picked['lr']}) and the lr below it, {steps} "
                           "steps, picked by the late dev score")
    where = out / CONFIRM
    cells = _checked_cells(grid, where, overwrite, False, log)
    status = run_bench(where / "grid.yaml", where, jobs=jobs, log=log)
    metric = task_spec(cfg.task).metric
    runs = [read_cell(BenchDir(where).run_dir(c), metric) for c in cells]
    confirmed = confirm_pick(runs)
    table = sweep_table(f"{out.name}/{CONFIRM}: {grid['description']} ({metric})", runs, late=True)
    log(table)
    if confirmed is None:
        lines = ["no confirmed pick: both settings diverged at the long run's length; try smaller learning rates"]
        status = 1
    else:
        write_picked(out / PICKED, raw, cfg.version, confirmed)
        chosen = by_setting(runs)[confirmed]  # its seeds in the grid's order: seeds[0]'s first
        lines = [f"confirmed: {confirmed} (late dev {metric} {confirm_key(chosen):.3f}); its config: {out / PICKED}; "
                 f"its run (seed {seeds[0]}): {where / 'cells' / chosen[0].name}"]
        further = rung_below(lower, [])
        if (fall := setting_fall(chosen)) > FELL_FAR:
            lines.append(f"note: its dev falls {fall:.3f} from its best to its late mean, as every run whose lr was "
                         f"too long did in docs/sweeps.md; try lr={further:g} (a rung below both)")
        elif float(setting_values(confirmed)["lr"]) == lower:
            lines.append(f"note: the lower lr won; one rung further down ({further:g}) may do better still")
    for line in lines:
        log(line)
    (out / TABLE).write_text(text + "\n" + table + "\n" + "\n\n".join(lines) + "\n", encoding="utf-8")
    return status


def late_dev(cell: SweepCell) -> float | None:
    """The cell's :func:`~zotune.bench.dev_scores.late_score`: its mean dev score over the last half of its
    evaluations."""
    return late_score(cell.scores)


def setting_fall(cells: Sequence[SweepCell]) -> float:
    """How far a setting's dev falls from its best to its late score (:func:`~zotune.bench.dev_scores.dev_fall`),
    averaged over its seeds (0 without dev scores); over ``FELL_FAR`` its lr may be too long."""
    falls = [dev_fall(c.scores) for c in cells if c.dev]
    return sum(falls) / len(falls) if falls else 0.0


def confirm_key(cells: Sequence[SweepCell]) -> float:
    """A setting's :func:`late_dev` averaged over its seeds; -1 when a seed diverged or has no dev score."""
    scores = [late_dev(c) for c in cells]
    if any(c.diverged for c in cells) or None in scores or not scores:
        return -1.0
    return sum(scores) / len(scores)


def confirm_pick(cells: Sequence[SweepCell]) -> str | None:
    """The setting with the highest :func:`confirm_key`, a tie to the lower lr; None when every setting diverged."""
    settings = by_setting(cells)
    ranked = sorted(settings, key=lambda s: (-confirm_key(settings[s]), float(setting_values(s)["lr"])))
    return ranked[0] if ranked and confirm_key(settings[ranked[0]]) >= 0 else None


def rung_below(lr: float, lrs: Sequence[float]) -> float:
    """The grid's next value below ``lr``, else a third of ``lr`` on the 1-3-10 ladder."""
    return max((x for x in lrs if x < lr), default=around(lr)[1])


def longer_run_note(lr: float, lrs: Sequence[float], sweep_steps: int, run_steps: int) -> str | None:
    """A note when the long run (``train.steps``) is ``LONGER_RUN`` x the sweep's steps or more: the rung below
    the picked ``lr`` to run at that length too (:func:`rung_below`). Of the 20 picks of docs/sweeps.md run 1.5x
    to 20x longer, 10 walked off, overfit or diverged there on some seed (6 of the 8 whose shorter lr ran long
    held a rung down, 2 two rungs) and none wanted a longer lr; the sweep's own dev curve did not tell which."""
    if run_steps < LONGER_RUN * sweep_steps:
        return None
    return (f"note: train.steps ({run_steps}) is {run_steps / sweep_steps:.3g}x the sweep's {sweep_steps} steps; "
            f"of 20 picks run longer in docs/sweeps.md, 10 failed there on some seed and none wanted a longer lr: "
            f"run lr={rung_below(lr, lrs):g} for the {run_steps} steps too (--confirm does, and picks), "
            f"or sweep at that length (--steps {run_steps})")


def write_picked(path: Path, raw: dict[str, Any], version: int, picked: str) -> None:
    """The swept config with the picked setting's lr (and eps), pinned to the config version the sweep ran with
    (its defaults): the long run's config."""
    chosen = {"version": version, **yaml.safe_load(yaml.safe_dump(raw))}
    for axis, value in setting_values(picked).items():
        set_dotted(chosen, f"optimizer.{axis}", float(value))
    path.write_text(yaml.safe_dump(chosen, sort_keys=False), encoding="utf-8")
