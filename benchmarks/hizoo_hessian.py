"""HiZOO's Hessian estimate ``D`` along a run, rebuilt from its trajectory (no forward pass): how far it has
spread, how many coordinates sit at ``hessian_floor``, and ``mean(1/D)``, the factor by which HiZOO's expected
step ``lr D^-1 grad`` exceeds ZO-SGD's on an average coordinate.

    .venv/bin/python benchmarks/hizoo_hessian.py \\
        "docs/bench/fewer-forwards/cells/optimizer=HiZOO,scheme=full,seed=1" --steps 100,200,300,350,357

The run directory needs ``config.yaml`` and ``trajectory.bin`` (an archived grid cell has both).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from zotune.train.rundir import run_config
from zotune.train.trainer import Session
from zotune.trajectory import read_trajectory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a HiZOO run directory")
    parser.add_argument("--steps", default="100,200,300", help="the steps after which to read D, comma-separated")
    args = parser.parse_args()
    cfg = run_config(args.run)
    if cfg.optimizer.name != "HiZOO":
        raise SystemExit(f"{args.run} is a {cfg.optimizer.name} run, not HiZOO")
    _, records = read_trajectory(args.run / "trajectory.bin")
    session = Session.build(cfg, lambda *a: None, with_data=False)
    opt, _, _ = session.optimizers(lambda *a: None)
    sample = torch.Generator().manual_seed(0)
    print("| after step | at the floor | D quantiles 0.1% / 1% / 50% / 99% / 99.9% | min D | max D | mean 1/D |")
    print("|---:|---:|---|---:|---:|---:|")
    done = 0
    for upto in sorted(int(s) for s in args.steps.split(",")):
        for record in records[done:min(upto, len(records))]:
            opt.replay(record)
        done = upto
        d = torch.cat([opt.hessian(p).view(-1) for g in opt.param_groups for p in g["params"] if g["lr"] != 0])
        picked = d[torch.randperm(d.numel(), generator=sample)[:1_000_000]]
        q = torch.quantile(picked, torch.tensor([0.001, 0.01, 0.5, 0.99, 0.999])).tolist()
        floor = (d <= opt.hessian_floor * (1 + 1e-4)).float().mean().item()
        print(f"| {upto} | {floor:.2%} | {' / '.join(f'{x:.3g}' for x in q)} | {d.min().item():.3g} | "
              f"{d.max().item():.3g} | {d.reciprocal().mean().item():.2f} |", flush=True)


if __name__ == "__main__":
    main()
