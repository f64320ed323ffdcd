"""The trajectory file: a zeroth-order fine-tune as its seeds and projected gradients.

MeZO's observation: given the initial weights, a ZO run is fully described, per step, by the
step seed (which names every random direction) and the projected gradients; kilobytes
instead of gigabytes. ``trajectory.bin`` in a run directory holds exactly that:

* ``MAGIC`` (8 bytes), a little-endian uint32 header length, then the header: UTF-8 JSON with
  the model identity, the SHA-256 of the initial trainable state (:func:`weights_sha256`),
  dtype, scheme, optimizer with its options, seed, and the record layout;
* fixed-size records (``RECORD_HEAD`` then ``n_values`` projected gradients, ``n_groups``
  learning rates and, when the header has ``n_extra``, that many optimizer-specific values
  (HiZOO's curvatures), float64): step (uint32), step seed (uint64), flags (uint8: 1 = skipped),
  accepted candidate (int8, ZO-SGD-Cons; 0 otherwise), loss (float64).

Records are appended and flushed as the run goes, so a killed run leaves every finished step
on disk; a partial last record (killed mid-write) is ignored when reading. A resumed run
reopens the file and cuts it back to the records its checkpoint counts (``keep=N``).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Any, BinaryIO

import torch

from .errors import DataError
from .models.offload import release
from .optim.base import StepRecord

MAGIC = b"ZOTRAJ\x00\x01"
RECORD_HEAD = struct.Struct("<IQBbd")  # step, seed, flags, accepted, loss
FILENAME = "trajectory.bin"


def record_size(n_values: int, n_groups: int, n_extra: int = 0) -> int:
    """Bytes of one record: :data:`RECORD_HEAD` and 8 per float64 value."""
    return RECORD_HEAD.size + 8 * (n_values + n_groups + n_extra)


def weights_sha256(named: Iterable[tuple[str, torch.Tensor]]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes of tensors, in the order given."""
    digest = hashlib.sha256()
    for name, p in named:
        t = p.detach().contiguous().cpu()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        release(p)  # an offloaded parameter (zotune.models.offload) leaves memory once read
    return digest.hexdigest()


class TrajectoryWriter:
    """Appends fixed-size step records after a JSON header; flushes every record.

    ``keep=N`` (a resumed run) reopens an existing file instead: its header must be the one
    given, its first N records stay, and appending continues after them."""

    def __init__(self, path: Path, header: dict[str, Any], n_values: int, n_groups: int, keep: int | None = None,
                 n_extra: int = 0):
        self.n_values, self.n_groups, self.n_extra = n_values, n_groups, n_extra
        size = record_size(n_values, n_groups, n_extra)
        header = {**header, "n_values": n_values, "n_groups": n_groups, "record_size": size,
                  **({"n_extra": n_extra} if n_extra else {})}
        blob = json.dumps(header, sort_keys=True).encode()
        head = MAGIC + struct.pack("<I", len(blob)) + blob
        self.records = 0 if keep is None else keep
        if keep is None:
            self._file: BinaryIO = open(path, "wb")
            self._file.write(head)
            self._file.flush()
            return
        try:
            self._file = open(path, "r+b")
        except OSError as err:
            raise DataError(f"cannot resume trajectory {path}: {err.strerror}; pass --overwrite to start over") from None
        end = len(head) + keep * size
        if self._file.read(len(head)) != head or os.fstat(self._file.fileno()).st_size < end:
            self._file.close()
            raise DataError(f"cannot resume {path}: its header differs from this run's or it holds fewer than "
                            f"{keep} records; pass --overwrite to start over")
        self._file.truncate(end)
        self._file.seek(end)

    def append(self, record: StepRecord) -> None:
        """Write one step's record and flush it; ValueError when its sizes differ from the header's."""
        if len(record.projected_grads) != self.n_values or len(record.lrs) != self.n_groups:
            raise ValueError(f"step {record.step}: {len(record.projected_grads)} projected gradients and "
                             f"{len(record.lrs)} lrs, the header says {self.n_values} and {self.n_groups}")
        accepted = int(record.extra.get("accepted", 0))
        extra = list(record.extra.get("values", [0.0] * self.n_extra))  # a skipped step has none
        if len(extra) != self.n_extra:
            raise ValueError(f"step {record.step}: {len(extra)} extra values, the header says {self.n_extra}")
        self._file.write(RECORD_HEAD.pack(record.step, record.seed, int(record.skipped), accepted, record.loss)
                         + struct.pack(f"<{self.n_values + self.n_groups + self.n_extra}d", *record.projected_grads,
                                       *record.lrs, *extra))
        self._file.flush()
        self.records += 1

    def sync(self) -> None:
        """Make every appended record durable (before a checkpoint names their count)."""
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        """Close the file."""
        self._file.close()


def _split_header(data: bytes, path: Path) -> tuple[dict[str, Any], int]:
    """The JSON header at the front of ``data`` and the offset where the records start; a :class:`DataError` when
    it is not a trajectory's."""
    if data[:8] != MAGIC or len(data) < 12:
        raise DataError(f"{path} is not a zotune trajectory (bad magic bytes)")
    (length,) = struct.unpack_from("<I", data, 8)
    try:
        header = json.loads(data[12 : 12 + length].decode())
    except (ValueError, UnicodeDecodeError):
        raise DataError(f"{path}: unreadable trajectory header") from None
    if not isinstance(header, dict):
        raise DataError(f"{path}: unreadable trajectory header")
    return header, 12 + length


def read_header(path: Path) -> dict[str, Any]:
    """The header alone (the records are not read); a :class:`DataError` when it is not a trajectory's."""
    try:
        with open(path, "rb") as f:
            head = f.read(12)
            if len(head) == 12 and head[:8] == MAGIC:
                head += f.read(struct.unpack_from("<I", head, 8)[0])
    except OSError as err:
        raise DataError(f"cannot read trajectory {path}: {err.strerror}") from None
    return _split_header(head, path)[0]


def read_trajectory(path: Path) -> tuple[dict[str, Any], list[StepRecord]]:
    """Header and records; a truncated last record is dropped, anything else malformed is a
    :class:`DataError`."""
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise DataError(f"cannot read trajectory {path}: {err.strerror}") from None
    header, start = _split_header(data, path)
    try:
        n_values, n_groups, n_extra = int(header["n_values"]), int(header["n_groups"]), int(header.get("n_extra", 0))
    except (ValueError, KeyError, TypeError):
        raise DataError(f"{path}: unreadable trajectory header") from None
    size = record_size(n_values, n_groups, n_extra)
    body = data[start:]
    values = struct.Struct(f"<{n_values + n_groups + n_extra}d")
    records = []
    for offset in range(0, len(body) - size + 1, size):
        step, seed, flags, accepted, loss = RECORD_HEAD.unpack_from(body, offset)
        floats = values.unpack_from(body, offset + RECORD_HEAD.size)
        extra: dict[str, Any] = {"accepted": accepted}
        if n_extra:
            extra["values"] = list(floats[n_values + n_groups :])
        records.append(StepRecord(step=step, seed=seed, query_seeds=[], projected_grads=list(floats[:n_values]),
                                  lrs=list(floats[n_values : n_values + n_groups]), loss=loss, skipped=bool(flags & 1),
                                  extra=extra))
    return header, records
