"""Convergence at budgets that mean something: ZO against first-order on rotten_tomatoes, k = 16.

Every run is an ordinary ``zotune train`` directory under ``--out`` (default
``runs/convergence/<run>``), checkpointed every 100 steps: the same command resumes a run that was
interrupted (another session, a kill) bit for bit, and skips a finished one. Dev accuracy
(32 sentences) every ``eval_every`` steps, test accuracy (500 sentences) every ``test_every``
steps and at the end. Baselines at the same data: zero-shot, ICL and linear
probing, each a ``zotune eval`` (ICL: 8 demonstrations, 512 tokens).

    .venv/bin/python benchmarks/convergence.py --runs zosgd-full-s0        # run (or resume) one run
    .venv/bin/python benchmarks/convergence.py --baselines                   # zero-shot, ICL, linear probe
    .venv/bin/python benchmarks/convergence.py --collect                     # results.csv + plots only

Run directories do not outlive a machine, and a 2,000-step run does not fit in one sitting: each
run's ``config.yaml``, ``metrics.jsonl`` and ``trajectory.bin`` (kB, no weights) are copied into
``docs/convergence/runs/<run>`` (with ``summary.json`` once it finishes) after it stops, and by
``--archive`` at any time (e.g. while it runs, before a machine goes). A run with no directory under
``--out`` starts from its archive: ``zotune train`` resumes a zeroth-order run from its trajectory
(bit for bit, no checkpoint needed), and a finished one is only collected, or extended (``zotune train
--extend``) when ``RUNS`` now gives it more steps than it ran.

    .venv/bin/python benchmarks/convergence.py --archive                     # snapshot every run into docs

``--collect`` writes ``docs/convergence/results.csv`` (one row per run and evaluation point:
task, optimizer, scheme, seed, step, forward_passes, wall_s (training time, evaluations excluded),
dev_accuracy, test_accuracy) and the plots ``accuracy_vs_forward_passes.png`` and
``accuracy_vs_wall_clock.png`` (test accuracy, mean +- std over seeds, baselines as lines), from
whatever runs exist, finished or not; rows of runs that have no directory here are kept from the
committed results.csv (run directories do not outlive a machine; results.csv does).
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import subprocess
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import yaml

from zotune.bench.benchdir import ARCHIVED_FILES
from zotune.train.rundir import read_metrics

BASE = [
    "model.name=smollm2-135m", "task.name=rotten_tomatoes", "train.batch_size=16", "train.max_length=40",
    "train.log_every=10", "train.eval_every=100", "train.test_every=250", "train.checkpoint_every=100",
    "eval.max_examples=500", "eval.batch_size=32",
]


@dataclass(frozen=True)
class Run:
    optimizer: str
    scheme: str  # tuning.scheme
    label: str  # the scheme column of results.csv and the plots' legend
    seed: int
    steps: int
    overrides: tuple[str, ...]
    task: str = "rotten_tomatoes"  # the plots show rotten_tomatoes; other tasks are rows of results.csv


# learning rates from the sweeps (docs/sweeps.md, benchmarks/sweeps.py)
RUNS: dict[str, Run] = {
    **{f"zosgd-full-s{s}": Run("ZOSGD", "full", "full", s, 2000, ("optimizer.lr=1e-4", "optimizer.eps=1e-3"))
       for s in (0, 1, 2)},
    # plain LoRA at its sweep pick diverges after ~150 steps (stopped at 260: docs/convergence.md)
    "zosgd-lora-s0": Run("ZOSGD", "lora", "LoRA (plain, stopped at 260)", 0, 2000,
                         ("tuning.lora.freeze_a=false", "optimizer.lr=3e-3", "optimizer.eps=1e-2")),
    **{f"zosgd-lorafa-s{s}": Run("ZOSGD", "lora", "LoRA-FA", s, 2000,
                                 ("tuning.lora.freeze_a=true", "optimizer.lr=3e-2", "optimizer.eps=1e-2"))
       for s in (0, 1, 2)},
    "zosgd-top2-s0": Run("ZOSGD", "top", "top 2", 0, 2000, ("tuning.top.layers=2", "optimizer.lr=1e-3", "optimizer.eps=1e-3")),
    "zosgd-top8-s0": Run("ZOSGD", "top", "top 8", 0, 2000, ("tuning.top.layers=8", "optimizer.lr=1e-3", "optimizer.eps=1e-3")),
    "zosgd-top2-lr1e-4-s0": Run("ZOSGD", "top", "top 2, lr 1e-4 (untuned)", 0, 2000,
                                ("tuning.top.layers=2", "optimizer.lr=1e-4", "optimizer.eps=1e-3")),
    # held-out sanity: the ZOSGD full recipe on a 7-way intent task (k = 16 per class: 112 train sentences).
    # At rotten_tomatoes' lr 1e-4 it diverges after ~120 steps (projected gradients 20-60, then hundreds;
    # stopped at 200); lr 3e-5, the sweep's next value down, is the run that holds
    "zosgd-full-intent-s0": Run("ZOSGD", "full", "full, lr 1e-4 (diverged; stopped at 200)", 0, 1000,
                                ("optimizer.lr=1e-4", "optimizer.eps=1e-3"), task="intent_recognition"),
    "zosgd-full-intent-lr3e-5-s0": Run("ZOSGD", "full", "full, lr 3e-5", 0, 1000, ("optimizer.lr=3e-5", "optimizer.eps=1e-3"),
                                       task="intent_recognition"),
    # does FZOO's step, divided by its probes' spread, carry its rotten_tomatoes lr to the 7-way task where ZOSGD's
    # lr diverged? Its default lr, 100 steps = 900 forward passes
    "fzoo-full-intent-s0": Run("FZOO", "full", "full, lr 3e-3 (rotten_tomatoes')", 0, 100,
                               ("optimizer.lr=3e-3", "optimizer.eps=1e-3", "train.eval_every=10", "train.test_every=25"),
                               task="intent_recognition"),
    # FZOO (issue 24): 8 one-sided Rademacher probes per step, 9 forwards; its sweep's pick (lr 3e-3, dev 0.812
    # at 450 forward passes; 1e-2 and 3e-2 do worse). 100 steps = 900 forward passes, dev every 10 steps
    **{f"fzoo-full-s{s}": Run("FZOO", "full", "full", s, 100, ("optimizer.lr=3e-3", "optimizer.eps=1e-3",
                                                                 "train.eval_every=10", "train.test_every=25"))
       for s in (0, 1, 2)},
    # issue 21's ">= 4,000 forward passes" for the best other ZO methods of the sweeps: FZOO at 450 steps (4,050
    # forward passes; dev every 20 steps = 180, test every 50) and Sparse-MeZO (dev 0.750, test 0.710 in its
    # sweep) at ZOSGD's 2,000 steps
    "fzoo-full-long-s0": Run("FZOO", "full", "full, 4,050 forward passes", 0, 450,
                             ("optimizer.lr=3e-3", "optimizer.eps=1e-3", "train.eval_every=20", "train.test_every=50")),
    # FZOO's step has a fixed length (normalised by its probes' spread): once it has fitted its 32 sentences
    # (training loss 0.000 from step 200) it walks at random, and fzoo-full-long-s0's test falls from 0.748 at
    # 2,250 forward passes to 0.694 at 4,050. A cosine schedule to 0 over 200 steps (1,800) anneals that walk
    **{f"fzoo-full-cosine-s{s}": Run("FZOO", "full", "full, cosine lr", s, 200,
                                     ("optimizer.lr=3e-3", "optimizer.eps=1e-3", "train.lr_schedule=cosine",
                                      "train.eval_every=20", "train.test_every=50")) for s in (0, 1, 2)},
    # FZOO on LoRA-FA: its sweep's pick (lr 1e-1) tested 0.800 after 900 forward passes, the best ZO figure so far;
    # the same 4,050 forward passes as fzoo-full-long
    **{f"fzoo-lorafa-s{s}": Run("FZOO", "lora", "LoRA-FA", s, 450,
                                ("tuning.lora.freeze_a=true", "optimizer.lr=1e-1", "optimizer.eps=1e-2",
                                 "train.eval_every=20", "train.test_every=50")) for s in (0, 1, 2)},
    # MeZO's OPT protocol: 1,000 training sentences drawn at random (200 dev), the same 500 test sentences; its
    # sweep (200 steps, docs/convergence.md) picks 1e-4 again. Its first run was lost with its machine at step 540
    "zosgd-full-n1000-s0": Run("ZOSGD", "full", "full, 1,000 sentences", 0, 2000,
                               ("task.split=random", "task.n_train=1000", "task.n_dev=200", "optimizer.lr=1e-4",
                                "optimizer.eps=1e-3", "train.eval_every=200", "train.test_every=500")),
    "sparse-mezo-full-s0": Run("SparseMeZO", "full", "full", 0, 2000, ("optimizer.lr=1e-4", "optimizer.eps=1e-3")),
    **{f"adamw-full-s{s}": Run("AdamW", "full", "full", s, 200, ("optimizer.lr=1e-5",)) for s in (0, 1, 2)},
    **{f"sgd-full-s{s}": Run("SGD", "full", "full", s, 200, ("optimizer.lr=1e-3",)) for s in (0, 1, 2)},
}
BASELINES = ("zero_shot", "icl", "linear_probe")
DOCS = Path("docs/convergence")
ARCHIVE = DOCS / "runs"
KEPT = ARCHIVED_FILES  # what resumes (or reports) a run: the files zotune bench --archive keeps of a cell


def zotune() -> str:
    return str(Path(sys.executable).with_name("zotune"))


def copy_kept(source: Path, dest: Path) -> bool:
    """Copy the ``KEPT`` files ``source`` has into ``dest``; whether it had any."""
    files = [source / f for f in KEPT if (source / f).is_file()]
    if files:
        dest.mkdir(parents=True, exist_ok=True)
        for f in files:
            shutil.copyfile(f, dest / f.name)
    return bool(files)


def archive(out: Path, names: list[str] | None = None) -> None:
    """Snapshot the runs under ``out`` into ``ARCHIVE`` (a run being written is read as far as it got: the resume
    cuts a torn record off)."""
    for name in names or list(RUNS):
        if copy_kept(out / name, ARCHIVE / name):
            print(f"{name}: archived in {ARCHIVE / name}", file=sys.stderr)


def run(name: str, out: Path) -> None:
    spec = RUNS[name]
    target = out / name
    if not (target / "config.yaml").is_file() and copy_kept(ARCHIVE / name, target):
        print(f"{name}: copied in from {ARCHIVE / name}", file=sys.stderr)
    extend = []
    if (target / "summary.json").is_file():
        done = yaml.safe_load((target / "config.yaml").read_text())["train"]["steps"]
        if done >= spec.steps:
            print(f"{name}: finished", file=sys.stderr)
            return
        extend = ["--extend"]  # RUNS gives it more steps than it ran: it goes on from its trajectory
        print(f"{name}: finished at {done} steps; extended to {spec.steps}", file=sys.stderr)
    cmd = [zotune(), "train", *extend, "--out", str(target), *BASE, f"optimizer.name={spec.optimizer}",
           f"tuning.scheme={spec.scheme}", f"seed={spec.seed}", f"train.steps={spec.steps}", f"task.name={spec.task}",
           *spec.overrides]
    print(f"{name}: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    try:
        subprocess.run(cmd, check=False)
    finally:  # also when stopped: the run goes on from the archive next time
        archive(out, [name])


def baselines(out: Path) -> None:
    for baseline in BASELINES:
        target = out / "baselines" / baseline
        if (target / "summary.json").is_file():
            continue
        extra = ["eval.icl_shots=8", "eval.max_length=512"] if baseline == "icl" else []
        subprocess.run([zotune(), "eval", "--out", str(target), "--overwrite", *BASE, f"eval.baseline={baseline}", *extra],
                       check=False)


def collect(out: Path) -> None:
    DOCS.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, spec in RUNS.items():
        run_dir = out / name if (out / name / "metrics.jsonl").is_file() else ARCHIVE / name
        path = run_dir / "metrics.jsonl"
        if not path.is_file():
            continue
        run_rows: dict[int, dict] = {}  # by step: one row per evaluation point

        def point(m: dict, test: float | str) -> dict:
            return {"task": spec.task, "optimizer": spec.optimizer, "scheme": spec.label, "seed": spec.seed,
                    "step": m["step"], "forward_passes": m["forward_passes"],
                    "wall_s": round(m["wall_s"] - m.get("eval_s", 0.0), 1),
                    "dev_accuracy": m.get("dev", {}).get("accuracy", ""), "test_accuracy": test}

        metrics = read_metrics(path)  # a run being written: up to its last whole line
        for m in metrics:
            if "dev" in m or "test" in m:
                run_rows[m["step"]] = point(m, m.get("test", {}).get("accuracy", ""))
        summary = run_dir / "summary.json"
        if summary.is_file():  # the final test evaluation, at the last step
            s = json.loads(summary.read_text())
            run_rows[metrics[-1]["step"]] = point(metrics[-1], s["eval"]["accuracy"])
            if "eval_zero_shot" in s:
                run_rows[0] = point({"step": 0, "forward_passes": 0, "wall_s": 0.0}, s["eval_zero_shot"]["accuracy"])
        rows += run_rows.values()
    rows += kept_rows({(r["task"], r["optimizer"], r["scheme"], r["seed"]) for r in rows})
    rows.sort(key=lambda r: (r["task"] != "rotten_tomatoes", r["task"], r["optimizer"], r["scheme"], r["seed"], r["step"]))
    with (DOCS / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["optimizer"])
        writer.writeheader()
        writer.writerows(rows)
    lines = json.loads((DOCS / "baselines.json").read_text()) if (DOCS / "baselines.json").is_file() else {}
    for baseline in BASELINES:
        summary = out / "baselines" / baseline / "summary.json"
        if summary.is_file():
            lines[baseline] = json.loads(summary.read_text())["eval"]["accuracy"]
    (DOCS / "baselines.json").write_text(json.dumps(lines, indent=2) + "\n")
    plot([r for r in rows if r["task"] == "rotten_tomatoes"], lines)
    print(test_table(rows))
    print(reach_table([r for r in rows if r["task"] == "rotten_tomatoes"]))
    print(f"{len(rows)} rows -> {DOCS / 'results.csv'}; baselines {lines}", file=sys.stderr)


def kept_rows(local: set[tuple]) -> list[dict]:
    """Rows of the committed results.csv for runs that have no directory here (run in an earlier session on
    another machine): results.csv is the durable record, run directories are not."""
    path = DOCS / "results.csv"
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        r["seed"], r["step"], r["forward_passes"] = int(r["seed"]), int(r["step"]), int(r["forward_passes"])
    return [r for r in rows if (r["task"], r["optimizer"], r["scheme"], r["seed"]) not in local]


def test_table(rows: list[dict]) -> str:
    """Markdown: test accuracy of every run (mean over seeds) at each step it was tested."""
    by_run: dict[tuple, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r["test_accuracy"] != "" and r["step"] > 0:
            by_run[(r["task"], r["optimizer"], r["scheme"])][r["step"]].append(float(r["test_accuracy"]))
    steps = sorted({s for by_step in by_run.values() for s in by_step})
    lines = [f"| task | optimizer | scheme | {' | '.join(map(str, steps))} |", "|---|---|---|" + "---:|" * len(steps)]
    for (task, optimizer, scheme), by_step in sorted(by_run.items()):
        cells = [f"{sum(v) / len(v):.3f}" + (f" ({len(v)})" if len(v) > 1 else "") if (v := by_step.get(s)) else ""
                 for s in steps]
        lines.append(f"| {task} | {optimizer} | {scheme} | {' | '.join(cells)} |")
    return "test accuracy by step (mean over seeds; (n): seeds)\n" + "\n".join(lines)


def reach_table(rows: list[dict], reference: tuple[str, str] = ("ZOSGD", "full"), levels: tuple[float, ...] = (0.70, 0.75, 0.80)) -> str:
    """Markdown: the forward passes each run took to first reach a dev accuracy, for the reference's final
    dev accuracy (its mean over seeds: issue 24's level) and fixed ``levels``: the mean over the seeds that
    reached it, and how many of the seeds did within their budget."""
    by_seed: dict[tuple, dict[int, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r["dev_accuracy"] != "":
            by_seed[(r["optimizer"], r["scheme"])][r["seed"]].append(r)
    finals = [float(max(runs, key=lambda r: r["step"])["dev_accuracy"]) for runs in by_seed.get(reference, {}).values()]
    if not finals:
        return ""
    all_levels = (sum(finals) / len(finals), *levels)
    lines = [f"forward passes to first reach a dev accuracy (mean over the seeds that reached it; (k/n): seeds); "
             f"{all_levels[0]:.3f} is {reference[0]} {reference[1]}'s final dev, mean of {len(finals)} seeds", "",
             f"| optimizer | scheme | budget | {' | '.join(f'dev >= {v:.3f}' for v in all_levels)} |",
             "|---|---|---:|" + "---:|" * len(all_levels)]
    for (optimizer, scheme), seeds in sorted(by_seed.items()):
        cells = []
        for level in all_levels:
            hits = [min((r["forward_passes"] for r in runs if float(r["dev_accuracy"]) >= level - 1e-9), default=None)
                    for runs in seeds.values()]
            reached = [h for h in hits if h is not None]
            cells.append(f"{sum(reached) / len(reached):,.0f} ({len(reached)}/{len(hits)})" if reached else f"- (0/{len(hits)})")
        budget = max(r["forward_passes"] for runs in seeds.values() for r in runs)
        lines.append(f"| {optimizer} | {scheme} | {budget:,} | {' | '.join(cells)} |")
    return "\n".join(lines)


def plot(rows: list[dict], lines: dict[str, float]) -> None:
    """Two panels, so that no colour repeats: full fine-tuning (every optimizer, first order too) on the left,
    the schemes that tune fewer parameters (LoRA, top layers) on the right with ZOSGD full's mean as their
    reference. Linear axes; mean +- std where there are several seeds; baselines as grey lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    curves: dict[tuple[str, str], dict[int, list[tuple[dict, float]]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r["test_accuracy"] != "":
            curves[(r["optimizer"], r["scheme"])][r["step"]].append((r, float(r["test_accuracy"])))
    panels = {"full fine-tuning": sorted(c for c in curves if c[1].startswith("full")),
              "fewer parameters tuned (ZOSGD full: the reference)":
                  sorted(c for c in curves if not c[1].startswith("full"))}
    reference = ("ZOSGD", "full")
    for x_key, fname, xlabel in (("forward_passes", "accuracy_vs_forward_passes.png", "forward passes (first order: steps)"),
                                 ("wall_s", "accuracy_vs_wall_clock.png", "training wall-clock (s), 2-core CPU")):
        fig, axes = plt.subplots(1, 2, figsize=(13, 6), sharey=True)
        for ax, (title, keys) in zip(axes, panels.items()):
            borrowed = reference in curves and reference not in keys  # drawn grey, as the panel's yardstick
            if borrowed:
                keys = [reference, *keys]
            for (optimizer, scheme) in keys:
                by_step = curves[(optimizer, scheme)]
                steps = sorted(by_step)
                x = [np.mean([float(r[x_key]) for r, _ in by_step[s]]) for s in steps]
                y = np.array([np.mean([a for _, a in by_step[s]]) for s in steps])
                e = np.array([np.std([a for _, a in by_step[s]]) for s in steps])
                n = max(len(by_step[s]) for s in steps)
                grey = {"color": "gray", "linestyle": "--"} if borrowed and (optimizer, scheme) == reference else {}
                (line,) = ax.plot(x, y, marker="o", ms=3, label=f"{optimizer} {scheme}" + (f" ({n} seeds)" if n > 1 else ""),
                                  **grey)
                if n > 1:
                    ax.fill_between(x, y - e, y + e, color=line.get_color(), alpha=0.15)
            for (name, value), style in zip(lines.items(), (":", "--", "-.")):
                ax.axhline(value, color="gray", linestyle=style, lw=1, label=f"{name.replace('_', '-')} {value:.3f}")
            ax.set_xlim(left=0)
            ax.set_xlabel(xlabel)
            ax.set_title(title, fontsize=10)
            ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2)  # below, not over the curves
            ax.grid(alpha=0.3)
        axes[0].set_ylabel("test accuracy (500 sentences)")
        fig.suptitle("rotten_tomatoes, k = 16 per class, SmolLM2-135M: test accuracy, mean +- std over seeds")
        fig.tight_layout()
        fig.savefig(DOCS / fname, dpi=110)
        plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="", help=f"comma-separated, of: {', '.join(RUNS)}")
    parser.add_argument("--baselines", action="store_true")
    parser.add_argument("--collect", action="store_true")
    parser.add_argument("--archive", action="store_true", help=f"copy every run's {', '.join(KEPT)} into {ARCHIVE}")
    parser.add_argument("--out", default="runs/convergence", type=Path)
    args = parser.parse_args()
    for name in filter(None, args.runs.split(",")):
        if name not in RUNS:
            parser.error(f"unknown run {name!r}; choose from {', '.join(RUNS)}")
        run(name, args.out)
    if args.baselines:
        baselines(args.out)
    if args.archive:
        archive(args.out)
    if args.collect or args.runs or args.baselines:
        collect(args.out)


if __name__ == "__main__":
    main()
