"""Offline task data from BIG-bench (``source: bigbench``): a task YAML names a BIG-bench JSON task and
how its examples become rows in its ``bigbench:`` key (:class:`BigBenchTask`), e.g.

    bigbench: {task: intent_recognition, pattern: "(?s)Utterance: (?P<utterance>.+)"}

BIG-bench (Srivastava et al. 2022, Apache-2.0) JSON tasks, from the sdist of PyPI ``bigbench==1.0.0`` (358 MB). ``pip
download`` refuses that release (its metadata has a direct-URL dependency), so the archive is
found on the package index's simple page (``$PIP_INDEX_URL``, else pypi.org; the pinned
files.pythonhosted.org address as a fallback) and streamed: hashed (SHA-256, checked before
anything is kept) and read in one pass, keeping only the ``task.json`` of every built-in BIG-bench
task (:func:`builtin_bigbench_tasks`) and of the task asked for. The archive itself never touches the disk. ``$ZOTUNE_BIGBENCH_URL``
(a URL or a local path of that same archive) replaces the index, e.g. on a machine without
network access.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import sys
import tarfile
import urllib.parse
import urllib.request
import zlib
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from ..cache import cache_dir
from ..errors import ConfigError, DataError
from .builtin import builtin_tasks


BIGBENCH_VERSION = "1.0.0"
BIGBENCH_ARCHIVE = f"bigbench-{BIGBENCH_VERSION}.tar.gz"
BIGBENCH_SHA256 = "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"
BIGBENCH_PINNED_URL = ("https://files.pythonhosted.org/packages/95/f8/c019b3579df548a04cac12342cfcb878e50ddf6cfcd7"
                       f"fddba8cfc721c157/{BIGBENCH_ARCHIVE}")
BIGBENCH_URL_ENV = "ZOTUNE_BIGBENCH_URL"  # a URL or local path of the archive, instead of the index
BIGBENCH_SIZE = "358 MB"
BIGBENCH_SOURCE = f"BIG-bench {BIGBENCH_VERSION} sdist (PyPI)"


@dataclass(frozen=True)
class BigBenchTask:
    """One BIG-bench JSON task and how its examples become rows (a task YAML's ``bigbench:`` key,
    with ``kind`` its ``type``).

    ``kind``: ``multiple_choice`` -> ``{..., "candidates": [target_scores keys, in file order],
    "label": index of the top score}``; ``classification`` -> ``{..., "label": top-scoring key}``
    (for a fixed label set, mapped to continuations by the task's ``choices``); ``generation``
    -> ``{..., "answers": [target, ...]}``. ``pattern`` (a regex with named groups, matching the
    whole ``input``) splits the input into template fields; without it the field is ``input``.
    ``rotate``: move the gold candidate to position ``row number % candidates`` (for files that
    always list it first), so that the few-shot sampler, which samples per gold position, sees
    every position. Examples with a tie for the top score, no positive score or an empty target
    are skipped.
    """

    path: str  # below bigbench/benchmark_tasks/, e.g. "cause_and_effect/one_sentence"
    kind: str
    pattern: str | None = None
    rotate: bool = False

    @classmethod
    def from_spec(cls, mapping: object, kind: str) -> BigBenchTask:
        """A task YAML's ``bigbench:`` mapping (``task``, optional ``pattern`` and ``rotate``); one
        ConfigError line if it is malformed."""
        if not isinstance(mapping, dict) or not isinstance(mapping.get("task"), str) or not mapping["task"].strip():
            raise ConfigError(f"task.bigbench must be a mapping with 'task' (a folder below "
                              f"bigbench/benchmark_tasks/, e.g. intent_recognition), got {mapping!r}")
        unknown = sorted(set(map(str, mapping)) - {"task", "pattern", "rotate"})
        if unknown:
            raise ConfigError(f"unknown task.bigbench key {unknown[0]!r}; valid keys: task, pattern, rotate")
        pattern, rotate = mapping.get("pattern"), mapping.get("rotate", False)
        if pattern is not None:
            try:
                groups = re.compile(pattern).groupindex if isinstance(pattern, str) else None
            except re.error as err:
                raise ConfigError(f"task.bigbench.pattern {pattern!r} is not a valid regex: {err}") from None
            if not groups:
                raise ConfigError(f"task.bigbench.pattern must be a regex with named groups (the template's "
                                  f"fields), got {pattern!r}")
        if not isinstance(rotate, bool):
            raise ConfigError(f"task.bigbench.rotate must be true or false, got {rotate!r}")
        return cls(mapping["task"].strip("/"), kind, pattern, rotate)


@cache
def builtin_bigbench_tasks() -> dict[str, BigBenchTask]:
    """The built-in tasks that read BIG-bench, by task name (fetched together, in one download).
    Sizes after skipping, on bigbench 1.0.0: cause_and_effect 51 pairs (the file lists the right
    one first, always: rotated), disambiguation_qa 258, winowhy 2,865, strategyqa 2,290, vitaminc
    54,668, multiemo 57,466, intent_recognition 693, presuppositions_as_nli 735, disfl_qa 8,000."""
    return {name: BigBenchTask.from_spec(raw["bigbench"], raw.get("type", "classification"))
            for name, raw in builtin_tasks().items() if "bigbench" in raw}


def _task(task: str | BigBenchTask) -> BigBenchTask:
    return task if isinstance(task, BigBenchTask) else builtin_bigbench_tasks()[task]


def bigbench_path(task: str | BigBenchTask) -> Path:
    """Where a BIG-bench task's ``task.json`` lives in the cache (it may not be fetched yet); ``task``:
    a built-in task's name, or a :class:`BigBenchTask`."""
    return cache_dir("data", "bigbench").joinpath(*_task(task).path.split("/"), "task.json")


def fetch_bigbench(also: BigBenchTask | None = None) -> dict[str, Path]:
    """Every built-in BIG-bench task (and ``also``) in the cache, the missing ones in one download;
    their paths by task name (``also`` by its path)."""
    tasks: dict[str, BigBenchTask] = {**builtin_bigbench_tasks(), **({also.path: also} if also else {})}
    paths = {name: bigbench_path(t) for name, t in tasks.items()}
    missing = {f"bigbench/benchmark_tasks/{tasks[name].path}/task.json": p for name, p in paths.items() if not p.is_file()}
    if missing:
        _fetch_bigbench_members(missing)
    return paths


def read_bigbench(task: str | BigBenchTask) -> list[dict]:
    """Rows of one BIG-bench task (a built-in task's name, or a :class:`BigBenchTask`), fetching the
    data if needed."""
    spec = _task(task)
    path = bigbench_path(spec)
    if not path.is_file():
        fetch_bigbench(spec)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{path} is not valid JSON ({err}); delete it to fetch it again") from None
    return bigbench_rows(data, spec, str(path))


def bigbench_rows(data: dict, spec: BigBenchTask, where: str = "task.json") -> list[dict]:
    """A BIG-bench task's ``{"examples": [{"input", "target_scores" | "target"}]}`` -> rows."""
    examples = data.get("examples") if isinstance(data, dict) else None
    if not isinstance(examples, list):
        raise DataError(f"{where} has no \"examples\" list")
    rows = []
    for n, ex in enumerate(examples, start=1):
        text = str(ex.get("input", ""))
        if spec.pattern is None:
            row: dict = {"input": text}
        else:
            match = re.fullmatch(spec.pattern, text)
            if match is None:
                raise DataError(f"{where}, example {n}: input does not have the expected layout: {text[:80]!r}")
            row = {k: v.strip() for k, v in match.groupdict().items()}
        if spec.kind == "generation":
            target = ex.get("target")
            answers = [str(t) for t in (target if isinstance(target, list) else [target])
                       if t is not None and str(t).strip()]
            if not answers:
                continue
            rows.append({**row, "answers": answers})
            continue
        scores = ex.get("target_scores") or {}
        top = max(scores.values(), default=0)
        gold = [c for c, s in scores.items() if s == top]
        if top <= 0 or len(gold) != 1:  # a tie or no right answer: not a single-answer example
            continue
        if spec.kind == "classification":
            rows.append({**row, "label": gold[0]})
            continue
        candidates = list(scores)
        index = candidates.index(gold[0])
        if spec.rotate:
            shift = (index - len(rows)) % len(candidates)
            candidates = candidates[shift:] + candidates[:shift]
            index = candidates.index(gold[0])
        rows.append({**row, "candidates": candidates, "label": index})
    return rows


def _index_url() -> str:
    return (os.environ.get("PIP_INDEX_URL") or "https://pypi.org/simple").rstrip("/") + "/bigbench/"


def _shown(url: str) -> str:
    """A URL for messages: without user:password@ (an index URL may carry credentials)."""
    parts = urllib.parse.urlsplit(url)
    return parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl() if parts.netloc else url


def _archive_urls() -> tuple[list[str], list[str]]:
    """Where to get the archive, best first, and why the package index gave none (for messages).

    ``$ZOTUNE_BIGBENCH_URL`` alone if set; else the archive's link on the simple index page
    (PEP 503; its ``#sha256=`` must match, when given), then the pinned files.pythonhosted.org URL.
    """
    given = os.environ.get(BIGBENCH_URL_ENV)
    if given:
        return [given if "://" in given else Path(given).resolve().as_uri()], []
    index = _index_url()
    urls, notes = [], []
    try:
        with urllib.request.urlopen(urllib.request.Request(index, headers={"Accept": "text/html"}),
                                    timeout=30) as resp:
            page = resp.read().decode("utf-8", "replace")
        for href in re.findall(r"""<a\s[^>]*href=["']([^"']+)["']""", page, flags=re.I):
            link, _, fragment = urllib.parse.urljoin(index, href).partition("#")
            if link.rsplit("/", 1)[-1] == BIGBENCH_ARCHIVE:
                if fragment.startswith("sha256=") and fragment[7:].lower() != BIGBENCH_SHA256:
                    notes.append(f"{_shown(index)} lists a different {BIGBENCH_ARCHIVE}")
                else:
                    urls.append(link)
        if not urls and not notes:
            notes.append(f"{_shown(index)} does not list {BIGBENCH_ARCHIVE}")
    except (OSError, ValueError, http.client.HTTPException) as err:
        notes.append(f"{_shown(index)}: {_reason(err)}")
    return list(dict.fromkeys(urls + [BIGBENCH_PINNED_URL])), notes


def _reason(err: BaseException) -> str:
    reason = getattr(err, "reason", None) or err
    return (str(reason).strip().splitlines() or [type(err).__name__])[0]


class _Tee:
    """A readable stream that hashes (and counts on a progress bar) every byte read through it."""

    def __init__(self, raw, bar) -> None:
        self.raw, self.bar, self.sha = raw, bar, hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.sha.update(data)
        self.bar.update(len(data))
        return data

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


def _fetch_bigbench_members(targets: dict[str, Path]) -> None:
    """Stream the archive once: keep ``targets`` (member path below the top folder -> cache
    path), written atomically once the whole archive's SHA-256 has checked out."""
    from tqdm import tqdm

    urls, notes = _archive_urls()
    print(f"zotune: fetching BIG-bench task data ({len(targets)} task.json files) from the {BIGBENCH_ARCHIVE} "
          f"sdist ({BIGBENCH_SIZE}, streamed, once) ...", file=sys.stderr, flush=True)
    resp = None
    for url in urls:
        try:
            resp = urllib.request.urlopen(url, timeout=60)
            break
        except (OSError, ValueError, http.client.HTTPException) as err:
            notes.append(f"{_shown(url)}: {_reason(err)}")
    if resp is None:
        if os.environ.get(BIGBENCH_URL_ENV):
            raise DataError(f"cannot read {BIGBENCH_ARCHIVE} (the BIG-bench task data) from ${BIGBENCH_URL_ENV}: "
                            + "; ".join(notes))
        raise DataError(f"cannot download {BIGBENCH_ARCHIVE} from PyPI (offline?), which holds the BIG-bench "
                        f"task data: {'; '.join(notes)} (or set {BIGBENCH_URL_ENV} to a copy of it)")
    partial: dict[Path, Path] = {}
    try:
        length = resp.headers.get("Content-Length")
        with resp, tqdm(total=int(length) if length and length.isdigit() else None, unit="B", unit_scale=True,
                        unit_divisor=1024, desc=BIGBENCH_ARCHIVE, file=sys.stderr, mininterval=0.5) as bar:
            tee = _Tee(resp, bar)
            with tarfile.open(fileobj=tee, mode="r|gz") as tar:
                for member in tar:
                    name = member.name.split("/", 1)[-1]  # below the top folder bigbench-1.0.0/
                    if name in targets and member.isfile() and targets[name] not in partial:
                        target = targets[name]
                        target.parent.mkdir(parents=True, exist_ok=True)
                        tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
                        partial[target] = tmp
                        with tar.extractfile(member) as src, open(tmp, "wb") as dst:
                            while chunk := src.read(1 << 20):
                                dst.write(chunk)
            tee.drain()
        got = tee.sha.hexdigest()
        if got != BIGBENCH_SHA256:
            raise DataError(f"{BIGBENCH_ARCHIVE} from {_shown(resp.geturl() or url)} does not have the expected "
                            f"SHA-256 (got {got[:16]}..., expected {BIGBENCH_SHA256[:16]}...); not using it")
        absent = sorted(name for name, target in targets.items() if target not in partial)
        if absent:
            raise DataError(f"{BIGBENCH_ARCHIVE} does not contain {absent[0]}")
        for target, tmp in partial.items():
            os.replace(tmp, target)  # atomic: concurrent readers never see a partial file
        partial.clear()
    except (OSError, EOFError, zlib.error, tarfile.TarError, http.client.HTTPException) as err:
        raise DataError(f"downloading {BIGBENCH_ARCHIVE} failed ({_shown(url)}): {_reason(err)}") from None
    finally:
        for tmp in partial.values():
            tmp.unlink(missing_ok=True)
