"""How much does a ZO step cost beyond its two forward passes?

For the default model, full fine-tuning and LoRA (zotune's schemes, built as ``zotune train``
builds them), at each batch shape, prints three tables:

1. the no-grad forward time and, for several implementations of the same MeZO step (ZO-SGD,
   one query), the step time and the ratio step / (2 x forward), which is 1.0 for a step that
   costs exactly its two forwards:
   - ``ZOSGD``: zotune (full: perturbation on the fly, weights never written; LoRA: written in
     place and restored from saved bits);
   - ``ZOSGD-rad``: the same with Rademacher directions (``distribution: rademacher``:
     random signs, 8 per random byte, instead of Gaussian values);
   - ``ZOSGD-cache``: the same with the direction cache holding every trainable value
     (``optimizer.direction_cache_mb``: z drawn once per step instead of three times, for
     4 bytes per trainable parameter of memory);
   - ``ZOSGD-table``: the same with a 64 MB noise table (``optimizer.noise_table_mb``: every
     chunk of z a window of one table drawn once, so nothing is drawn per step; other
     directions than the rest, for 64 MB of memory);
   - ``MeZO-ref``: MeZO's original in-place algorithm, re-implemented here from the paper's
     code: global ``torch.manual_seed`` per perturbation, ``p.data = p.data + eps*z`` for
     +eps, -2eps, +eps, then the update: 4 generations of z per step;
   - ``mezo``: the PyPI package ``mezo`` 0.0.1 (``mezo.update``), when installed
     (``pip install --no-deps mezo==0.0.1``): in place too (``param.data.add_(eps * randn)``
     with one seeded generator, the update row by row for tensors over 100k elements);
     if it is missing or fails on this model, one line says why and the rest goes on;
2. every other zeroth-order optimizer's step (ForwardGrad aside: it needs eager attention), as
   a ratio to two forwards, to its own forwards (``forwards_per_step`` x forward: FZOO takes 9,
   HiZOO 3) and to ZOSGD's step (target for the one-query rules: within 1.15);
3. the update alone of ZOSGD and the rules with state (momentum, moments, JAGUAR's memory,
   Newton-Schulz): the step's update redone from its record (``ZOOptimizer.replay``:
   regenerate z from the seeds, apply the rule; no forward, no probe), in seconds, and each
   rule's extra update math over ZOSGD's update, as a
   fraction of ZOSGD's step. Replaying is the update exactly as ``step`` runs it, so this
   separates the rule's cost from the probes' without touching the engine.

All figures are medians measured in this one process, every timing taken in turn within each
repetition, so the ratios are robust to a noisy shared machine; absolute seconds are not.
The learning rate is tiny (1e-12: the update runs, the weights barely move) and the trainable
weights are restored after each batch shape (the in-place implementations drift by rounding).

    .venv/bin/python benchmarks/step_speed.py [--model smollm2-135m] [--repeats 5] [--quick] [--thin]

``--thin``: the same on a thin copy of the model (its layers and tensors, width 64, vocabulary 512, random
weights), where a step costs what the engine and the framework cost per tensor and per layer: the floor a
GPU sees, where the arithmetic is fast and Python and kernel launches set the pace.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import importlib.metadata
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import torch
import yaml

from zotune.config import from_dict, load_config, unresolved_versioned_defaults
from zotune.models import load_model
from zotune.optim.registry import ZEROTH_ORDER
from zotune.train.stepper import make_step
from zotune.train.trainer import Session

FAMILY = tuple(name for name in ZEROTH_ORDER if name not in ("ZOSGD", "ForwardGrad"))
UPDATES = ("ZOSGD", "ZOSGDMomentum", "ZOAdam", "ZOMuon", "ZOMuonSubspace", "JaguarSignSGD")  # update math timed alone
LR, EPS, SEED = 1e-12, 1e-3, 0
TABLE_MB = 64  # the noise table of the ZOSGD-table column


STATS = {"median": statistics.median, "min": min}


def interleaved_timings(fns: dict[str, Callable[[], object]], repeats: int, stat: str = "median") -> dict[str, float]:
    """The median (or min) time of each function, timed in turn within every repetition, so
    that a drift of the machine's speed affects all of them alike (their ratios stay
    meaningful), in a fresh (seeded) order each repetition, so that no function always follows
    the same one. The min is the cost without interference (as ``timeit`` recommends): on a
    shared machine other processes only ever add time."""
    for fn in fns.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for rep in range(repeats):
        order = list(fns)
        random.Random(rep).shuffle(order)
        for name in order:
            fn = fns[name]
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: STATS[stat](ts) for name, ts in times.items()}


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


def lm_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**batch).loss


def random_batch(model: torch.nn.Module, b: int, t: int) -> dict[str, torch.Tensor]:
    """``b`` x ``t`` random token ids (seeded by the shape), labels = ids."""
    vocab = model.get_input_embeddings().num_embeddings
    ids = torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(b * 1000 + t))
    return {"input_ids": ids, "labels": ids}


@contextlib.contextmanager
def weights_restored(params: list[torch.Tensor]) -> Iterator[None]:
    """Put ``params`` back as they were on exit (the in-place implementations drift)."""
    saved = [p.detach().clone() for p in params]
    try:
        yield
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)


def import_mezo() -> ModuleType | str:
    """The ``mezo`` package, or why not (one line)."""
    try:
        import mezo
    except Exception as err:  # not installed, or broken here
        first = (str(err).splitlines() or [""])[0]
        return f"not usable ({type(err).__name__}: {first}); pip install --no-deps mezo==0.0.1"
    return mezo


def mezo_problem(mezo: ModuleType, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> str | None:
    """One ``mezo.update`` on this model: None if it runs, else the reason in one line."""
    try:
        mezo.update(model, batch, lm_loss, EPS, LR, SEED)
    except Exception as err:
        return f"{type(err).__name__}: {(str(err).splitlines() or [''])[0]}"
    return None


def build(model_name: str, scheme: str) -> Session:
    cfg = load_config(None, [f"model.name={model_name}", f"tuning.scheme={scheme}", f"optimizer.lr={LR}",
                             f"optimizer.eps={EPS}", f"seed={SEED}"])
    torch.manual_seed(SEED)
    return Session.build(cfg, log=lambda *_: None, with_data=False)


def optimizer(session: Session, entry: str, distribution: str | None = None) -> torch.optim.Optimizer:
    """``entry`` (a name, or ``NAME:key=value``: one option over its defaults, e.g. ``ZOMuon:ns_form=iterative``)
    over the session's model, built as the trainer builds it, with its own defaults."""
    name, _, option = entry.partition(":")
    raw = unresolved_versioned_defaults(session.cfg)  # its own defaults (n_queries, noise table, ...)
    raw["optimizer"] |= {"name": name, **({"distribution": distribution} if distribution else {})}
    if option:
        key, _, value = option.partition("=")
        raw["optimizer"]["options"] = {**raw["optimizer"].get("options", {}), key: yaml.safe_load(value)}
    cfg = from_dict(raw)
    return dataclasses.replace(session, cfg=cfg).optimizers(log=lambda *_: None)[0]


