"""Step time of ZO on the top K layers (the ``top`` scheme, frozen-prefix activation cache) against full fine-tuning.

For K in --layers and for ``full``: one in-process session on the default model (float32), a
batch of --batch training sentences cut to --length tokens, the default ZO step (ZOSGD, 64 MB
noise table). Prints the fastest of --repeats timings of a step, as a ratio to two no-grad forwards of
the full model and as a speed-up over the full scheme's step, with the trainable parameters and
the activation cache's size. The first step of a top-K session fills the cache and is not timed.

    .venv/bin/python benchmarks/top_layers.py [--layers 1,2,4,8] [--batch 16] [--length 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time

import torch

from zotune.config import load_config
from zotune.train.trainer import Session


def fastest(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", default="1,2,4,8")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rows = []
    forward_s = None
    for k in ["full", *args.layers.split(",")]:
        scheme = ["tuning.scheme=full"] if k == "full" else ["tuning.scheme=top", f"tuning.top.layers={k}"]
        cfg = load_config(None, [*scheme, f"train.max_length={args.length}", "optimizer.lr=1e-7"])
        session = Session.build(cfg, log=lambda *_: None)
        batch = session.scorer.encode(session.data.train[: args.batch])
        probe = session.probe_model(log=print)
        opt, _, _ = session.optimizers(log=lambda *_: None)
        step = lambda: opt.step(lambda: session.scorer.loss(probe, batch))  # noqa: E731
        step()  # fills the activation cache (top) and the noise table
        if forward_s is None:
            with torch.no_grad():
                forward_s = fastest(lambda: session.scorer.loss(session.model, batch), args.repeats)
        step_s = fastest(step, args.repeats)
        cache_mb = getattr(probe, "cache_bytes", 0) / 2**20
        rows.append((k, sum(p.numel() for p in session.trainable), step_s, cache_mb))
        print(f"{k}: {step_s:.3f} s/step", flush=True)
    full_s = rows[0][2]
    print(f"\nbatch {args.batch} x {args.length} tokens, forward {forward_s:.3f} s, fastest of {args.repeats}\n")
    print("| tuned | trainable params | step s | step / (2 x full forward) | speed-up over full | activation cache MB |")
    print("|---|---:|---:|---:|---:|---:|")
    for k, n, s, mb in rows:
        tuned = "full" if k == "full" else f"top {k} of 30 layers"
        print(f"| {tuned} | {n:,} | {s:.3f} | {s / (2 * forward_s):.2f} | {full_s / s:.1f}x | {mb:.2f} |")


if __name__ == "__main__":
    main()
