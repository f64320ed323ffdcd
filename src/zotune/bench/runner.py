"""Run a grid: each cell as its own ``zotune train`` process, then the report. (``zotune memory``'s cells
run through the same :func:`run_cells`, each a ``zotune memory --cell`` process.)

One process per cell keeps its peak memory its own and contains a crash. Under ``--out DIR``:

    grid.yaml                the grid file as given
    configs/<cell>.yaml      the cell's train config (``zotune train --config``)
    cells/<cell>/            the cell's run directory, written by ``zotune train`` alone
    logs/<cell>.out, .err    the process's stdout and stderr
    logs/<cell>.json         its outcome: status (ok | failed), error (last stderr line), seconds
    results.csv, report.md, *.png

A cell is finished when ``cells/<cell>/summary.json`` exists and its ``config.yaml`` is the
grid's config for it: such cells are skipped when the same command runs again. A cell whose run
directory holds another config (the grid changed) runs again with ``--overwrite``, unless only its
budget grew (a zeroth-order cell, constant lr): then ``--extend`` goes on from its trajectory. An unfinished
cell runs ``zotune train`` without ``--overwrite`` first, so a train command that resumes its
own unfinished run does so; if train refuses the directory and names ``--overwrite``, the cell
starts over with it.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import IO, Any

from tqdm.auto import tqdm

from ..errors import ConfigError
from ..models.loader import resolve_device
from ..tasks import task_spec
from .benchdir import BenchDir, Outcome
from .grid import Cell, Grid, load_grid, whole_grid
from .report import write_report
from .results import configuration, result_of, seconds_left

ERROR_PREFIX = "zotune: error: "
say = functools.partial(print, flush=True)  # progress lines show up at once in a log file too


# -- one cell ------------------------------------------------------------------------------
class Launcher:
    """Starts the cells' ``zotune train`` processes, each in a session of its own (a Ctrl-C on
    the terminal reaches the bench only), and stops the running ones when the bench is
    interrupted: one SIGTERM each, on which ``zotune train`` finishes its step, writes a
    checkpoint and exits, so that the next ``zotune bench`` resumes the cell."""

    def __init__(self, jobs: int = 1):
        self.env = child_env(jobs)
        self.lock = threading.Lock()
        self.running: set[subprocess.Popen] = set()
        self.stopping = False

    def run(self, cmd: list[str], stdout: IO, stderr: IO) -> int:
        """Run ``cmd`` in a session of its own and return its exit status; KeyboardInterrupt instead once the bench
        is stopping."""
        with self.lock:
            if self.stopping:
                raise KeyboardInterrupt
            proc = subprocess.Popen(cmd, stdout=stdout, stderr=stderr, stdin=subprocess.DEVNULL, env=self.env,
                                    start_new_session=True)
            self.running.add(proc)
        try:
            return proc.wait()
        finally:
            with self.lock:
                self.running.discard(proc)

    def stop(self, log: Callable[[str], None]) -> None:
        """Start no further process; send each running one SIGTERM and wait for it to exit."""
        with self.lock:
            self.stopping = True
            procs = list(self.running)
        if procs:
            log(f"stopping {len(procs)} running cell(s): each finishes its step and writes a checkpoint ...")
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait()


def run_cell(cell: Cell, bench: BenchDir, launcher: Launcher) -> Outcome:
    """Run ``zotune train`` for one cell (see the module docstring for --overwrite) and record
    the outcome in ``logs/<cell>.json``."""
    state = bench.state(cell)
    bench.log(cell, "json").unlink(missing_ok=True)
    t0 = time.perf_counter()
    flags = {"stale": ["--overwrite"], "short": ["--extend"]}.get(state, [])
    returncode, error = _train(cell, bench, flags, launcher)
    if returncode != 0 and state in ("partial", "short") and "--overwrite" in error:  # train cannot go on with it
        returncode, error = _train(cell, bench, ["--overwrite"], launcher)
    ok = returncode == 0 and (bench.run_dir(cell) / "summary.json").is_file()
    if returncode == 0 and not ok:
        error = f"zotune {cell.command} exited 0 without writing summary.json"
    outcome = Outcome("ok" if ok else "failed", "" if ok else error, round(time.perf_counter() - t0, 2), returncode)
    bench.log(cell, "json").write_text(json.dumps(asdict(outcome), indent=2) + "\n", encoding="utf-8")
    return outcome


def _train(cell: Cell, bench: BenchDir, flags: list[str], launcher: Launcher) -> tuple[int, str]:
    """One ``zotune train`` process (a baseline cell: ``zotune eval``; a memory cell: ``zotune memory --cell``);
    (exit status, last line of its stderr)."""
    cmd = [sys.executable, "-m", "zotune", cell.command, *cell.args, "--config", str(bench.config(cell)),
           "--out", str(bench.run_dir(cell)), *flags]
    with open(bench.log(cell, "out"), "w") as out, open(bench.log(cell, "err"), "w") as err:
        returncode = launcher.run(cmd, out, err)
    lines = [line.strip() for line in bench.log(cell, "err").read_text(errors="replace").splitlines() if line.strip()]
    error = lines[-1].removeprefix(ERROR_PREFIX) if lines else ""
    if returncode < 0:
        hint = " (out of memory?)" if -returncode == signal.SIGKILL else ""
        error = f"killed by signal {-returncode}" + (f": {error}" if error else hint)
    return returncode, error or f"exit status {returncode}"


def child_env(jobs: int) -> dict[str, str]:
    """The cells' environment: unbuffered logs; with parallel jobs, the cores shared out
    (``OMP_NUM_THREADS``, unless set already)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if jobs > 1 and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))
    return env


