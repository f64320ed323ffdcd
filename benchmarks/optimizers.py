"""Every optimizer on the default model and task at an equal forward-pass budget.

Each optimizer runs as its own ``zotune train`` process (so peak memory is its own), with as
many steps as its forward passes per step allow within ``--budget`` (ZO-SGD: 2 per step,
ZO-SGD-Cons: 5, ForwardGrad: 1 JVP forward, SGD/AdamW: 1 forward + backward). Prints one
table: test accuracy (zero-shot alongside), final training loss, steps, forward passes, wall
time, peak RSS. Run directories stay under ``--out`` for inspection.

    .venv/bin/python benchmarks/optimizers.py [--budget 160] [--eval-examples 500]
    .venv/bin/python benchmarks/optimizers.py --only ZOSGDSign --lr ZOSGDSign=1e-6   # another lr

Cells already finished under ``--out`` with the same config are not run again (``--rerun``
forces it), so an interrupted benchmark resumes and a finished one just prints its table.

The zero-shot accuracy (the same for every optimizer: same model, same test examples) is
measured once, in the first run (a reused cell may carry it instead).

The learning rates below are starting points (ZO-SGD's is the demo's), not tuned per method:
treat the table as a like-for-like run at these settings, not as each method's best.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from _cells import train_cell

CONFIG = "configs/demo.yaml"

# name -> (lr, forwards per step, extra overrides)
OPTIMIZERS: dict[str, tuple[float, int, list[str]]] = {
    "ZOSGD": (3e-5, 2, []),
    "ZOSGDSign": (5e-5, 2, []),
    "ZOSGDMomentum": (5e-6, 2, []),
    "ZOSGDConservative": (3e-5, 5, []),
    "ZOAdam": (1e-4, 2, []),
    "ForwardGrad": (3e-5, 1, []),
    "JaguarSignSGD": (1e-5, 2, []),
    "ZOMuon": (1e-4, 2, ["optimizer.options={plain_lr: 2.5e-6}"]),
    "SGD": (1e-3, 1, []),
    "AdamW": (1e-5, 1, []),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=int, default=160, help="forward passes per optimizer")
    parser.add_argument("--eval-examples", type=int, default=500)
    parser.add_argument("--out", default="runs/bench-optimizers")
    parser.add_argument("--only", default="", help="comma-separated subset of optimizers")
    parser.add_argument("--lr", default="", metavar="NAME=LR,...", help="learning rates other than the table's")
    parser.add_argument("--rerun", action="store_true", help="run again the cells already finished under --out")
    args = parser.parse_args()
    names = [n for n in OPTIMIZERS if not args.only or n in args.only.split(",")]
    lrs = {name: float(lr) for name, lr in (item.split("=") for item in args.lr.split(",") if item)}
    rows = []
    zero_shot = None
    for i, name in enumerate(names):
        lr, per_step, extra = OPTIMIZERS[name]
        lr = lrs.get(name, lr)
        steps = max(1, args.budget // per_step)
        out = Path(args.out) / (f"{name}-lr{lr:g}" if name in lrs else name)
        overrides = [
            f"optimizer.name={name}", f"optimizer.lr={lr}", f"train.steps={steps}",
            "train.eval_every=0", f"train.log_every={max(1, steps // 10)}",
            f"eval.max_examples={args.eval_examples}", f"eval.zero_shot={'true' if i == 0 else 'false'}", *extra,
        ]
        print(f"{name}: {steps} steps ...", file=sys.stderr, flush=True)
        summary = train_cell(out, overrides, CONFIG, rerun=args.rerun)
        if isinstance(summary, str):
            rows.append((name, lr, summary))
            continue
        if "eval_zero_shot" in summary and zero_shot is None:
            zero_shot = summary["eval_zero_shot"]["accuracy"]
        rows.append((name, lr, summary, summary["last_loss"]))
    print(f"zero-shot test accuracy: {zero_shot if zero_shot is None else f'{zero_shot:.3f}'}"
          f" ({args.eval_examples} examples), budget {args.budget} forward passes\n")
    print("| optimizer | lr | steps | forward passes | test acc | last loss | wall s | peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        if isinstance(row[2], str):
            print(f"| {row[0]} | {row[1]:.0e} | {row[2]} | | | | | |")
            continue
        name, lr, s, loss = row
        print(f"| {name} | {lr:.0e} | {s['steps']} | {s['forward_passes']} | {s['eval']['accuracy']:.3f} "
              f"| {loss:.4f} | {s['train_wall_s']:.0f} | {s['peak_rss_mb']:.0f} |")


if __name__ == "__main__":
    main()
