"""Resume a zeroth-order run from its trajectory: past its checkpoint, or with no checkpoint left.

A checkpoint of the default model is 540 MB and is removed when the run ends; ``trajectory.bin``
is a few kB per hundred steps. A run directory that kept only ``config.yaml``,
``metrics.jsonl`` and ``trajectory.bin`` (copied off a machine that is gone, or archived by
``zotune bench --archive``) still resumes bit for bit: replaying the records rebuilds the
weights and the optimizer state with no forward pass (:meth:`ZOOptimizer.replay`, as
``zotune replay`` does), the data order and the lr schedule are functions of the step, and the
loop's :class:`Progress` is read back from ``metrics.jsonl`` (forward passes, wall time, dev
evaluations) and from the records (losses). The best-on-dev weights (``train.keep_best``) are
written again when the replay passes their step. The zero-shot evaluation, which neither file
keeps, runs again on the initial weights.

A run killed between two checkpoints goes on the same way from its newest checkpoint: the
records past it are replayed instead of their steps being run again (the zero-shot evaluation
is the checkpoint's).

The resume point is the last step that ``metrics.jsonl`` logged (every ``train.log_every``
steps) and the trajectory holds; records after it are cut off and their steps run again.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import DataError
from ..optim.base import StepRecord, ZOOptimizer
from ..trajectory import FILENAME as TRAJECTORY
from ..trajectory import read_trajectory
from .checkpoint import Checkpoint, Progress
from .rundir import read_metrics
from .weights import save_weights


@dataclass
class TrajectoryResume:
    """Where a run directory's trajectory and metrics let it go on: the loop's progress at ``progress.step``
    and the records that rebuild its weights from ``checkpoint`` (None: from the initial weights)."""

    path: Path
    progress: Progress
    records: list[StepRecord]  # the steps to replay, from the checkpoint's step (or 0) to ``progress.step``
    best_step: int | None  # the replayed step whose weights are the best on dev so far (train.keep_best)
    checkpoint: Checkpoint | None = None

    @classmethod
    def find(cls, run_dir: Path, metric: str, keep_best: bool,
             checkpoint: Checkpoint | None = None) -> TrajectoryResume | None:
        """The resume point of ``run_dir``, past ``checkpoint`` if given (None: no trajectory, or no logged step
        it holds past the checkpoint)."""
        path = run_dir / TRAJECTORY
        start = checkpoint.progress.step if checkpoint else 0
        if not path.is_file() or (checkpoint and checkpoint.trajectory_records != start):
            return None
        _, records = read_trajectory(path)
        logged = [m for m in read_metrics(run_dir / "metrics.jsonl") if m["step"] <= len(records)]
        if not logged or logged[-1]["step"] <= start:
            return None
        last = logged[-1]
        step = last["step"]
        records = records[start:step]
        losses = [float(torch.tensor(r.loss)) for r in records]  # as the step returned it (ZOOptimizer.step)
        losses = (checkpoint.progress.losses if checkpoint else []) + losses
        try:
            dev = [(m["step"], float(m["dev"][metric])) for m in logged if "dev" in m]
            progress = Progress(step=step, forwards=int(last["forward_passes"]), losses=losses, dev=dev,
                                non_finite=_trailing_non_finite(losses), wall_s=float(last.get("wall_s", 0.0)),
                                eval_s=float(last.get("eval_s", 0.0)),
                                zero_shot=checkpoint.progress.zero_shot if checkpoint else None)
        except (KeyError, TypeError, ValueError) as err:
            raise DataError(f"cannot resume {run_dir} from its trajectory: metrics.jsonl lacks {err} at step "
                            f"{last['step']}; pass --overwrite to start over") from None
        best = max(dev, key=lambda point: (point[1], -point[0]))[0] if keep_best and dev else None
        return cls(path, progress, records, best if best is not None and best > start else None, checkpoint)

    @torch.no_grad()
    def restore(self, opt: ZOOptimizer, named: Callable[[], list[tuple[str, torch.nn.Parameter]]],
                best_weights: Path | None, log: Callable[[str], Any]) -> None:
        """Replay the records into ``opt`` and its parameters (``named()``: the trainable ones; restored from the
        checkpoint, if any), writing the best-on-dev weights to ``best_weights`` when the replay passes their step."""
        t0 = time.perf_counter()
        start = self.progress.step - len(self.records)
        for done, record in enumerate(self.records, start=start + 1):
            try:
                opt.replay(record)
            except ValueError as err:
                raise DataError(f"cannot resume {self.path.parent} from its trajectory: {err}; "
                                "pass --overwrite to start over") from None
            if best_weights is not None and done == self.best_step:
                opt.flush_update()
                save_weights(best_weights, named())
        opt.flush_update()
        origin = (f"{self.checkpoint.path} (step {start}) and {self.path.name}'s steps {start + 1}-{self.progress.step}"
                  if self.checkpoint else f"{self.path} (no checkpoint left)")
        log(f"resuming at step {self.progress.step} by replaying {origin}: "
            f"{time.perf_counter() - t0:.1f} s, no forward pass")


def _trailing_non_finite(losses: list[float]) -> int:
    """How many of the last losses in a row are NaN/inf (skipped steps)."""
    count = 0
    for loss in reversed(losses):
        if math.isfinite(loss):
            break
        count += 1
    return count
