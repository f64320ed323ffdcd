"""Scale out on one machine: 1 process x 2 threads vs 2 processes x 1 thread, and a cost model.

Part 1 (measured, end to end): ``zotune train`` on the default model at the same global batch,

* ZO-SGD: 1 process x 2 threads; 2 processes x 1 thread, data parallel (each takes half the
  batch) and query parallel (each runs one of the two probes on the whole batch);
* FO-SGD: 1 process x 2 threads; 2 processes x 1 thread under DDP;

step time (``s_per_step``: training wall / steps, no evaluation in it), examples/s, and the bytes
one process hands to collectives per step, counted at the calls (``bytes_exchanged_per_step`` in
``summary.json``: the loss exchange's float64 payload for ZO; DDP's gradient buckets plus the
loss/stop scalars for FO).

Part 2 (measured, one process, one thread): the inputs of the cost model: a no-grad forward at
the local batch and half of it, a ZO-SGD step (``Z`` = step - 2 forwards: direction generation
and update, which every data-parallel worker repeats in full), an FO-SGD step (forward,
backward, update) at both batches, and the gradient bytes DDP all-reduces.

Part 3 (a model, not a measurement): predicted step time and efficiency at 8 and 64 workers on
10 and 100 Gb/s links, weak scaling (the local batch fixed) and strong scaling (the global
batch fixed), from part 2's figures; see docs/scaling.md for the formulas.

    .venv/bin/python benchmarks/scale_out.py [--model smollm2-135m] [--steps 20] [--batch-size 16]
        [--out runs/scale_out] [--skip-runs] [--cells 0,3]

Run it on an otherwise idle machine: with other jobs on the cores, a process with 2 OpenMP
threads waits for its descheduled thread at every parallel region and the comparison is lost.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

LINKS_GBPS = (10, 100)
WORKERS = (8, 64)
LATENCY_S = 50e-6  # one-way message latency assumed for TCP over either link
STRONG_GLOBAL_BATCH = 64


# -- part 1: end-to-end runs ------------------------------------------------------------------
@dataclasses.dataclass
class Cell:
    name: str
    optimizer: str
    nproc: int | None  # None: one process
    threads: int
    extra: tuple[str, ...] = ()


CELLS = [
    Cell("ZO-SGD  1 proc x 2 threads", "ZOSGD", None, 2),
    Cell("ZO-SGD  2 procs x 1 thread, data", "ZOSGD", 2, 1),
    Cell("ZO-SGD  2 procs x 1 thread, queries", "ZOSGD", 2, 1, ("train.parallel=queries",)),
    Cell("FO-SGD  1 proc x 2 threads", "SGD", None, 2),
    Cell("FO-SGD  2 procs x 1 thread, DDP", "SGD", 2, 1),
]


def run_cell(cell: Cell, out: Path, model: str, steps: int, batch: int) -> dict | str:
    """``zotune train`` for one cell; its summary.json, or the error line."""
    overrides = [f"model.name={model}", f"optimizer.name={cell.optimizer}", f"train.steps={steps}",
                 f"train.batch_size={batch}", "train.eval_every=0", "train.checkpoint_every=0",
                 "eval.zero_shot=false", "eval.max_examples=32", *cell.extra]
    nproc = ["--nproc", str(cell.nproc)] if cell.nproc else []
    cmd = [sys.executable, "-m", "zotune", "train", "--config", "configs/demo.yaml", *nproc,
           "--out", str(out), "--overwrite", *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(cell.threads)})
    if proc.returncode != 0:
        return "failed: " + (proc.stderr.strip().splitlines() or ["?"])[-1]
    return json.loads((out / "summary.json").read_text())


def print_runs(results: dict[str, dict | str], batch: int) -> None:
    print(f"\nend to end, global batch {batch} (measured)")
    print(f"{'cell':<38}{'s/step':>9}{'examples/s':>12}{'bytes/step/process':>20}")
    for name, r in results.items():
        if isinstance(r, str):
            print(f"{name:<38}{r}")
            continue
        sent = r.get("bytes_exchanged_per_step", 0)
        print(f"{name:<38}{r['s_per_step']:>9.3f}{batch / r['s_per_step']:>12.1f}{sent:>20,.0f}")


# -- part 2: cost-model inputs ----------------------------------------------------------------
@dataclasses.dataclass
class Inputs:
    batch: int
    forward: float  # s, no-grad forward at `batch`
    forward_half: float  # s, at batch // 2
    zo_step: float  # s, ZO-SGD step at `batch`
    fo_step: float  # s, FO-SGD step (forward, backward, update) at `batch`
    fo_step_half: float
    grad_bytes: int  # what DDP all-reduces per step (float32 gradients)
    zo_bytes: int = 4 * 8  # the loss exchange: f+, f-, shard size, stop flag (float64)

    @property
    def direction_s(self) -> float:
        """Z: a ZO step beyond its two forwards (regenerating z, the update); every worker pays it."""
        return max(0.0, self.zo_step - 2 * self.forward)

    def forward_at(self, b: float) -> float:
        """Forward time, linear in the batch through the two measurements."""
        return _linear(b, self.batch, self.forward, self.forward_half)

    def fo_at(self, b: float) -> float:
        return _linear(b, self.batch, self.fo_step, self.fo_step_half)


def _linear(b: float, full: int, at_full: float, at_half: float) -> float:
    slope = (at_full - at_half) / (full - full // 2)
    return max(at_full + slope * (b - full), 1e-6)


def median_time(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_inputs(model_name: str, batch: int, repeats: int) -> Inputs:
    import torch

    from zotune.config import load_config
    from zotune.train.trainer import Session

    torch.set_num_threads(1)
    cfg = load_config("configs/demo.yaml", [f"model.name={model_name}", "optimizer.lr=1e-12", f"train.batch_size={batch}"])
    session = Session.build(cfg, log=lambda *_: None)
    model, scorer, train = session.model, session.scorer, session.data.train
    batches = {b: scorer.encode(train[:b]) for b in (batch, batch // 2)}

    def forward(b: int) -> None:
        with torch.no_grad():
            scorer.loss(model, batches[b])

    zo = session.optimizers(log=lambda *_: None)[0]
    fo = torch.optim.SGD(session.trainable, lr=1e-12)

    def fo_step(b: int) -> None:
        fo.zero_grad(set_to_none=True)
        scorer.loss(model, batches[b]).backward()
        fo.step()

    return Inputs(
        batch=batch,
        forward=median_time(lambda: forward(batch), repeats),
        forward_half=median_time(lambda: forward(batch // 2), repeats),
        zo_step=median_time(lambda: zo.step(lambda: scorer.loss(model, batches[batch])), repeats),
        fo_step=median_time(lambda: fo_step(batch), repeats),
        fo_step_half=median_time(lambda: fo_step(batch // 2), repeats),
        grad_bytes=sum(p.numel() * 4 for p in session.trainable),
    )


# -- part 3: the cost model -------------------------------------------------------------------
def allreduce_s(n_bytes: float, workers: int, gbps: float) -> float:
    """Ring all-reduce: 2 (N-1) messages of n/N bytes each way per worker."""
    if workers == 1:
        return 0.0
    return 2 * (workers - 1) * (LATENCY_S + n_bytes / workers / (gbps * 1e9 / 8))


def zo_step_s(inp: Inputs, local_batch: float, workers: int, gbps: float) -> float:
    """Data-parallel ZO: two forwards on the local shard, the full Z, one tiny all-reduce
    (latency-bound: a recursive-doubling exchange of 32 bytes, log2 N rounds)."""
    exchange = 0.0 if workers == 1 else math.ceil(math.log2(workers)) * (LATENCY_S + inp.zo_bytes / (gbps * 1e9 / 8))
    return 2 * inp.forward_at(local_batch) + inp.direction_s + exchange


def fo_step_s(inp: Inputs, local_batch: float, workers: int, gbps: float, overlap: bool) -> float:
    """DDP: forward + backward + update on the local shard, then the gradient all-reduce
    (``overlap``: hidden behind the backward as far as it lasts, DDP's best case)."""
    compute, comm = inp.fo_at(local_batch), allreduce_s(inp.grad_bytes, workers, gbps)
    return max(compute, comm) if overlap else compute + comm


def print_model(inp: Inputs) -> None:
    print(f"\ncost-model inputs (measured, 1 process x 1 thread, batch {inp.batch})")
    print(f"  forward {inp.forward:.3f} s (batch {inp.batch // 2}: {inp.forward_half:.3f} s); ZO-SGD step "
          f"{inp.zo_step:.3f} s, of which Z = step - 2 forwards = {inp.direction_s:.3f} s; FO-SGD step "
          f"{inp.fo_step:.3f} s (batch {inp.batch // 2}: {inp.fo_step_half:.3f} s)")
    print(f"  bytes per step and worker handed to the collective: ZO {inp.zo_bytes} B, DDP {inp.grad_bytes / 1e6:.0f} MB "
          f"(ratio {inp.grad_bytes / inp.zo_bytes:.1e})")
    print(f"\nMODEL (not a measurement): efficiency = one worker's time for its share / N workers' step time, "
          f"{LATENCY_S * 1e6:.0f} us latency per message")
    print(f"{'scaling':<26}{'workers':>8}{'link':>9}{'ZO step s':>11}{'ZO eff':>8}{'DDP step s':>12}"
          f"{'DDP eff':>9}{'(overlap)':>10}")
    for label, local in (("weak, batch 16 / worker", lambda n: float(inp.batch)),
                         (f"strong, global batch {STRONG_GLOBAL_BATCH}", lambda n: STRONG_GLOBAL_BATCH / n)):
        for n in WORKERS:
            b = local(n)
            for gbps in LINKS_GBPS:
                zo_ideal = (2 * inp.forward_at(b * n) + inp.direction_s) / n if "strong" in label else zo_step_s(inp, b, 1, gbps)
                fo_ideal = inp.fo_at(b * n) / n if "strong" in label else inp.fo_at(b)
                zo, fo = zo_step_s(inp, b, n, gbps), fo_step_s(inp, b, n, gbps, False)
                fo_overlap = fo_step_s(inp, b, n, gbps, True)
                print(f"{label:<26}{n:>8}{gbps:>6}Gb/s{zo:>11.3f}{zo_ideal / zo:>8.0%}{fo:>12.3f}"
                      f"{fo_ideal / fo:>9.0%}{fo_ideal / fo_overlap:>10.0%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3, help="timings per cost-model input (median)")
    parser.add_argument("--out", type=Path, default=Path("runs/scale_out"))
    parser.add_argument("--skip-runs", action="store_true", help="part 2 and 3 only")
    parser.add_argument("--cells", metavar="I,J", help="run only these cells of part 1 (0-based), e.g. 0,3")
    args = parser.parse_args()
    if not args.skip_runs:
        results = {}
        chosen = {int(i) for i in args.cells.split(",")} if args.cells else set(range(len(CELLS)))
        for i, cell in enumerate(CELLS):
            if i not in chosen:
                continue
            results[cell.name] = run_cell(cell, args.out / f"cell{i}", args.model, args.steps, args.batch_size)
            print(f"{cell.name}: done", flush=True)
        print_runs(results, args.batch_size)
    print_model(measure_inputs(args.model, args.batch_size, args.repeats))


if __name__ == "__main__":
    main()