# -- progress ------------------------------------------------------------------------------
class Progress:
    """A tqdm bar over cells with its ETA on a terminal; otherwise one plain line per cell
    started and finished, with the elapsed time and an ETA from the cells done so far."""

    def __init__(self, total: int, log: Callable[[str], None], interactive: bool | None = None):
        self.total, self.done, self.begun, self.log = total, 0, 0, log
        self.t0 = time.perf_counter()
        self.lock = threading.Lock()  # cells finish in worker threads
        interactive = sys.stderr.isatty() if interactive is None else interactive
        self.bar = tqdm(total=total, desc="bench", unit="cell", dynamic_ncols=True) if interactive else None

    def started(self, cell: Cell) -> None:
        """A cell starts: without a bar, one line ``[k/n] cell: N steps ...``."""
        with self.lock:
            self.begun += 1
            if self.bar is None:
                self.log(f"[{self.begun}/{self.total}] {cell.name}: {cell.cfg.train.steps} steps ...")

    def finished(self, cell: Cell, outcome: Outcome, note: str = "") -> None:
        """A cell ended: the bar moves on (a failure also gets a line), or one line with its outcome, the elapsed
        time and an ETA."""
        with self.lock:
            self._finished(cell, outcome, note)

    def _finished(self, cell: Cell, outcome: Outcome, note: str) -> None:
        self.done += 1
        what = f"ok in {outcome.seconds:.0f} s{note}" if outcome.status == "ok" else f"FAILED: {outcome.error}"
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(f"{cell.name}: {outcome.status}")
            if outcome.status != "ok":
                self.bar.write(f"{cell.name}: {what}")
            return
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / self.done * (self.total - self.done)
        self.log(f"[{self.done}/{self.total}] {cell.name}: {what} (elapsed {_duration(elapsed)}, ETA {_duration(eta)})")

    def close(self) -> None:
        """Close the bar, if there is one."""
        if self.bar is not None:
            self.bar.close()


def _duration(seconds: float) -> str:
    minutes, s = divmod(int(round(seconds)), 60)
    hours, m = divmod(minutes, 60)
    return f"{hours}h{m:02d}m" if hours else f"{m}m{s:02d}s"


def _metric_note(bench: BenchDir, cell: Cell) -> str:
    try:
        metrics = json.loads((bench.run_dir(cell) / "summary.json").read_text())["eval"]
    except (OSError, ValueError, KeyError):
        return ""
    return "".join(f", {k} {v:.3f}" for k, v in list(metrics.items())[:1])


# -- the grid ------------------------------------------------------------------------------
def run_cells(cells: list[Cell], bench: BenchDir, jobs: int = 1, log: Callable[[str], None] = say,
              interactive: bool | None = None) -> dict[str, Outcome]:
    """Run ``cells`` one at a time, or ``jobs`` processes at once; a failure does not stop the
    rest, an interrupt (Ctrl-C, SIGTERM) stops the running cells and starts no other."""
    launcher = Launcher(jobs)
    progress = Progress(len(cells), log, interactive)
    outcomes: dict[str, Outcome] = {}

    def one(cell: Cell) -> None:
        progress.started(cell)
        outcomes[cell.name] = run_cell(cell, bench, launcher)
        if not launcher.stopping:
            progress.finished(cell, outcomes[cell.name], _metric_note(bench, cell))

    try:
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            futures = [pool.submit(one, cell) for cell in cells]
            try:
                for future in futures:
                    future.result()
            except BaseException:  # interrupted: start no further cell, stop the running ones
                for future in futures:
                    future.cancel()
                launcher.stop(log)
                raise
    finally:
        progress.close()
    return outcomes


