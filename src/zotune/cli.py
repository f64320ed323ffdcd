"""Command-line front end: ``zotune train | eval | replay | export | tasks | setup``.

User errors (bad config, missing file or model, empty data) print one line
``zotune: error: ...`` and exit with status 2; nothing is destroyed.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from .errors import ZotuneError

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def _add_run_args(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("--config", metavar="FILE", help="YAML config (every key has a default)")
    sub.add_argument("--out", metavar="DIR", required=True, help="run directory to write")
    sub.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    sub.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. optimizer.lr=1e-5")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="zotune",
        description="Fine-tune language models with zeroth-order (forward-pass-only) optimizers.",
    )
    parser.add_argument("--version", action="version", version=f"zotune {_version()}")
    subs = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_run_args(subs.add_parser("train", help="fine-tune a model on a task and evaluate it"))
    ev = subs.add_parser("eval", help="evaluate a model on a task (zero-shot, icl, linear_probe)")
    _add_run_args(ev)
    ev.add_argument("--weights", metavar="FILE", help="tuned weights to load first (a run's weights.safetensors)")
    rp = subs.add_parser("replay", help="rebuild a ZO run's weights from its trajectory, without forward passes")
    rp.add_argument("--run", metavar="DIR", required=True, help="the run directory to replay")
    rp.add_argument("--out", metavar="DIR", required=True, help="where to write the rebuilt weights")
    rp.add_argument("--step", type=int, metavar="N", help="stop after N steps (default: all)")
    rp.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    ex = subs.add_parser("export", help="write a run's tuned model as a Hugging Face directory (LoRA merged)")
    ex.add_argument("--run", metavar="DIR", required=True, help="the run directory")
    ex.add_argument("--out", metavar="DIR", required=True, help="the directory to write")
    ex.add_argument("--weights", metavar="FILE", help="weights to export (default: the run's weights.safetensors)")
    ex.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    subs.add_parser("tasks", help="list built-in tasks and where their data comes from here")
    subs.add_parser("setup", help="fetch the default data and prepare the embedded model (once)")
    return parser


def _version() -> str:
    from . import __version__

    return __version__


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return _dispatch(args)
    except ZotuneError as err:
        print(f"zotune: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("zotune: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "tasks":
        import textwrap

        from .tasks import list_tasks

        rows = list_tasks()
        table = [("task", "type", "metric", "train / test", "source here")]
        for r in rows:
            sizes = f"{r['train']:,} / {r['test']:,}" if r["train"] is not None else "-"
            table.append((r["name"], r["type"], r["metric"], sizes, r["source"]))
        widths = [max(len(row[i]) for row in table) for i in range(4)]
        for row in table:
            print("  ".join(f"{c:>{w}}" if i == 3 and row is not table[0] else f"{c:<{w}}"
                            for i, (c, w) in enumerate(zip(row[:4], widths))) + "  " + row[4])
        print("\ntrain / test: example pools when the data is here (evaluation uses at most task.n_test = 1000 "
              "of the test pool);\nuse one with task.name=NAME (any task.* key overrides it).\n")
        for r in rows:
            print(textwrap.fill(r["description"], width=100, initial_indent=f"{r['name']}: ", subsequent_indent="    "))
        return 0

    if args.command == "setup":
        from .models import DEFAULT_MODEL, load_model
        from .tasks.fetch import fetch_polarity

        print(f"default data: {fetch_polarity()}")
        load_model(DEFAULT_MODEL)
        print(f"default model: {DEFAULT_MODEL} ready")
        return 0

    if args.command == "export":
        from .train.export import run_export

        run_export(args.run, args.out, weights=args.weights, overwrite=args.overwrite)
        return 0

    if args.command == "replay":
        from .train.replay import run_replay

        run_replay(args.run, args.out, step=args.step, overwrite=args.overwrite)
        return 0

    from .config import load_config
    from .train.trainer import run_eval, run_train

    cfg = load_config(args.config, args.overrides)
    if args.command == "train":
        run_train(cfg, args.out, overwrite=args.overwrite)
    else:
        run_eval(cfg, args.out, overwrite=args.overwrite, weights=args.weights)
    return 0


if __name__ == "__main__":
    sys.exit(main())
