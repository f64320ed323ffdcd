"""Read a task's rows and split them, deterministically, as in MeZO / LM-BFF.

* Test: a fixed held-out pool (``eval_fraction`` of a single file, or the hub's validation
  split), shuffled with a fixed seed and cut to ``n_test``: the same for every run seed.
* Train: ``k_shot`` examples per class from the rest, drawn with the run seed.
* Dev: ``n_dev`` (default ``k_shot``) further examples per class, disjoint from train.
"""

from __future__ import annotations

import csv
import json
import random
import sys
from pathlib import Path

from ..errors import DataError
from .fetch import FETCHERS
from .spec import Example, TaskData, TaskSpec

TEST_SPLIT_SEED = 1234  # fixed: the test set never depends on the run seed


def load_task(spec: TaskSpec, seed: int = 0) -> TaskData:
    """Rows -> examples -> (train, dev, test)."""
    if spec.source == "hf":
        pool, test_pool = _read_hf(spec, "train"), _read_hf(spec, spec.hf_split)
        rest = _examples(spec, pool)
        test_examples = _examples(spec, test_pool)
    else:
        examples = _examples(spec, _read_rows(spec))
        order = list(range(len(examples)))
        random.Random(TEST_SPLIT_SEED).shuffle(order)
        n_held = max(1, round(len(examples) * spec.eval_fraction))
        test_examples = [examples[i] for i in order[:n_held]]
        rest = [examples[i] for i in sorted(order[n_held:])]
    if not rest:
        raise DataError(f"task {spec.name!r}: no examples left for training after holding out the test set")
    test = test_examples[: spec.n_test]
    train, dev = _few_shot(spec, rest, seed)
    return TaskData(spec, train, dev, test)


def _few_shot(spec: TaskSpec, pool: list[Example], seed: int) -> tuple[list[Example], list[Example]]:
    by_label: dict[str, list[Example]] = {label: [] for label in spec.labels}
    for ex in pool:
        by_label[ex.label].append(ex)
    rng = random.Random(seed)
    train: list[Example] = []
    dev: list[Example] = []
    for label, items in by_label.items():
        if not items:
            raise DataError(f"task {spec.name!r}: no training examples with label {label!r}")
        items = items[:]
        rng.shuffle(items)
        if spec.k_shot is None:  # everything, minus a tenth for dev unless n_dev says otherwise
            n_dev = spec.n_dev if spec.n_dev is not None else len(items) // 10
            k = len(items) - n_dev
        else:
            k, n_dev = spec.k_shot, spec.n_dev if spec.n_dev is not None else spec.k_shot
        if k + n_dev > len(items):
            print(f"zotune: warning: task {spec.name!r} has only {len(items)} examples of label {label!r} "
                  f"(asked for {k} train + {n_dev} dev)", file=sys.stderr)
            k = min(k, len(items))
        if k < 1:
            raise DataError(f"task {spec.name!r}: no training examples with label {label!r}")
        train += items[:k]
        dev += items[k : k + n_dev]
    rng.shuffle(train)
    return train, dev


def _examples(spec: TaskSpec, rows: list[dict]) -> list[Example]:
    if not rows:
        raise DataError(f"task {spec.name!r}: the data is empty")
    first = rows[0]
    for col in (spec.label_column, *spec.columns):
        if col not in first:
            raise DataError(
                f"task {spec.name!r}: column {col!r} not found in the data (columns: {', '.join(map(str, first))})"
            )
    out = []
    for n, row in enumerate(rows, start=1):
        label = str(row.get(spec.label_column, "")).strip()
        if label not in spec.choices:
            raise DataError(
                f"task {spec.name!r}: row {n} has label {label!r}, which is not in choices "
                f"({', '.join(map(repr, spec.labels))})"
            )
        if any(row.get(c) is None for c in spec.columns):
            raise DataError(f"task {spec.name!r}: row {n} lacks a template column ({', '.join(spec.columns)})")
        out.append(Example({c: str(row[c]) for c in spec.columns}, label))
    return out


def _read_rows(spec: TaskSpec) -> list[dict]:
    if spec.source == "package":
        return FETCHERS[spec.package or ""]()
    path = Path(spec.path or "")
    if not path.is_file():
        raise DataError(f"task data file not found: {path}")
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".jsonl"):
        raise DataError(f"task data file {path} must be .csv or .jsonl")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise DataError(f"task data file {path} is not UTF-8 text") from None
    if suffix == ".csv":
        try:
            return list(csv.DictReader(text.splitlines()))
        except csv.Error as err:
            raise DataError(f"task data file {path} is not valid CSV: {err}") from None
    rows = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise DataError(f"task data file {path}, line {n}: not valid JSON") from None
        if not isinstance(row, dict):
            raise DataError(f"task data file {path}, line {n}: expected a JSON object")
        rows.append(row)
    return rows


def _read_hf(spec: TaskSpec, split: str) -> list[dict]:
    alternative = " Use 'rotten_tomatoes' (same domain and labels, available offline)." if spec.name == "sst2" else ""
    try:
        import datasets  # optional: only for hub tasks
    except ImportError:
        raise DataError(
            f"task {spec.name!r} reads {spec.hf} from the Hugging Face hub, which needs `pip install datasets`.{alternative}"
        ) from None
    from ..models.loader import _hub_reachable

    if not _hub_reachable():
        raise DataError(f"task {spec.name!r} needs {spec.hf} from the Hugging Face hub, which is unreachable here (offline?).{alternative}")
    name, _, config = (spec.hf or "").partition("/")
    try:
        ds = datasets.load_dataset(name, config or None, split=split)
    except Exception as err:  # the hub raises many types; report one line
        raise DataError(f"task {spec.name!r}: cannot load {spec.hf} split {split!r}: {str(err).splitlines()[0]}") from None
    return [dict(r) for r in ds]