@contextlib.contextmanager
def _interrupts(time_limit: float | None, log: Callable[[str], None]) -> Iterator[None]:
    """SIGTERM, and ``time_limit`` seconds passing (``--time-limit``, by SIGALRM), stop the bench as Ctrl-C does (the
    running cells checkpoint, the rest wait). Neither relies on SIGINT, which a job started in the background
    (``nohup zotune bench ... &``) ignores."""
    if threading.current_thread() is not threading.main_thread():
        if time_limit:
            raise ConfigError("--time-limit works only when the bench runs in the main thread")
        yield
        return
    if time_limit and not hasattr(signal, "setitimer"):
        raise ConfigError("--time-limit needs SIGALRM, which this platform lacks")

    def interrupt(signum: int, frame: Any) -> None:
        if signum != signal.SIGTERM:
            log(f"--time-limit {time_limit:g} s reached")
        raise KeyboardInterrupt

    signals = [signal.SIGTERM, signal.SIGALRM] if time_limit else [signal.SIGTERM]
    previous = {s: signal.signal(s, interrupt) for s in signals}
    if time_limit:
        signal.setitimer(signal.ITIMER_REAL, time_limit)
    try:
        yield
    finally:
        if time_limit:
            signal.setitimer(signal.ITIMER_REAL, 0)
        for s, handler in previous.items():
            signal.signal(s, handler)


PLAN_HEADER = ("cell", "model", "task", "steps", "fwd/step", "forward passes", "state", "time left", "progress")


def plan(grid: Grid, bench: BenchDir, kept: BenchDir | None = None) -> list[tuple[tuple[str, ...], float | None]]:
    """The dry run's rows (:data:`PLAN_HEADER`), each with its cell's seconds left (:func:`seconds_left` on this
    machine's device; None: not known): every cell with its model, task, steps, forward passes, state, time left
    and progress (a finished cell's test score, an unfinished one's last step and dev score); with ``kept``
    (``--archive``), a cell that a real run would copy in from it shows as ``done (archived)``."""
    restorable = set(bench.restorable_from(kept, grid)) if kept is not None else set()
    sources = [kept if cell.name in restorable else bench for cell in grid.cells]
    results = [result_of(cell, source) for cell, source in zip(grid.cells, sources)]
    by_configuration: dict[tuple, list] = {}
    for result in results:
        by_configuration.setdefault(configuration(result.cell), []).append(result)
    rows = []
    for cell, source, result in zip(grid.cells, sources, results):
        state = source.state(cell)
        left = seconds_left(result, state, by_configuration[configuration(cell)], _device_here(cell))
        per_step = cell.forwards_per_step
        planned = cell.planned_forward_passes
        steps = f"eval ({cell.cfg.eval.baseline})" if cell.command == "eval" else str(cell.cfg.train.steps)
        rows.append(((cell.name, cell.cfg.model.name, task_spec(cell.cfg.task).name, steps,
                      "block-wise" if per_step is None else str(per_step), "?" if planned is None else str(planned),
                      f"{state} (archived)" if source is kept else state,
                      "-" if left == 0 else "?" if left is None else _about(left), result.progress(state)), left))
    return rows


def plan_rows(grid: Grid, bench: BenchDir, kept: BenchDir | None = None) -> list[tuple[str, ...]]:
    """The dry run's rows (:func:`plan`) without their seconds."""
    return [row for row, _ in plan(grid, bench, kept)]


def _device_here(cell: Cell) -> str:
    """The device the cell would run on here (``model.device`` resolved on this machine)."""
    try:
        return resolve_device(cell.cfg.model.device).type
    except ConfigError:  # asks for a device this machine lacks: no cell run here to go by
        return cell.cfg.model.device


def _about(seconds: float) -> str:
    """A time estimate to the minute: ``<1m``, ``45m``, ``3h05m``."""
    minutes = round(seconds / 60)
    return "<1m" if minutes < 1 else f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m"


def plan_lines(grid: Grid, bench: BenchDir, kept: BenchDir | None = None) -> list[str]:
    """The dry-run listing: a line about the grid, :func:`plan_rows` as a table (text left-aligned, numbers
    right-aligned), and the time the unfinished cells have left in all."""
    planned = plan(grid, bench, kept)
    rows = [PLAN_HEADER, *(row for row, _ in planned)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(PLAN_HEADER))]
    left = (0, len(PLAN_HEADER) - 1)
    given = f"; overrides: {' '.join(grid.overrides)}" if grid.overrides else ""
    lines = [f"grid {grid.path}: {len(grid.cells)} cells; budget: {grid.budget.describe()}{given}"]
    lines += ["  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
              for r in rows]
    to_run = [seconds for _, seconds in planned if seconds != 0]
    known = [seconds for seconds in to_run if seconds is not None]
    unknown = len(to_run) - len(known)
    if known:
        lines.append(f"time left: about {_about(sum(known))} for {len(known)} of the {len(to_run)} unfinished cells, "
                     "one at a time, at the pace of their configurations' cells run here so far"
                     + (f" ({unknown} with none to go by: '?')" if unknown else ""))
    elif to_run:
        lines.append(f"time left: not known until a cell of each configuration has run here ({unknown} to run)")
    return lines