def replay_last(opt) -> None:
    """Redo the optimizer's last update from its record: the update alone, no forward."""
    record = opt.last_record
    opt.steps_done = record.step  # rewind one step, so that the record follows
    opt.replay(record)


def measure(session: Session, shape: str, repeats: int, family: list[str], reference: bool,
            mezo: ModuleType | None, stat: str = "median") -> dict[str, float]:
    """Seconds of every timing at one batch shape (``BxT``): the ``stat`` of ``repeats``."""
    model = session.model
    batch = random_batch(model, *(int(x) for x in shape.split("x")))

    def closure():
        return lm_loss(model, batch)

    def forward():
        with torch.no_grad():
            closure()

    def stepped(opt) -> Callable[[], object]:
        """The trainer's step (``zotune.train.stepper``) with ``opt`` on this batch."""
        step = make_step(opt, None, (), model=model, loss=lm_loss, zeroth_order=True)
        return lambda: step(batch)

    opts = {name: optimizer(session, name) for name in dict.fromkeys(["ZOSGD", *family])}
    fns: dict[str, Callable[[], object]] = {"forward": forward}
    fns |= {name: stepped(o) for name, o in opts.items()}
    fns["ZOSGD-rad"] = stepped(optimizer(session, "ZOSGD", "rademacher"))
    fns["ZOSGD-cache"] = stepped(optimizer(session, "ZOSGD").cache_directions(4 * sum(p.numel() for p in session.trainable) / 2**20))
    fns["ZOSGD-table"] = stepped(optimizer(session, "ZOSGD").noise_table(TABLE_MB))
    if reference:
        fns["MeZO-ref"] = lambda: mezo_reference_step(model, closure, LR, EPS, SEED)
    if mezo is not None:
        fns["mezo"] = lambda: mezo.update(model, batch, lm_loss, EPS, LR, SEED)
    fns |= {f"update {name}": (lambda o=opts[name]: replay_last(o)) for name in timed_updates(opts)}
    with weights_restored(session.trainable):
        timings = interleaved_timings(fns, repeats, stat)
    return timings | {f"forwards {name}": float(o.forwards_per_step) for name, o in opts.items()}


