"""Which dev score tells the better lr at a long run's length? The table of docs/sweeps.md.

Each learning-rate grid of issue 24 (``docs/bench/*-lr``) holds a sweep's pick and a shorter lr, both run
for the fewer-forwards grid's 1,350 forward passes with 15 dev evaluations. For each pair (seed 0, and all
three seeds where both settings have them) this prints test accuracy beside three scores of the same dev
records: the best dev score (the short sweep's rule), the late dev score (the mean of the last half of the
evaluations: ``zotune sweep --confirm``'s rule) and the fall from one to the other (a walk-off), each
averaged over the seeds, and which lr each rule picks (``zotune.bench.sweep``'s own functions):

    .venv/bin/python benchmarks/late_dev.py
"""

from __future__ import annotations

import argparse
from pathlib import Path

from zotune.bench.sweep import SweepCell, confirm_pick, late_dev, pick, read_cell, setting_fall

# grid under docs/bench -> (the configuration, the sweep's pick, a rung below)
PAIRS = {
    "zosgd-lora-fa-lr": ("ZOSGD LoRA-FA", "lr=0.03", "lr=0.01"),
    "fzoo-lora-fa-lr": ("FZOO LoRA-FA", "lr=0.1", "lr=0.03"),
    "sparse-mezo-lora-fa-lr": ("Sparse-MeZO LoRA-FA", "lr=0.1", "lr=0.03"),
    "zomuon-lora-fa-lr": ("ZO-Muon LoRA-FA", "lr=0.01", "lr=0.003"),
    "jaguar-lora-fa-lr": ("JAGUAR LoRA-FA", "lr=0.01", "lr=0.003"),
    "jaguar-full-lr": ("JAGUAR full", "lr=0.0001", "lr=3e-05"),
    "lozo-full-lr": ("LOZO full", "lr=0.0001", "lr=3e-05"),
    "hizoo-lora-fa-lr": ("HiZOO LoRA-FA", "lr=0.03", "lr=0.01"),  # run after the rules were set: out of sample
    "zomuon-subspace-full-lr": ("ZOMuonSubspace full", "lr=0.3", "lr=0.1"),  # out of sample too
    "hizoo-full-lr": ("HiZOO full", "lr=0.0001", "lr=3e-05"),  # out of sample too
}


def mean(values: list[float]) -> float:
    """The mean of a setting's values over its seeds."""
    return sum(values) / len(values)


def row(name: str, seeds: list[int], runs: dict[str, list[SweepCell]]) -> str:
    """One markdown row: the pair's test, best dev, late dev and dev fall (pick / lower), and each rule's pick."""
    first, lower = runs

    def both(score) -> str:
        return " / ".join(f"{score(runs[s]):.3f}" for s in (first, lower))

    cells = runs[first] + runs[lower]
    picks = f"{pick(cells)}, {confirm_pick(cells)}"
    return (f"| {name}, {first[3:]} / {lower[3:]} | {', '.join(map(str, seeds))} "
            f"| {both(lambda cs: mean([c.test for c in cs]))} | {both(lambda cs: mean([c.best[0] for c in cs]))} "
            f"| {both(lambda cs: mean([late_dev(c) for c in cs]))} | {both(setting_fall)} | {picks} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("docs/bench"), help="where the lr grids are archived")
    args = parser.parse_args()
    print("| pair (pick / a rung below) | seeds | test | best dev | late dev | dev fall | picked by best, by late |")
    print("|---|---|---|---|---|---|---|")
    for grid, (name, first, lower) in PAIRS.items():
        cells = args.root / grid / "cells"
        for seeds in ([0], [0, 1, 2]):
            paths = {s: [cells / f"{s},seed={k}" for k in seeds] for s in (first, lower)}
            if not all((p / "summary.json").is_file() for ps in paths.values() for p in ps):
                continue
            print(row(name, seeds, {s: [read_cell(p) for p in ps] for s, ps in paths.items()}))


if __name__ == "__main__":
    main()
