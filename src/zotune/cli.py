"""Command-line front end: ``zotune train | eval | replay | export | tasks | optimizers | setup | memory | bench |
sweep``.

User errors (bad config, missing file or model, empty data) print one line
``zotune: error: ...`` and exit with status 2; nothing is destroyed.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from .errors import EXIT_INTERRUPTED, ZotuneError

EXIT_USAGE = 2


def _add_run_args(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("--config", metavar="FILE", help="YAML config (every key has a default)")
    sub.add_argument("--out", metavar="DIR", required=True, help="run directory to write")
    sub.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    sub.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. optimizer.lr=1e-5")


def _add_memory_parser(subs) -> None:
    """``zotune memory``: defaults (None here) are those of zotune.profiling.memory.run_memory."""
    mem = subs.add_parser("memory", help="peak memory of tuning vs inference, by optimizer, scheme and length")
    _add_run_args(mem)
    mem.add_argument("--optimizers", metavar="A,B", help="default: ZOSGD,ZOAdam,SGD,AdamW")
    mem.add_argument("--schemes", metavar="A,B", help="default: full,lora")
    mem.add_argument("--lengths", metavar="N,M", help="tokens per sequence; default: 64,128,256,512,1024,2048")
    mem.add_argument("--steps", type=int, metavar="N", help="training steps per cell (default: 3)")
    mem.add_argument("--batch-size", type=int, metavar="N", help="sequences per batch (default: 1)")
    mem.add_argument("--device", choices=("auto", "cpu", "cuda"), help="default: auto (cuda if available)")
    mem.add_argument("--cell", help=argparse.SUPPRESS)  # one cell, in this process (the runner's cell processes)


def build_parser() -> argparse.ArgumentParser:
    """The ``zotune`` argument parser: every subcommand and its options."""
    parser = argparse.ArgumentParser(
        prog="zotune",
        description="Fine-tune language models with zeroth-order (forward-pass-only) optimizers.",
    )
    parser.add_argument("--version", action="version", version=f"zotune {_version()}")
    subs = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    tr = subs.add_parser("train", help="fine-tune a model on a task and evaluate it")
    _add_run_args(tr)
    tr.add_argument("--nproc", type=int, metavar="N",
                    help="run N processes on this machine through torch's elastic launcher (torchrun --standalone)")
    tr.add_argument("--extend", action="store_true",
                    help="go on with the zeroth-order run in --out (finished or not) to a larger train.steps, "
                         "by replaying its trajectory")
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
    opts = subs.add_parser("optimizers", help="list the optimizers: forward passes per step, default lr / eps by scheme")
    opts.add_argument("--version", type=int, metavar="N", dest="config_version",
                      help="the defaults of config version N (default: the current one, which new runs get)")
    subs.add_parser("setup", help="fetch the default data and prepare the embedded model (once)")
    bn = subs.add_parser("bench", help="run a benchmark grid of train cells; results.csv, report.md, plots")
    bn.add_argument("--grid", metavar="FILE", required=True, help="the grid YAML (see configs/bench/)")
    bn.add_argument("--out", metavar="DIR", required=True, help="bench directory (finished cells are skipped)")
    bn.add_argument("--jobs", type=int, default=1, metavar="N", help="cells run at once, one process each (default 1)")
    bn.add_argument("--dry-run", action="store_true",
                    help="list the cells, their model, task, steps and state (with --archive, the cells it would copy "
                         "in: \"done (archived)\"); run nothing")
    bn.add_argument("--time-limit", type=float, metavar="S",
                    help="stop after S seconds as on Ctrl-C (running cells checkpoint; the report and --archive are "
                         "written): a machine lent for a while")
    bn.add_argument("--report-only", action="store_true",
                    help="write results.csv, report.md and the plots from the cells finished so far; run nothing")
    bn.add_argument("--archive", metavar="DIR",
                    help="keep the results beyond --out: copy in the cells finished in DIR first, then copy the report "
                         "and each finished cell's config, summary, metrics and trajectory (no weights) into DIR")
    bn.add_argument("overrides", nargs="*", metavar="key=value",
                    help="applied to every cell, last (e.g. model.name=DIR: the grid on another model)")
    _add_memory_parser(subs)
    _add_sweep_parser(subs)
    return parser


def _add_sweep_parser(subs) -> None:
    """``zotune sweep``: defaults (None here) are those of zotune.bench.sweep.run_sweep."""
    sw = subs.add_parser("sweep", help="a learning-rate sweep of a train config, picked by dev score; the picked config")
    sw.add_argument("--config", metavar="FILE", help="the train config to sweep (every key has a default)")
    sw.add_argument("--out", metavar="DIR", required=True,
                    help="sweep directory: a bench directory, sweep.md, picked.yaml (finished cells are skipped)")
    sw.add_argument("--overwrite", action="store_true", help="run again the cells --out holds with other settings")
    sw.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. task.name=sst2")
    sw.add_argument("--lr", metavar="A,B", help="learning rates (default: four half-decades around the default lr, "
                                                "e.g. 1e-5,3e-5,1e-4,3e-4)")
    sw.add_argument("--eps", metavar="A,B", help="perturbation sizes, swept with every lr (default: the config's)")
    sw.add_argument("--seeds", metavar="A,B", help="seeds of every setting (default: the config's seed)")
    sw.add_argument("--steps", type=int, metavar="N", help="steps per cell (default: 100)")
    sw.add_argument("--eval-every", type=int, metavar="N", help="steps between dev evaluations (default: steps / 4)")
    sw.add_argument("--jobs", type=int, default=1, metavar="N", help="cells run at once, one process each (default 1)")
    sw.add_argument("--confirm", action="store_true",
                    help="then run the pick and the lr below it for the config's train.steps, and pick between them "
                         "by their late dev score (the long run itself, twice)")
    sw.add_argument("--dry-run", action="store_true", help="list the cells and their state; run nothing")


def _version() -> str:
    from . import __version__

    return __version__


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``zotune`` command line ``argv`` (default: the process's) and return the exit status: a user error
    prints one ``zotune: error:`` line (2), an interrupt one line (130); a closed stdout pipe exits 0."""
    parser = build_parser()
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return _dispatch(args)
    except ZotuneError as err:
        if _reports(err):
            print(f"zotune: error: {_rank_prefix()}{err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt as err:  # a training run says where its checkpoint is
        if _reports(err):
            print(f"zotune: {str(err) or 'interrupted'}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `zotune tasks | head`: the reader has had enough
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        return 0


def _rank_prefix() -> str:
    """``rank K: `` in a process of a torchrun launch of several processes."""
    return f"rank {os.environ.get('RANK', '0')}: " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""


def _reports(err: BaseException) -> bool:
    """Whether this process prints ``err``: under torchrun, errors every rank raises alike (a bad
    config, an interrupted run, rank 0's mirrored setup error) are printed by rank 0 alone."""
    from .errors import ConfigError

    if os.environ.get("RANK", "0") == "0":
        return True
    return not (getattr(err, "quiet", False) or isinstance(err, (ConfigError, KeyboardInterrupt)))


def _dispatch(args: argparse.Namespace) -> int:
    if args.command != "train" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from .errors import ConfigError

        raise ConfigError(f"zotune {args.command} runs in one process: of the commands, only train runs under torchrun")
    if args.command == "tasks":
        _print_tasks()
        return 0

    if args.command == "optimizers":
        from .config import CONFIG_VERSION
        from .optim.catalog import catalog, render

        version = CONFIG_VERSION if args.config_version is None else args.config_version
        print(render(catalog(version), version))
        return 0

    if args.command == "setup":
        from .models import DEFAULT_MODEL, load_model
        from .tasks.fetch import fetch_polarity

        print(f"default data: {fetch_polarity()}")
        load_model(DEFAULT_MODEL)
        print(f"default model: {DEFAULT_MODEL} ready")
        return 0

    if args.command == "bench":
        from .bench import run_bench

        return run_bench(args.grid, args.out, jobs=args.jobs, dry_run=args.dry_run, overrides=args.overrides,
                         report_only=args.report_only, archive=args.archive, time_limit=args.time_limit)

    if args.command == "sweep":
        from .bench.sweep import parse_values, run_sweep

        options = {k: v for k, v in (("steps", args.steps), ("eval_every", args.eval_every)) if v is not None}
        return run_sweep(
            args.config, args.out, lrs=args.lr and parse_values(args.lr, "--lr"),
            eps=args.eps and parse_values(args.eps, "--eps"),
            seeds=args.seeds and parse_values(args.seeds, "--seeds", int, positive=False), jobs=args.jobs,
            overrides=args.overrides, overwrite=args.overwrite, dry_run=args.dry_run, confirm=args.confirm, **options)

    if args.command == "export":
        from .train.export import run_export

        run_export(args.run, args.out, weights=args.weights, overwrite=args.overwrite)
        return 0

    if args.command == "replay":
        from .train.replay import run_replay

        run_replay(args.run, args.out, step=args.step, overwrite=args.overwrite)
        return 0

    from .config import CONFIG_VERSION, load_config, recorded_version

    # a run to resume keeps the defaults it was recorded with (config version)
    extend = args.command == "train" and args.extend
    version = (recorded_version(args.out, finished_too=extend) if args.command == "train" and not args.overwrite
               else CONFIG_VERSION)
    cfg = load_config(args.config, args.overrides, default_version=version)
    if args.command == "memory":
        from .profiling.memory import measure_one, run_memory

        if args.cell is not None:
            measure_one(cfg, args.cell, args.out)
            return 0
        options = ("optimizers", "schemes", "lengths", "steps", "batch_size", "device", "overwrite")
        run_memory(cfg, args.out, **{k: getattr(args, k) for k in options if getattr(args, k) is not None})
        return 0

    from .train.trainer import run_eval, run_train

    if args.command == "train":
        from .distributed import world_from_env

        if args.nproc is not None:
            return _launch(args, cfg)
        with world_from_env() as world:
            run_train(cfg, args.out, overwrite=args.overwrite, world=world, extend=args.extend)
    else:
        run_eval(cfg, args.out, overwrite=args.overwrite, weights=args.weights)
    return 0


def _print_tasks() -> None:
    """``zotune tasks``: a table of the built-in tasks and where their data comes from here, then their descriptions."""
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


def _launch(args: argparse.Namespace, cfg) -> int:
    """``zotune train --nproc N``: the same command in N processes, via torch's elastic launcher."""
    from .distributed import check_batch, env_world_size, launch
    from .errors import ConfigError

    if args.nproc < 1:
        raise ConfigError(f"--nproc must be >= 1, got {args.nproc}")
    if args.extend:
        raise ConfigError("--extend goes on by replaying the run's trajectory, in one process: drop --nproc")
    if env_world_size() > 1:
        raise ConfigError("--nproc inside a torchrun launch: give the process count to torchrun alone")
    check_batch(cfg.train.batch_size, args.nproc, cfg.train.parallel)
    worker = ["train", "--out", str(args.out), *(["--config", args.config] if args.config else []),
              *(["--overwrite"] if args.overwrite else []), *(["--extend"] if args.extend else []), *args.overrides]
    return launch(args.nproc, worker)


if __name__ == "__main__":
    sys.exit(main())