def timed_updates(entries) -> list[str]:
    """The entries whose update is timed alone: those of an optimizer in ``UPDATES``, in that order."""
    return sorted((e for e in dict.fromkeys(entries) if e.partition(":")[0] in UPDATES),
                  key=lambda e: UPDATES.index(e.partition(":")[0]))


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_tables(results: dict[tuple[str, str], dict[str, float]], trainable: dict[str, int], family: list[str]) -> None:
    peers = [name for name in ("ZOSGD", "ZOSGD-rad", "ZOSGD-cache", "ZOSGD-table", "MeZO-ref", "mezo") if any(name in r for r in results.values())]
    print("\nstep / (2 x forward): the step's cost in forwards (1.00 = exactly two)")
    print(f"{'scheme':<7}{'batch':>7}{'trainable':>11}{'forward s':>11}"
          + "".join(f"{name + ' s':>14}{'/(2 fwd)':>9}" for name in peers))
    for (scheme, shape), r in results.items():
        row = f"{scheme:<7}{shape:>7}{trainable[scheme] / 1e6:>10.2f}M{r['forward']:>11.3f}"
        for name in peers:
            step = r.get(name)
            row += f"{_fmt(step, '.3f'):>14}{_fmt(step and step / (2 * r['forward']), '.2f'):>9}"
        print(row)
    if family:
        print("\nevery ZO optimizer's step: / (2 x forward) | / (its forwards x forward) | / ZOSGD's step")
        print(f"{'optimizer':<26}{'forwards':>9}" + "".join(f"{f'{scheme} {shape}':>22}" for scheme, shape in results))
        for name in ["ZOSGD", *family]:
            first = next(iter(results.values()))
            row = f"{name:<26}{first[f'forwards {name}']:>9.0f}"
            for r in results.values():
                fwd = r["forward"]
                row += f"{r[name] / (2 * fwd):>8.2f}{r[name] / (r[f'forwards {name}'] * fwd):>7.2f}{r[name] / r['ZOSGD']:>7.2f}"
            print(row)
    timed = timed_updates(["ZOSGD", *family])
    print("\nupdate alone (replayed from the step's record, no forward), s; extra: (update - ZOSGD's update) / ZOSGD's step")
    seconds = {name: max(17, len(name) + 4) for name in timed}  # column widths
    extra = {name: max(21, len(name) + 8) for name in timed}
    print(f"{'scheme':<7}{'batch':>7}" + "".join(f"{name + ' s':>{seconds[name]}}" for name in timed)
          + "".join(f"{name + ' extra':>{extra[name]}}" for name in timed[1:]))
    for (scheme, shape), r in results.items():
        base = r["update ZOSGD"]
        print(f"{scheme:<7}{shape:>7}" + "".join(f"{r[f'update {name}']:>{seconds[name]}.3f}" for name in timed)
              + "".join(f"{(r[f'update {name}'] - base) / r['ZOSGD']:>{extra[name]}.2f}" for name in timed[1:]))


