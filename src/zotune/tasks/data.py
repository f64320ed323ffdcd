"""Read a task's rows and split them, deterministically, as in MeZO / LM-BFF.

* Test: a held-out pool (``eval_fraction`` of a single file chosen with a fixed seed, the file
  ``test_path``, or the hub's ``hf_split``), shuffled with a fixed seed and cut to ``n_test``: the
  same test set for every run seed.
* Train: ``k_shot`` examples per class from the rest, drawn with the run seed.
* Dev: ``n_dev`` (default ``k_shot``) further examples per class, disjoint from train.
* Or, with ``split: random`` (MeZO's OPT protocol: 1,000 / 500 / 1,000): ``n_train`` and ``n_dev``
  (default 500) examples in all, drawn at random from the rest whatever their class.

Rows pass through the task's row transform (``rows``) whatever their source, so a hub task reads
the same from the hub, the local Hugging Face cache, or local files in the hub's layout. Splits use
``random.Random(seed)`` only, so they are identical across processes and machines.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import random
import sys
from pathlib import Path
from types import EllipsisType

from ..errors import DataError
from .. import hub
from .transforms import ROW_TRANSFORMS
from .spec import SPEC_KEYS, Example, TaskData, TaskSpec, make_spec

TEST_SPLIT_SEED = 1234  # fixed: the test set never depends on the run seed
Rows = list[tuple[str, dict]]  # (location for messages, e.g. "line 3", row)


def load_task(spec: TaskSpec, seed: int = 0, k_shot: int | None | EllipsisType = ...,
              n_dev: int | None | EllipsisType = ..., n_test: int | EllipsisType = ...) -> TaskData:
    """Rows -> examples -> (train, dev, test).

    ``k_shot`` / ``n_dev`` / ``n_test`` left at ``...`` take the spec's values (config keys
    ``task.k_shot`` = 16, ``task.n_dev`` = k_shot, ``task.n_test`` = 1000); ``k_shot=None``
    trains on every non-test example except dev (a tenth per class unless ``n_dev`` says).
    ``seed`` is the run seed; the spec's ``seed``, if set, takes precedence for sampling.
    The returned ``TaskData.spec`` carries the values actually used.
    """
    given = {"k_shot": k_shot, "n_dev": n_dev, "n_test": n_test}
    if any(v is not ... for v in given.values()):
        spec = make_spec({**{k: getattr(spec, k) for k in SPEC_KEYS},
                          **{k: v for k, v in given.items() if v is not ...}})
    if spec.source == "hf":
        rest, held = _examples(spec, *_read_hf(spec, "train")), _examples(spec, *_read_hf(spec, spec.hf_split))
    elif spec.test_path:
        rest, held = _examples(spec, *_read(spec)), _examples(spec, *_read_file(spec, spec.test_path))
    else:
        examples = _examples(spec, *_read(spec))
        order = list(range(len(examples)))
        random.Random(TEST_SPLIT_SEED).shuffle(order)
        n_held = max(1, round(len(examples) * spec.eval_fraction))
        held = [examples[i] for i in sorted(order[:n_held])]
        rest = [examples[i] for i in sorted(order[n_held:])]
        if not rest:
            raise DataError(f"task {spec.name!r}: all {len(examples)} examples are held out for test "
                            f"(eval_fraction={spec.eval_fraction}); none left for training")
    test = held[:]
    random.Random(TEST_SPLIT_SEED).shuffle(test)
    train, dev = _few_shot(spec, rest, seed if spec.seed is None else spec.seed)
    return TaskData(spec, train, dev, test[: spec.n_test])


def _random_split(spec: TaskSpec, pool: list[Example], seed: int) -> tuple[list[Example], list[Example]]:
    """n_train train + n_dev dev examples drawn at random from the pool, disjoint; a short pool warns."""
    n_dev = 500 if spec.n_dev is None else spec.n_dev
    items = pool[:]
    random.Random(seed).shuffle(items)
    if spec.n_train + n_dev > len(items):
        print(f"zotune: warning: task {spec.name!r} asks for {spec.n_train} train + {n_dev} dev examples but has only "
              f"{len(items)} outside the test set; using what there is (train first)", file=sys.stderr)
    return items[: spec.n_train], items[spec.n_train : spec.n_train + n_dev]


def _few_shot(spec: TaskSpec, pool: list[Example], seed: int) -> tuple[list[Example], list[Example]]:
    """k_shot train + n_dev dev examples per class, disjoint; a short class warns once
    (``split: random``: :func:`_random_split`)."""
    if spec.split == "random":
        return _random_split(spec, pool, seed)
    by_label = spec.kind.classes(spec, pool)
    rng = random.Random(seed)
    train: list[Example] = []
    dev: list[Example] = []
    short = []
    k_dev = spec.k_shot if spec.n_dev is None else spec.n_dev
    for label, items in by_label.items():
        if not items:
            raise DataError(f"task {spec.name!r}: no example with label {label!r} outside the test set "
                            f"(choices: {', '.join(map(repr, spec.labels))})")
        items = items[:]
        rng.shuffle(items)
        if spec.k_shot is None:
            n_dev = len(items) // 10 if spec.n_dev is None else spec.n_dev
            k = len(items) - n_dev
            if k < 1:
                raise DataError(f"task {spec.name!r}: only {len(items)} examples of label {label!r}, "
                                f"none left for training after n_dev={n_dev}")
        else:
            k, n_dev = spec.k_shot, k_dev
            if k + n_dev > len(items):
                short.append(f"{len(items)} of label {label!r}")
        train += items[:k]
        dev += items[k : k + n_dev]
    if short:
        per = "per class " if len(by_label) > 1 else ""
        print(f"zotune: warning: task {spec.name!r} asks for {spec.k_shot} train + {k_dev} dev examples {per}"
              f"but has only {', '.join(short)}; using what there is (train first)", file=sys.stderr)
    rng.shuffle(train)
    rng.shuffle(dev)
    return train, dev


def _examples(spec: TaskSpec, rows: Rows, where: str) -> list[Example]:
    """Check columns (on the first row) and labels; every column but the label becomes a field."""
    if not rows:
        raise DataError(f"task {spec.name!r}: {where} is empty (no data rows)")
    first = rows[0][1]
    cand_cols = spec.kind.candidate_columns(spec)
    for col in (spec.label_column, *spec.columns, *cand_cols):
        if col not in first:
            kind = {spec.label_column: "label column"}.get(col, "candidates column" if col in cand_cols
                                                            else "template column")
            raise DataError(f"task {spec.name!r}: {kind} {col!r} not found in {where} "
                            f"(columns: {', '.join(map(str, first))})")
    out = []
    for loc, row in rows:
        missing = [c for c in spec.columns if row.get(c) is None]
        if missing:
            raise DataError(f"task {spec.name!r}: {where} {loc}: no value for column {missing[0]!r}")
        fields = {str(k): "" if v is None else str(v) for k, v in row.items()
                  if k is not None and k != spec.label_column and k not in cand_cols}
        out.append(spec.kind.example(spec, fields, row, f"task {spec.name!r}: {where} {loc}"))
    return out


def _read(spec: TaskSpec) -> tuple[Rows, str]:
    """Rows of a package's data or of the task's file, and a name for messages."""
    if spec.source in ("package", "bigbench"):
        pkg = spec.package_data
        return _transformed(spec, [(f"row {n}", r) for n, r in enumerate(pkg.read(), start=1)], pkg.description), \
            pkg.description
    return _read_file(spec, spec.path or "")


FILE_FORMATS = (".csv", ".jsonl", ".parquet")


def _read_file(spec: TaskSpec, name: str) -> tuple[Rows, str]:
    """Rows of a .csv / .jsonl / .parquet file (through the task's row transform), and a name for messages."""
    path = Path(name)
    if not path.is_file():
        raise DataError(f"task {spec.name!r}: data file not found: {path}")
    suffix = path.suffix.lower()
    if suffix not in FILE_FORMATS:
        raise DataError(f"task {spec.name!r}: data file {path} must be {', '.join(FILE_FORMATS[:-1])} or {FILE_FORMATS[-1]}")
    if suffix == ".parquet":
        rows = _read_parquet(path)
    else:
        try:
            text = path.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as err:
            raise DataError(f"task {spec.name!r}: data file {path} is not UTF-8 (byte {err.start}); "
                            "save it as UTF-8") from None
        rows = _read_csv(text, path) if suffix == ".csv" else _read_jsonl(text, path)
    return _transformed(spec, rows, str(path)), str(path)


def _transformed(spec: TaskSpec, rows: Rows, where: str) -> Rows:
    """``rows`` through the task's row transform (``rows: copa``); a row it returns None for is dropped."""
    if spec.rows is None:
        return rows
    transform, out = ROW_TRANSFORMS[spec.rows], []
    for loc, row in rows:
        try:
            shaped = transform(dict(row))
        except KeyError as err:
            raise DataError(f"task {spec.name!r}: {where} {loc}: row transform {spec.rows!r} needs column {err} "
                            f"(columns: {', '.join(map(str, row))})") from None
        except (TypeError, ValueError, AttributeError) as err:
            raise DataError(f"task {spec.name!r}: {where} {loc}: row transform {spec.rows!r} cannot read this row "
                            f"({type(err).__name__}: {err})") from None
        if shaped is not None:
            out.append((loc, shaped))
    return out


def _read_parquet(path: Path) -> Rows:
    try:
        import pyarrow.parquet as pq  # comes with the optional `datasets`
    except ImportError:
        raise DataError(f"data file {path}: reading Parquet needs pyarrow (pip install 'zotune[hub]')") from None
    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises several types for a bad file
        raise DataError(f"data file {path}: not a readable Parquet file ({str(err).splitlines()[0]})") from None
    return [(f"row {n}", r) for n, r in enumerate(table.to_pylist(), start=1)]


def _read_csv(text: str, path: Path) -> Rows:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    rows = []
    try:
        for row in reader:
            rows.append((f"line {reader.line_num}", row))
    except csv.Error as err:
        raise DataError(f"data file {path}, line {reader.line_num}: not valid CSV ({err})") from None
    return rows


def _read_jsonl(text: str, path: Path) -> Rows:
    rows = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"data file {path}, line {n}: not valid JSON ({err.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"data file {path}, line {n}: expected a JSON object, got {type(row).__name__}")
        rows.append((f"line {n}", row))
    return rows


# older ids written "name/config" -> the script-free copies that load with `datasets` >= 4
# (the originals need a loading script, which `datasets` no longer runs; lm-evaluation-harness issue 3171)
MOVED = {"glue": "nyu-mll/glue", "super_glue": "aps/super_glue", "winogrande": "allenai/winogrande"}


def parse_hf(hf: str) -> tuple[str, str | None]:
    """A task's ``hf``: ``org/name:config``, ``org/name``, a local folder, or an older ``glue/sst2``
    (its dataset in :data:`MOVED`) -> (path for ``datasets.load_dataset``, config or None)."""
    if ":" in hf:
        name, _, config = hf.rpartition(":")
        return name, config or None
    first, _, rest = hf.partition("/")
    if first in MOVED and rest and not Path(hf).is_dir():
        return MOVED[first], rest
    return hf, None


def _read_hf(spec: TaskSpec, split: str) -> tuple[Rows, str]:
    """One split of a hub dataset through the optional `datasets` (and the task's row transform).

    ``hf`` names a hub dataset (``org/name:config``) or a local folder of data files in the hub's
    layout (e.g. ``train.parquet``, ``validation.parquet``). With the hub unreachable, a hub dataset
    loads from the local Hugging Face cache if it is there."""
    instead = f": use {spec.offline_alternative!r} instead, available offline" if spec.offline_alternative else ""
    hf = spec.hf or ""
    name, config = parse_hf(hf)
    local = Path(name).is_dir()
    need = f"task {spec.name!r} needs {hf} " + ("(a local folder)" if local else "from the Hugging Face hub")
    try:
        import datasets  # optional: only hub tasks need it
    except ImportError:
        raise DataError(f"{need}, read with the optional package `datasets` (pip install 'zotune[hub]'){instead}") from None
    online = local or hub.reachable()
    try:
        with contextlib.nullcontext() if online else hub.offline():
            ds = datasets.load_dataset(name, config, split=split)
    except Exception as err:  # the hub raises many types; report one line
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        if not online:
            raise DataError(f"{need}, which is unreachable here (offline?), and the local Hugging Face cache has no "
                            f"copy of its split {split!r} ({first}){instead}") from None
        raise DataError(f"{need}, which failed for split {split!r}: {first}{instead}") from None
    where = f"{hf} ({split})"
    return _transformed(spec, [(f"row {n}", dict(r)) for n, r in enumerate(ds, start=1)], where), where
