"""ZOSGD and FO-AdamW under every tuning scheme, at an equal forward-pass budget.

Each cell is its own ``zotune train`` process on the default model and task (the demo's
config): trainable parameters, test accuracy after the budget, seconds per step and peak RSS.
ZO-SGD takes 2 forward passes per step, AdamW 1 (plus its backward). Learning rates are the
per-scheme defaults (MeZO), except full-parameter ZO-SGD, which uses the demo's 3e-5 (MeZO's
1e-6 is sized for 13B models and thousands of steps).

    .venv/bin/python benchmarks/schemes.py [--budget 80] [--eval-examples 200] [--rerun]

Cells already finished under ``--out`` with the same config are reused (``--rerun`` runs them
again).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from _cells import train_cell

SCHEMES = ("full", "lora", "prefix", "prompt")
OPTIMIZERS = {"ZOSGD": 2, "AdamW": 1}  # name -> forward passes per step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=int, default=80, help="forward passes per cell")
    parser.add_argument("--eval-examples", type=int, default=200)
    parser.add_argument("--out", default="runs/bench-schemes")
    parser.add_argument("--schemes", default=",".join(SCHEMES))
    parser.add_argument("--rerun", action="store_true", help="run again the cells already finished under --out")
    args = parser.parse_args()
    rows = []
    for scheme in args.schemes.split(","):
        for name, per_step in OPTIMIZERS.items():
            steps = max(1, args.budget // per_step)
            lr = ["optimizer.lr=3e-5"] if (scheme, name) == ("full", "ZOSGD") else ["optimizer.lr=null", "optimizer.eps=null"]
            print(f"{scheme} / {name}: {steps} steps ...", file=sys.stderr, flush=True)
            summary = train_cell(Path(args.out) / f"{scheme}-{name}", [
                f"tuning.scheme={scheme}", f"optimizer.name={name}", *lr, f"train.steps={steps}",
                "train.eval_every=0", f"train.log_every={max(1, steps // 10)}",
                f"eval.max_examples={args.eval_examples}", "eval.zero_shot=false"], rerun=args.rerun)
            rows.append((scheme, name, summary))
    print(f"\nbudget {args.budget} forward passes per cell, {args.eval_examples} test examples\n")
    print("| scheme | optimizer | trainable params | lr | steps | test acc | s/step | peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|")
    for scheme, name, s in rows:
        if isinstance(s, str):
            print(f"| {scheme} | {name} | {s} | | | | | |")
            continue
        print(f"| {scheme} | {name} | {s['trainable_params']:,} | {s['lr']:g} | {s['steps']} | "
              f"{s['eval']['accuracy']:.3f} | {s['s_per_step']:.2f} | {s['peak_rss_mb']:.0f} |")


if __name__ == "__main__":
    main()