def thin_copy(model_name: str, out: Path) -> str:
    """A randomly initialised copy of ``model_name`` with its layers and tensors (the same count and names) but
    hidden size 64, MLP 128, 4 heads and a 512-token vocabulary, saved in ``out`` with the model's tokenizer:
    its steps cost what the engine and the framework cost per tensor and per layer, with next to no arithmetic
    (the floor that a fast device, a GPU, sees). Returns the directory."""
    from transformers import AutoModelForCausalLM

    model, tokenizer = load_model(model_name)
    config = copy.deepcopy(model.config)
    config.update({"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 4,
                   "head_dim": 16, "vocab_size": 512})
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return str(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--shapes", default="16x64,4x32", help="batch x tokens, comma-separated")
    parser.add_argument("--schemes", default="full,lora")
    parser.add_argument("--family", default=",".join(FAMILY),
                        help="optimizers timed against ZOSGD ('' for none); NAME:key=value sets one option")
    parser.add_argument("--no-reference", action="store_true", help="skip the MeZO reference timing")
    parser.add_argument("--no-mezo", action="store_true", help="skip the PyPI mezo package")
    parser.add_argument("--stat", choices=sorted(STATS), default="median",
                        help="per timing: the median of the repetitions, or the min (the cost without interference)")
    parser.add_argument("--quick", action="store_true", help="smoke test: 2 repeats, the 4x32 batch only")
    parser.add_argument("--thin", action="store_true",
                        help="time a thin copy of --model (same layers and tensors, width 64, vocabulary 512): the "
                             "per-step cost of the engine and the framework alone")
    args = parser.parse_args()
    if args.thin:
        args.model = thin_copy(args.model, Path(tempfile.mkdtemp(prefix="zotune-thin-")))
    if args.quick:
        args.repeats, args.shapes = 2, "4x32"
    family = [n for n in args.family.split(",") if n]

    mezo = None if args.no_mezo else import_mezo()
    if isinstance(mezo, str):
        print(f"mezo: {mezo}")
        mezo = None
    elif mezo is not None:
        print(f"mezo {importlib.metadata.version('mezo')}: the PyPI package, timed as the column 'mezo'")
    results: dict[tuple[str, str], dict[str, float]] = {}
    trainable: dict[str, int] = {}
    for scheme in args.schemes.split(","):
        session = build(args.model, scheme)
        model = session.model
        trainable[scheme] = sum(p.numel() for p in session.trainable)
        if not results:
            n_params = sum(p.numel() for p in model.parameters())
            print(f"model {args.model}: {n_params / 1e6:.1f}M params, float32, {torch.get_num_threads()} threads; "
                  f"{args.stat}s of {args.repeats} interleaved repetitions")
        scheme_mezo = mezo
        if mezo is not None:
            with weights_restored(session.trainable):
                problem = mezo_problem(mezo, model, random_batch(model, 1, 8))
            if problem:
                print(f"mezo ({scheme}): skipped, {problem}")
                scheme_mezo = None
        for shape in args.shapes.split(","):
            t0 = time.perf_counter()
            results[(scheme, shape)] = measure(session, shape, args.repeats, family, not args.no_reference, scheme_mezo,
                                                args.stat)
            print(f"measured {scheme} {shape} in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        del session, model
    print_tables(results, trainable, family)


if __name__ == "__main__":
    main()
