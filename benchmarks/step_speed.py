"""How much does a ZO step cost beyond its two forward passes?

Prints, for the default model at each batch shape: the no-grad forward time, the ZOSGD step
time, and the ratio step / (2 x forward), which is 1.0 for a step that costs exactly its two
forwards. All figures are medians measured in this one process, the three timings taken in
turn within each repetition, so the ratios are robust to a noisy shared machine; absolute
seconds are not.

For reference, the same run also times MeZO's original in-place algorithm (re-implemented
here from the paper: global ``torch.manual_seed`` per perturbation, ``p.data = p.data +
eps*z`` for +eps, -2eps, +eps, then the update: 4 generations of z per step).

    .venv/bin/python benchmarks/step_speed.py [--model smollm2-135m] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

import zotune
from zotune.optim import ZOSGD


def interleaved_medians(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median time of each function, timed in turn within every repetition, so that a drift
    of the machine's speed affects all of them alike (their ratios stay meaningful)."""
    for fn in fns.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def mezo_reference_step(model, closure, lr: float, eps: float, seed: int) -> None:
    """MeZO Algorithm 1 as in the paper's code (not exact: weights drift by rounding)."""
    params = [p for p in model.parameters() if p.requires_grad]

    def perturb(scale: float) -> None:
        torch.manual_seed(seed)
        for p in params:
            z = torch.normal(0, 1, size=p.shape, dtype=p.dtype)
            p.data = p.data + scale * eps * z

    with torch.no_grad():
        perturb(1)
        f_plus = float(closure())
        perturb(-2)
        f_minus = float(closure())
        perturb(1)
        g = (f_plus - f_minus) / (2 * eps)
        torch.manual_seed(seed)
        for p in params:
            z = torch.normal(0, 1, size=p.shape, dtype=p.dtype)
            p.data = p.data - lr * g * z


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--shapes", default="16x64,4x32", help="batch x tokens, comma-separated")
    parser.add_argument("--no-reference", action="store_true", help="skip the MeZO reference timing")
    args = parser.parse_args()

    torch.manual_seed(0)
    model, _ = zotune.load_model(args.model)
    vocab = model.config.vocab_size
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model {args.model}: {n_params / 1e6:.1f}M params, float32, {torch.get_num_threads()} threads")
    header = f"{'batch':>8} {'forward s':>10} {'ZOSGD step s':>13} {'step/(2 fwd)':>13}"
    if not args.no_reference:
        header += f" {'MeZO-ref step s':>16} {'ref/(2 fwd)':>12}"
    print(header)
    for shape in args.shapes.split(","):
        b, t = (int(x) for x in shape.split("x"))
        ids = torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(b * 1000 + t))
        batch = {"input_ids": ids, "labels": ids}

        def closure():
            return model(**batch).loss

        def forward():
            with torch.no_grad():
                closure()

        # a tiny non-zero lr: the update pass runs (lr=0 skips it) while the weights barely move
        state = {k: v.clone() for k, v in model.state_dict().items()}
        opt = ZOSGD(model.parameters(), lr=1e-12, eps=1e-3, seed=0)
        fns = {"forward": forward, "zosgd": lambda: opt.step(closure)}
        if not args.no_reference:
            fns["reference"] = lambda: mezo_reference_step(model, closure, 1e-12, 1e-3, 0)
        t = interleaved_medians(fns, args.repeats)
        model.load_state_dict(state)
        fwd = t["forward"]
        row = f"{shape:>8} {fwd:>10.3f} {t['zosgd']:>13.3f} {t['zosgd'] / (2 * fwd):>13.2f}"
        if not args.no_reference:
            row += f" {t['reference']:>16.3f} {t['reference'] / (2 * fwd):>12.2f}"
        print(row, flush=True)


if __name__ == "__main__":
    main()
