"""tools/device_grid.sh: the cells a GPU machine brings back are merged into a bench archive safely."""
from __future__ import annotations

import json
import subprocess
import tarfile
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "tools" / "device_grid.sh"


def _cell(root: Path, name: str, accuracy: float | None) -> None:
    cell = root / name
    cell.mkdir(parents=True)
    (cell / "metrics.jsonl").write_text('{"step": 0}\n')
    if accuracy is not None:  # finished
        (cell / "summary.json").write_text(json.dumps({"eval": {"accuracy": accuracy}}))


def _run(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=60)


def test_merge_adds_only_finished_cells_the_archive_lacks(tmp_path):
    device = tmp_path / "device"
    _cell(device, "optimizer=A,seed=0", 0.7)   # finished there, already archived here: kept as it is here
    _cell(device, "optimizer=A,seed=1", 0.6)   # finished there, unfinished here: replaced
    _cell(device, "optimizer=B,seed=0", 0.8)   # finished there, absent here: added
    _cell(device, "optimizer=B,seed=1", None)  # unfinished there: left out
    tarball = tmp_path / "cells.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        for cell in device.iterdir():
            tar.add(cell, arcname=cell.name)
    archive = tmp_path / "archive"
    _cell(archive / "cells", "optimizer=A,seed=0", 0.5)
    _cell(archive / "cells", "optimizer=A,seed=1", None)

    done = _run("merge", tarball, archive)

    assert done.returncode == 0, done.stderr
    assert "2 cells added" in done.stdout
    summary = lambda name: json.loads((archive / "cells" / name / "summary.json").read_text())["eval"]["accuracy"]
    assert summary("optimizer=A,seed=0") == 0.5
    assert summary("optimizer=A,seed=1") == 0.6
    assert summary("optimizer=B,seed=0") == 0.8
    assert not (archive / "cells" / "optimizer=B,seed=1").exists()


@pytest.mark.parametrize("args, message", [
    (("merge", "missing.tar.gz", "."), "no such file"),
    (("bench", "600", "--grid", "g.yaml"), "$OUT is not set"),
    (("nonsense",), "usage"),
])
def test_bad_use_is_one_line_and_exit_2(tmp_path, monkeypatch, args, message):
    monkeypatch.delenv("OUT", raising=False)
    done = _run(*args)
    assert done.returncode == 2
    assert message in done.stderr and len(done.stderr.strip().splitlines()) == 1
