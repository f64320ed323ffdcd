"""Zero-shot, in-context learning and linear probing on every task whose data is reachable here.

Each cell is a normal ``zotune eval`` (``eval.baseline=...``) on the default model, run in this
process; run directories stay under ``--out``. Prints a markdown table (test metric of each
task: accuracy, or SQuAD F1 for generation tasks; "-" where a baseline does not apply, e.g.
linear probing of a generation task).

    .venv/bin/python benchmarks/baselines.py [--examples 200] [--shots 4] [--tasks a,b]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from zotune.config import load_config
from zotune.errors import ZotuneError
from zotune.tasks import list_tasks
from zotune.train.trainer import run_eval

BASELINES = ("zero_shot", "icl", "linear_probe")


def offline_tasks() -> list[str]:
    """Tasks whose data comes from a registry package (reachable without the HF hub)."""
    return [t["name"] for t in list_tasks() if "HF hub" not in t["source"]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=200, help="test examples per task")
    parser.add_argument("--shots", type=int, default=4, help="ICL demonstrations")
    parser.add_argument("--icl-max-length", type=int, default=512)
    parser.add_argument("--tasks", default="", help="comma-separated (default: every offline task)")
    parser.add_argument("--out", default="runs/bench-baselines")
    args = parser.parse_args()
    tasks = args.tasks.split(",") if args.tasks else offline_tasks()
    rows = []
    for task in tasks:
        cells = {}
        for baseline in BASELINES:
            extra = [f"eval.icl_shots={args.shots}", f"eval.max_length={args.icl_max_length}"] if baseline == "icl" else []
            cfg = load_config(None, [f"task.name={task}", f"eval.baseline={baseline}", f"eval.max_examples={args.examples}",
                                     "eval.batch_size=16", *extra])
            t0 = time.perf_counter()
            try:
                summary = run_eval(cfg, Path(args.out) / task / baseline, overwrite=True, log=lambda *_: None)
            except ZotuneError as err:
                cells[baseline] = "-"
                print(f"{task} {baseline}: {err}", file=sys.stderr, flush=True)
                continue
            metric = "f1" if "f1" in summary["eval"] and "accuracy" not in summary["eval"] else "accuracy"
            cells[baseline] = f"{summary['eval'][metric]:.3f}"
            cells["metric"], cells["n"] = metric, summary["n_test"]
            print(f"{task} {baseline}: {metric} {cells[baseline]} ({summary['n_test']} examples, "
                  f"{time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
        rows.append((task, cells))
    print(f"\n| task | metric | test examples | zero-shot | ICL ({args.shots} demos) | linear probe |")
    print("|---|---|---|---|---|---|")
    for task, c in rows:
        print(f"| {task} | {c.get('metric', '-')} | {c.get('n', '-')} | {c['zero_shot']} | {c['icl']} | {c['linear_probe']} |")


if __name__ == "__main__":
    main()
