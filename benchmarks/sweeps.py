"""Tables of the learning-rate sweeps (``configs/bench/sweep/*.yaml``), each picked by dev accuracy.

Each sweep is a ``zotune bench`` grid run into ``runs/sweep/<name>``:

    zotune bench --grid configs/bench/sweep/zosgd-full.yaml --out runs/sweep/zosgd-full

This script reads whatever cells exist there (finished or not) and prints, per sweep, one row per
cell: dev accuracy at every evaluation, the best dev accuracy and its step, test accuracy with the
best-dev weights (``train.keep_best``), the last training loss, and the pick: the best dev
accuracy, ties broken by the mean dev accuracy over the evaluations (the steadier cell). A setting
run with several seeds (more seeds of a sweep ``X`` may come from a tie-break grid run into
``runs/sweep/X-tie``, shown in X's table) is ranked by its best dev averaged over its seeds, then
by its mean dev over all their evaluations. A cell without a summary is marked unfinished, and one
whose loss passed 10x its first is marked diverged.

    .venv/bin/python benchmarks/sweeps.py                      # every sweep under runs/sweep
    .venv/bin/python benchmarks/sweeps.py zosgd-lora zosgd-top # some of them
    .venv/bin/python benchmarks/sweeps.py --markdown docs/sweeps.md  # update the doc's tables in place
"""

from __future__ import annotations

import argparse
from pathlib import Path

from zotune.bench.sweep import SweepCell, read_cell, sweep_table

SWEEPS = Path("runs/sweep")
MORE_SEEDS = "-tie"  # runs/sweep/X-tie: more seeds of sweep X's settings (a tie-break), shown in X's table


def kept_cells(section: str) -> list[SweepCell]:
    """The cells of a table this script wrote (a ``### name`` section of the document), read back from
    its rows: what a sweep's earlier cells, run on another machine, contribute to its table now."""
    lines = [line for line in section.splitlines() if line.startswith("| ")]
    if not lines or "dev at steps" not in lines[0]:
        return []
    steps = [int(x) for x in lines[0].split("|")[2].replace("dev at steps", "").split("/") if x.strip()]
    cells = []
    for line in lines[1:]:
        name, dev, _, test, loss, status = (part.strip() for part in line.strip().strip("|").split("|"))
        cell = SweepCell(name, marked_diverged="diverged" in status)
        cell.dev = [(step, float(v)) for step, v in zip(steps, dev.split(" / ")) if v.strip() != "-"]
        cell.losses = [float(loss)] if loss != "-" else []
        if "unfinished" not in status:
            cell.summary = {"eval": {"accuracy": float(test)}} if test != "-" else {}
        cells.append(cell)
    return cells


def table(sweep: Path, kept: list[SweepCell] = ()) -> str:
    """The sweep's table: its cells under ``sweep/cells`` (and ``sweep-tie/cells``), and the ``kept`` cells (from
    the document) that have no directory here."""
    if not (sweep / "cells").is_dir():
        return f"### {sweep.name}\n\n(not run yet)\n"
    more = sweep.parent / f"{sweep.name}{MORE_SEEDS}" / "cells"
    cells = [read_cell(p) for d in (sweep / "cells", more) if d.is_dir() for p in d.iterdir() if p.is_dir()]
    cells += [c for c in kept if c.name not in {local.name for local in cells}]
    description = ""
    grid = sweep / "grid.yaml"
    if grid.is_file():
        for line in grid.read_text().splitlines():
            if line.startswith("description:"):
                description = line.partition(":")[2].strip().strip('"')
    return sweep_table(f"{sweep.name}: {description}" if description else sweep.name, cells)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweeps", nargs="*", help="sweep names under runs/sweep (default: all)")
    parser.add_argument("--root", type=Path, default=SWEEPS)
    parser.add_argument("--markdown", type=Path,
                        help=f"also write the tables into this file, between {BEGIN} and {END} (appended if absent), "
                             "keeping the tables there of sweeps that have no directory here")
    args = parser.parse_args()
    root_names = sorted(p.name for p in args.root.iterdir() if (p / "cells").is_dir() and not p.name.endswith(MORE_SEEDS)
                        ) if args.root.is_dir() else []
    old = args.markdown.read_text() if args.markdown and args.markdown.is_file() else ""
    sections = read_sections(old)
    tables = {n: table(args.root / n, kept_cells(sections.get(n, ""))) for n in (args.sweeps or root_names)}
    print("\n".join(tables.values()))
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(merge_tables(old, {n: t for n, t in tables.items() if n in root_names}))


BEGIN, END = "<!-- sweep tables: benchmarks/sweeps.py --markdown -->", "<!-- end of sweep tables -->"


def read_sections(document: str) -> dict[str, str]:
    """The document's sweep tables (between BEGIN and END), by sweep name."""
    body = document.partition(BEGIN)[2].partition(END)[0]
    sections = {}
    for chunk in body.split("\n### ")[1:]:
        name = chunk.split(":", 1)[0].split("\n", 1)[0].strip()
        sections[name] = "### " + chunk.strip() + "\n"
    return sections


def merge_tables(document: str, tables: dict[str, str]) -> str:
    """``document`` with its sweep tables (between BEGIN and END, one ``### name`` section each) updated:
    sweeps in ``tables`` replaced or added, the others kept as they were (run in an earlier session:
    run directories do not outlive a machine, the document does). Sections sorted by name."""
    head, found, rest = document.partition(BEGIN)
    tail = rest.partition(END)[2] if found else ""
    sections = read_sections(document)
    sections.update(tables)
    merged = "\n".join(sections[n] for n in sorted(sections))
    return f"{head.rstrip()}\n\n{BEGIN}\n\n{merged}\n{END}\n{tail.lstrip(chr(10)) if found else ''}"


if __name__ == "__main__":
    main()
