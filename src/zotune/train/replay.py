"""`zotune replay`: rebuild a ZO run's weights from the initial model and its trajectory alone.

No forward pass and no data: the run's ``config.yaml`` rebuilds model, scheme and optimizer;
the trajectory header's SHA-256 of the initial trainable state refuses a different base
model; every record redoes its step's update (:meth:`ZOOptimizer.replay`). The result is
bit-identical to the trained weights (or to any intermediate step with ``step``). They are
written as ``model.safetensors`` (the contract's name), with ``weights.safetensors`` a hard link
to it, so that ``zotune eval --weights`` and ``zotune export`` take the replay directory as they
take a run directory.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..errors import DataError
from ..trajectory import FILENAME as TRAJECTORY
from ..trajectory import read_trajectory, weights_sha256
from .rundir import RunDir, run_config
from .trainer import Session
from .weights import FILENAME as WEIGHTS
from .weights import save_weights

MODEL = "model.safetensors"


def run_replay(run_dir: str | Path, out: str | Path, step: int | None = None, overwrite: bool = False,
               log=print) -> dict[str, Any]:
    """``zotune replay``: rebuild a ZO run's weights after ``step`` steps (default: all) from its trajectory into
    ``out`` (``model.safetensors``, ``weights.safetensors``, ``summary.json``); returns the summary."""
    src = Path(run_dir)
    cfg = run_config(src)
    if not (src / TRAJECTORY).is_file():
        raise DataError(f"run {src} has no {TRAJECTORY} (first-order optimizers leave none)")
    if cfg.tuning.hybrid.zo_layers is not None:
        raise DataError(f"run {src} is hybrid ZO-FO: its first-order part is not in the trajectory")
    header, records = read_trajectory(src / TRAJECTORY)
    steps = len(records) if step is None else step
    if not 0 <= steps <= len(records):
        raise DataError(f"--step {step} is outside the trajectory, which has {len(records)} steps")
    recorded = header.get("device_type", "cpu")
    if "+" not in recorded:  # replay on the device type that drew the directions (one type)
        if recorded == "cuda" and not torch.cuda.is_available():
            raise DataError(f"run {src} was trained on {recorded}, whose random directions only {recorded} "
                            f"draws again; this machine has no {recorded} device")
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, device=recorded, device_map=None))
    run = RunDir(out, overwrite)
    session = Session.build(cfg, log, with_data=False)
    named = session.named_trainable()
    if weights_sha256(named) != header["initial_sha256"]:
        raise DataError(f"the initial weights of {cfg.model.name} ({cfg.model.dtype}, {cfg.tuning.scheme}) here differ "
                        f"from those the trajectory of {src} started from (SHA-256 mismatch): not replaying")
    opt, _, _ = session.optimizers(log)
    t0 = time.perf_counter()
    for record in tqdm(records[:steps], desc="replay", unit="step", disable=not sys.stderr.isatty()):
        try:
            opt.replay(record)
        except ValueError as err:  # e.g. a config.yaml edited after the run (another seed)
            raise DataError(f"cannot replay {src}: {err}") from None
    opt.flush_update()  # the fused update (model.offload) keeps the last step's layers pending
    wall = time.perf_counter() - t0
    run.write_yaml("config.yaml", cfg.to_dict())
    save_weights(run.file(MODEL), named)
    run.file(WEIGHTS).unlink(missing_ok=True)
    try:
        os.link(run.file(MODEL), run.file(WEIGHTS))
    except OSError:  # a filesystem without hard links
        shutil.copyfile(run.file(MODEL), run.file(WEIGHTS))
    summary = {"replayed_steps": steps, "trajectory_steps": len(records), "replay_wall_s": round(wall, 2),
               "s_per_step": round(wall / max(steps, 1), 4), "weights_sha256": weights_sha256(named),
               "source_run": str(src)}
    run.write_json("summary.json", summary)
    log(f"replayed {steps} of {len(records)} steps in {wall:.1f} s, no forward pass: {run.file(MODEL)}")
    return summary
