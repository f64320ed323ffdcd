"""Where a probe's time goes: one no-grad forward against one ZO probe, op by op.

Times (medians of interleaved repetitions, seconds) of
- ``forward``: the no-grad forward of the batch;
- ``probe_empty``: the same under the perturbation mode with nothing to add (dispatch alone);
- ``probe``: one SPSA probe at ``x + eps z`` (the order of use learned, as in a step);
- ``draws``: drawing z for every trainable parameter, nothing else (two threads);
- ``step``, ``step_cached``: a ZO-SGD step, without and with the direction cache;
then ``torch.profiler`` tables (self CPU time per op, main thread) of the forward and the probe.
z is drawn on the sampler's threads, which the main thread's table does not show: a probe's
extra time beyond its ops is the drawing.

    .venv/bin/python benchmarks/probe_profile.py [--scheme full|lora] [--shape 16x64] [--repeats 3] [--rows 20]
"""

from __future__ import annotations

import argparse

import torch
from step_speed import LR, build, interleaved_timings, lm_loss, optimizer, random_batch, weights_restored
from torch.profiler import ProfilerActivity, profile

from zotune.estimators.perturb import Perturbation


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--scheme", default="full", choices=("full", "lora"))
    parser.add_argument("--shape", default="16x64", help="batch x tokens")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rows", type=int, default=20, help="ops per profile table")
    args = parser.parse_args()
    session = build(args.model, args.scheme)
    model = session.model
    batch = random_batch(model, *(int(x) for x in args.shape.split("x")))
    opt = optimizer(session, "ZOSGD")
    cached = optimizer(session, "ZOSGD").cache_directions(4 * sum(p.numel() for p in session.trainable) / 2**20)
    params = [p for _, p, _ in opt.trainable()]
    est = opt.estimator
    everything = set(range(len(params)))

    def closure() -> torch.Tensor:
        return lm_loss(model, batch)

    def forward() -> None:
        with torch.no_grad():
            closure()

    def probe_empty() -> None:
        with torch.no_grad(), Perturbation(params, [[] for _ in params], est.sampler, est._pool):
            closure()

    def probe() -> None:
        with torch.no_grad():
            est._probe(closure, params, list(range(len(params))), everything, 1e-3)

    def draws() -> None:
        for i, p in enumerate(params):
            est.sampler.apply(p.numel(), i, lambda a, b, z: None)

    fns = {"forward": forward, "probe_empty": probe_empty, "probe": probe, "draws": draws,
           "step": lambda: opt.step(closure), "step_cached": lambda: cached.step(closure)}
    with weights_restored(session.trainable):
        times = interleaved_timings(fns, args.repeats)
    print(f"{args.model}, {args.scheme}, batch {args.shape}, lr {LR:g}, medians of {args.repeats}")
    for name, seconds in times.items():
        print(f"  {name:<12} {seconds:7.3f} s   {seconds / times['forward']:5.2f} x forward")
    for name in ("forward", "probe"):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fns[name]()
        print(f"\n{name}: self CPU time per op (main thread)")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=45))


if __name__ == "__main__":
    main()
