"""A ZO step's cost in forwards, each timed in a process of its own.

``step_speed.py`` times everything in turn in one process, which makes its ratios robust to a
noisy machine; but a cost that outlives the work that caused it (threads left spinning, caches
evicted) lands on whatever is timed next, the forward included. Here one process runs only
forwards and another only ZOSGD steps (the default config: full fine-tuning, the noise table),
alternately for ``--rounds`` rounds; each prints the minimum and median of ``--repeats`` timings
after one warm-up, and the summary is step / (2 x forward) from the minima.

    .venv/bin/python benchmarks/step_isolated.py [--shapes 4x32 16x64] [--rounds 2] [--repeats 6]

Pause other work on the machine first: absolute seconds are compared across processes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def time_one(what: str, shape: str, repeats: int, threads: int) -> dict[str, float]:
    """In this process: ``repeats`` timings of a no-grad forward or of a ZOSGD step at ``shape``."""
    sys.path.insert(0, str(HERE))
    import step_speed as ss

    torch.set_num_threads(threads)
    b, t = (int(x) for x in shape.split("x"))
    session = ss.build("smollm2-135m", "full")
    batch = ss.random_batch(session.model, b, t)

    def closure() -> torch.Tensor:
        return ss.lm_loss(session.model, batch)

    if what == "forward":
        def run() -> None:
            with torch.no_grad():
                closure()
    else:
        opt = ss.optimizer(session, "ZOSGD")

        def run() -> None:
            opt.step(closure)

    run()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return {"min": min(times), "median": sorted(times)[len(times) // 2]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=["4x32", "16x64"], help="batch x tokens")
    ap.add_argument("--rounds", type=int, default=2, help="forward and step processes, alternately, this many times")
    ap.add_argument("--repeats", type=int, default=6)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--one", nargs=2, metavar=("WHAT", "SHAPE"), help=argparse.SUPPRESS)  # a child process
    args = ap.parse_args()
    if args.one:
        print(json.dumps(time_one(args.one[0], args.one[1], args.repeats, args.threads)))
        return
    print(f"{args.threads} threads; minimum (median) of {args.repeats} timings per process")
    for shape in args.shapes:
        best: dict[str, float] = {}
        for r in range(args.rounds):
            for what in ("forward", "step"):
                out = subprocess.run([sys.executable, __file__, "--one", what, shape, "--repeats", str(args.repeats),
                                      "--threads", str(args.threads)], capture_output=True, text=True, check=True)
                t = json.loads(out.stdout.strip().splitlines()[-1])
                best[what] = min(best.get(what, float("inf")), t["min"])
                print(f"{shape} round {r + 1} {what:7s} {t['min']:.3f} s ({t['median']:.3f})", flush=True)
        print(f"{shape}: step / (2 x forward) = {best['step'] / (2 * best['forward']):.2f}", flush=True)


if __name__ == "__main__":
    main()
