"""Peak memory of a resumed run against the same run uninterrupted. A resume reads the optimizer state
from its checkpoint and must then hold it once, as the live run does: for full ZO-Adam that state is two
moments of the model's size, so a second copy is a model and a half more memory.

    .venv/bin/python benchmarks/resume_memory.py                                    # ZO-Adam, full fine-tuning
    .venv/bin/python benchmarks/resume_memory.py optimizer.name=ZOSGDMomentum       # another stateful optimizer

Three ``zotune train`` runs of the default model, each in a subprocess (so each peak RSS is its own): the
run uninterrupted for ``--steps`` steps; the same run stopped by SIGTERM after its first step (it finishes
the step, checkpoints and exits); that one resumed to the end. The resumed run must write the
uninterrupted one's weights, byte for byte.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from zotune.train.checkpoint import file_sha256

RUNS = Path("runs/resume-memory")
TRAIN = ["task.name=rotten_tomatoes", "optimizer.name=ZOAdam", "tuning.scheme=full", "eval.zero_shot=false",
         "eval.max_examples=32", "train.batch_size=16", "train.max_length=40", "train.log_every=1",
         "train.checkpoint_every=1"]


def command(out: Path, steps: int, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "zotune", "train", "--out", str(out), *TRAIN, f"train.steps={steps}", *extra]


def finish(cmd: list[str], out: Path) -> dict:
    """Run ``cmd`` to the end; the run's summary."""
    print("$", " ".join(cmd[1:]), flush=True)
    proc = subprocess.run(cmd, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        sys.exit(f"the run failed ({proc.returncode}):\n{proc.stdout[-3000:]}")
    return json.loads((out / "summary.json").read_text())


def interrupt(cmd: list[str], out: Path) -> None:
    """Run ``cmd`` until its first step is logged, then SIGTERM it and wait for its checkpoint."""
    print("$", " ".join(cmd[1:]), "  (SIGTERM after its first step)", flush=True)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = out / "metrics.jsonl"
    while proc.poll() is None and not (metrics.is_file() and '"step"' in metrics.read_text()):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    proc.wait()
    if not any((out / "checkpoints").glob("step-*")):
        sys.exit(f"the interrupted run left no checkpoint in {out} (exit {proc.returncode})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. optimizer.name=ZOSGDMomentum")
    args = parser.parse_args()
    whole, cut = RUNS / "uninterrupted", RUNS / "resumed"
    for out in (whole, cut):
        shutil.rmtree(out, ignore_errors=True)
    uninterrupted = finish(command(whole, args.steps, args.overrides), whole)
    interrupt(command(cut, args.steps, args.overrides), cut)
    resumed = finish(command(cut, args.steps, args.overrides), cut)
    same = file_sha256(whole / "weights.safetensors") == file_sha256(cut / "weights.safetensors")
    name = next((o.split("=", 1)[1] for o in [*TRAIN, *args.overrides][::-1] if o.startswith("optimizer.name=")))
    print(f"\nSmolLM2-135M, float32, {name}, full fine-tuning, {args.steps} steps, a checkpoint every step, "
          f"{torch.get_num_threads()} threads")
    print("| run | peak RSS (MB) |")
    print("|---|---:|")
    print(f"| uninterrupted | {uninterrupted['peak_rss_mb']:,.0f} |")
    print(f"| resumed from its step-1 checkpoint | {resumed['peak_rss_mb']:,.0f} |")
    print(f"resumed / uninterrupted: {resumed['peak_rss_mb'] / uninterrupted['peak_rss_mb']:.2f}x; "
          f"the same weights: {'yes' if same else 'NO'}")
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()