def _archive(bench: BenchDir, kept: BenchDir | None, grid: Grid, log: Callable[[str], None]) -> None:
    """The report and the cells' records into ``--archive``, when given."""
    if kept is not None:
        done, going = bench.archive_into(kept, grid)
        log(f"archived the report, {len(done)} finished cells" + (f" and {len(going)} unfinished (to resume from "
            "their trajectories)" if going else "") + f" in {kept.root}")


def run_bench(grid_path: str | Path, out: str | Path, jobs: int = 1, dry_run: bool = False,
              log: Callable[[str], None] = say, interactive: bool | None = None,
              overrides: tuple[str, ...] | list[str] = (), report_only: bool = False,
              archive: str | Path | None = None, time_limit: float | None = None) -> int:
    """``zotune bench``: validate the grid, run the unfinished cells, write results.csv, report.md
    and plots. Returns the exit status: 0 when every cell is ok, 1 when some failed. ``report_only``: the
    report of the cells finished so far (the others "not run yet"; a grid run in pieces, or still running),
    nothing run. ``archive``: a directory (e.g. under docs/) whose finished cells are copied in first and
    which gets the report and every finished cell's record afterwards (:meth:`BenchDir.archive_into`):
    a grid run in pieces on machines whose disks do not last. The cells run seed by seed (every cell of the
    first seed before the second's), so that a run cut short has each configuration once. ``time_limit``: after
    that many seconds the bench stops as on Ctrl-C (running cells checkpoint, report and archive written). Overrides
    that only pick cells (``seed=2``: a piece of the grid) still write the whole grid's report (:func:`whole_grid`)."""
    if jobs < 1:
        raise ConfigError(f"--jobs must be >= 1, got {jobs}")
    if time_limit is not None and not time_limit > 0:
        raise ConfigError(f"--time-limit must be a positive number of seconds, got {time_limit:g}")
    grid = load_grid(grid_path, overrides)
    bench = BenchDir(out)
    kept = None
    if archive is not None:
        kept = BenchDir(archive)
        if kept.root.resolve() == bench.root.resolve():
            raise ConfigError(f"--archive must be another directory than --out ({bench.root})")
    if dry_run:
        for line in plan_lines(grid, bench, kept):
            log(line)
        return 0
    whole = whole_grid(grid)  # what the report covers: the grid file's cells, where the overrides only pick some
    if kept is not None:
        if restored := bench.restore_from(kept, whole):
            log(f"{len(restored)} cells copied in from {kept.root}")
    if report_only:
        if not (bench.root / "cells").is_dir():
            raise ConfigError(f"--out {bench.root} holds no bench run to report on")
        report = write_report(whole, bench)
        finished = sum(bench.state(c) == "done" for c in whole.cells)
        log(f"report of {finished} finished cells of {len(whole.cells)}: {report}")
        _archive(bench, kept, grid, log)
        return 0
    bench.prepare(grid)
    todo = sorted((cell for cell in grid.cells if bench.state(cell) != "done"), key=lambda cell: cell.cfg.seed)
    log(f"bench {grid.path}: {len(grid.cells)} cells, {len(grid.cells) - len(todo)} finished (skipped), "
        f"{len(todo)} to run{f', {jobs} at a time' if jobs > 1 and todo else ''}")
    try:
        with _interrupts(time_limit if todo else None, log):
            run_cells(todo, bench, jobs, log, interactive)
    except KeyboardInterrupt:
        write_report(whole, bench)  # of the cells finished so far
        _archive(bench, kept, grid, log)  # the cells stopped at a step: their trajectories go on next time
        raise KeyboardInterrupt(f"interrupted: the finished cells are kept in {bench.root}; run the same command "
                                "again to go on") from None
    report = write_report(whole, bench)
    failed = [c.name for c in grid.cells if (o := bench.outcome(c)) is None or o.status != "ok"]
    log(f"report: {report}")
    _archive(bench, kept, grid, log)
    if failed:
        log(f"{len(failed)} of {len(grid.cells)} cells failed (errors in {bench.root / 'results.csv'}; logs in "
            f"{bench.root / 'logs'}): {', '.join(failed)}")
        return 1
    return 0
