"""Resumable checkpoints: safetensors + JSON (no pickle), written atomically, verified on load.

``RUN/checkpoints/step-000120/`` holds

* ``state.safetensors``: every tensor needed to continue: the trainable weights
  (``weights/<name>``), the optimizers' state (``optimizer/...``, ``fo_optimizer/...``: momentum,
  Adam moments, JAGUAR's memory, torch.optim's buffers) and the torch RNG state (``rng/...``);
* ``state.json``: the loop's :class:`Progress` (step, forward passes, losses and dev metrics for
  the plot, zero-shot metrics), the number of trajectory records, the non-tensor rest of the
  optimizer state dicts (tensors replaced by ``{"__tensor__": key}``, see :func:`split_state`)
  and the SHA-256 of ``state.safetensors``.

A checkpoint is written into ``.step-000120.tmp/``, fsynced, then renamed into place, so a
kill leaves either the whole checkpoint or none; the newest :data:`KEEP` are kept. Loading
takes the newest checkpoint whose files parse and whose checksum matches; a damaged one is
reported in one line, removed, and the previous one is used.

Data order is a pure function of (step, seed) (``trainer.batch_indices``) and the ZO
optimizers' randomness a function of (seed, step), so step + weights + optimizer state + RNG
continue a run bit for bit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from ..errors import DataError, TrainingError
from ..models.offload import release
from ..optim.base import ZOOptimizer
from ..tensorfile import TensorReader
from ..trajectory import TrajectoryWriter
from .weights import save_weights

TENSORS, META = "state.safetensors", "state.json"
FORMAT, VERSION = "zotune-checkpoint", 1
KEEP = 2  # checkpoints kept: the newest, and one to fall back on
_TENSOR, _TUPLE, _ITEMS = "__tensor__", "__tuple__", "__items__"
_STEP_DIR = re.compile(r"step-(\d+)")


class RunInterrupted(KeyboardInterrupt):
    """SIGTERM/SIGINT during training: the step finished and a checkpoint was written.
    A KeyboardInterrupt, so ``except Exception`` does not swallow it; the message is the CLI's line."""


# -- state <-> (tensors, JSON) ---------------------------------------------------------------
def split_state(obj: Any, prefix: str = "") -> tuple[dict[str, torch.Tensor], Any]:
    """Split nested state (dicts, lists, tuples, tensors, scalars; e.g. an optimizer's
    ``state_dict()``) into flat ``{key: tensor}`` for safetensors and a JSON-able skeleton in
    which each tensor is ``{"__tensor__": key}``; keys are paths (``optimizer/state/3/exp_avg``).
    Tuples and dicts with non-string keys (torch.optim's ``state``) are marked, so
    :func:`join_state` rebuilds the object exactly."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(x: Any, path: str) -> Any:
        path = path.lstrip("/")
        if isinstance(x, torch.Tensor):
            if path in tensors:
                raise ValueError(f"two tensors at {path!r}")
            tensors[path] = x  # read when written (save_weights: one tensor at a time)
            return {_TENSOR: path}
        if isinstance(x, dict):
            if all(isinstance(k, str) and not k.startswith("__") for k in x):
                return {k: walk(v, f"{path}/{k}") for k, v in x.items()}
            if not all(isinstance(k, (str, int, float, bool)) or k is None for k in x):
                raise TypeError(f"cannot checkpoint a dict with {type(next(iter(x))).__name__} keys at {path!r}")
            return {_ITEMS: [[k, walk(v, f"{path}/{k}")] for k, v in x.items()]}
        if isinstance(x, (list, tuple)):
            items = [walk(v, f"{path}/{i}") for i, v in enumerate(x)]
            return {_TUPLE: items} if isinstance(x, tuple) else items
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        raise TypeError(f"cannot checkpoint a {type(x).__name__} at {path!r}")

    return tensors, walk(obj, prefix)


def join_state(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`split_state` (``KeyError`` if a tensor is missing)."""
    if isinstance(skeleton, list):
        return [join_state(v, tensors) for v in skeleton]
    if isinstance(skeleton, dict):
        if _TENSOR in skeleton:
            return tensors[skeleton[_TENSOR]]
        if _TUPLE in skeleton:
            return tuple(join_state(v, tensors) for v in skeleton[_TUPLE])
        if _ITEMS in skeleton:
            return {k: join_state(v, tensors) for k, v in skeleton[_ITEMS]}
        return {k: join_state(v, tensors) for k, v in skeleton.items()}
    return skeleton


# -- the loop's progress ---------------------------------------------------------------------
@dataclass
class Progress:
    """What the training loop has done: all a resumed run needs besides tensors."""

    step: int = 0  # steps done
    forwards: int = 0
    non_finite: int = 0  # consecutive non-finite losses
    losses: list[float] = field(default_factory=list)  # one per step, for the plot
    dev: list[tuple[int, float]] = field(default_factory=list)  # (step, dev metric)
    zero_shot: dict[str, float] | None = None  # test metrics before training, once measured
    wall_s: float = 0.0  # training wall time up to `step`, across resumes
    eval_s: float = 0.0  # the part of wall_s spent in evaluations during training (dev, test)

    def start_clock(self) -> None:
        """Start the wall clock so that :meth:`elapsed` goes on from ``wall_s`` (a resumed run's time)."""
        self._t0 = time.perf_counter() - self.wall_s

    def elapsed(self) -> float:
        """Training wall time so far in seconds, resumes included."""
        return time.perf_counter() - self._t0

    def to_json(self) -> dict[str, Any]:
        """The progress as plain data, ``wall_s`` brought up to date while the clock runs."""
        if hasattr(self, "_t0"):
            self.wall_s = round(self.elapsed(), 3)
        return dataclasses.asdict(self)


# -- writing and reading ----------------------------------------------------------------------
Optimizers = dict[str, torch.optim.Optimizer | None]


@dataclass
class Checkpoint:
    """A verified checkpoint: its progress and optimizer states in memory, its weights read as restored."""

    path: Path
    progress: Progress
    trajectory_records: int
    state: dict[str, Any]  # {"weights": StoredWeights (name -> tensor), "optimizers": {key: state_dict}, "rng": {...}}

    @torch.no_grad()
    def restore(self, named: list[tuple[str, torch.nn.Parameter]], optimizers: Optimizers) -> None:
        """Weights, optimizer states and RNG back into the live objects. A ZO optimizer takes its state's tensors
        as read (no copy), so a checkpoint restores once."""
        weights = self.state["weights"]
        if set(weights) != {n for n, _ in named}:
            self._misfit(f"{len(weights)} tensors saved, {len(named)} trainable")
        for name, p in named:
            stored = weights[name]  # read now (StoredWeights), dropped after the copy
            if stored.shape != p.shape or stored.dtype != p.dtype:
                self._misfit(f"{name} is {stored.dtype} {tuple(stored.shape)}, the model has {p.dtype} {tuple(p.shape)}")
            p.copy_(stored)
            del stored
            release(p)
        saved = self.state["optimizers"]
        if saved.keys() != {k for k, o in optimizers.items() if o is not None}:
            self._misfit(f"optimizers {sorted(saved)} saved")
        for key, state_dict in saved.items():
            optimizer = optimizers[key]
            try:
                if isinstance(optimizer, ZOOptimizer):
                    optimizer.load_state_dict(state_dict, take=True)  # its tensors were read for it alone
                else:
                    optimizer.load_state_dict(state_dict)
            except (ValueError, KeyError) as err:
                self._misfit(f"{key}: {err}")
        set_rng_state(self.state["rng"])

    def _misfit(self, detail: str) -> None:
        raise DataError(f"checkpoint {self.path} does not fit this model and optimizer ({detail}); "
                        "pass --overwrite to start over")


class Checkpoints:
    """The checkpoints of one run directory (``RUN/checkpoints``)."""

    def __init__(self, root: Path, every: int, log: Callable[[str], Any] = print):
        self.root, self.every, self.log = Path(root), every, log

    def due(self, step: int) -> bool:
        """Whether a checkpoint is due after ``step`` (every ``every`` steps; never when 0)."""
        return bool(self.every) and step % self.every == 0

    def save(self, progress: Progress, named: list[tuple[str, torch.nn.Parameter]], optimizers: Optimizers,
             trajectory: TrajectoryWriter | None = None) -> Path:
        """Write a checkpoint of ``progress.step`` atomically, drop all but the newest :data:`KEEP`."""
        if trajectory is not None:
            trajectory.sync()  # the checkpoint never names records that are not on disk
        state = {"weights": dict(named), "rng": rng_state(),
                 "optimizers": {k: o.state_dict() for k, o in optimizers.items() if o is not None}}
        tensors, skeleton = split_state(state)
        name = f"step-{progress.step:06d}"
        tmp, final = self.root / f".{name}.tmp", self.root / name
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            save_weights(tmp / TENSORS, list(tensors.items()))  # an offloaded model tensor by tensor
            _fsync(tmp / TENSORS)
            meta = {"format": FORMAT, "version": VERSION, "step": progress.step, "progress": progress.to_json(),
                    "trajectory_records": trajectory.records if trajectory is not None else 0,
                    "sha256": file_sha256(tmp / TENSORS), "state": skeleton}
            (tmp / META).write_text(json.dumps(meta) + "\n", encoding="utf-8")
            _fsync(tmp / META)
            _fsync(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync(self.root)
        except (OSError, SafetensorError) as err:  # e.g. a full disk
            shutil.rmtree(tmp, ignore_errors=True)
            raise TrainingError(f"cannot write checkpoint {final}: {getattr(err, 'strerror', None) or err}") from None
        for old in self._dirs()[:-KEEP]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def latest(self) -> Checkpoint | None:
        """The newest good checkpoint; damaged ones (and unfinished writes) are reported and removed.
        None if there is none to resume from."""
        for tmp in self.root.glob(".step-*.tmp"):
            shutil.rmtree(tmp, ignore_errors=True)
        for path in reversed(self._dirs()):
            try:
                return _read(path)
            except (OSError, ValueError, KeyError, TypeError, SafetensorError, DataError) as err:
                detail = f"{type(err).__name__}: {err}" if not isinstance(err, _Damaged) else str(err)
                self.log(f"checkpoint {path} is damaged ({detail}); removed it, falling back to the previous one")
                shutil.rmtree(path, ignore_errors=True)
        return None

    def clear(self) -> None:
        """Remove every checkpoint: a finished run keeps its weights, trajectory and summary,
        not copies of the weights it had on the way (540 MB each for the default model)."""
        shutil.rmtree(self.root, ignore_errors=True)

    def _dirs(self) -> list[Path]:
        """Checkpoint directories, oldest first."""
        if not self.root.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.root.iterdir() if (m := _STEP_DIR.fullmatch(p.name)) and p.is_dir()]
        return [p for _, p in sorted(found)]


class _Damaged(ValueError):
    pass


def read_checkpoint(path: Path) -> Checkpoint:
    """The checkpoint in ``path``, which another process chose with :meth:`Checkpoints.latest`
    (the other ranks of a run read the one rank 0 resumes from)."""
    try:
        return _read(Path(path))
    except (OSError, ValueError, KeyError, TypeError, SafetensorError, DataError) as err:
        raise DataError(f"cannot read checkpoint {path}: {err}") from None


def _read(path: Path) -> Checkpoint:
    meta = json.loads((path / META).read_text(encoding="utf-8"))
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise _Damaged(f"{META} is not a {FORMAT} version {VERSION}")
    if file_sha256(path / TENSORS) != meta["sha256"]:
        raise _Damaged(f"{TENSORS} does not match its SHA-256")
    skeleton, reader = meta["state"], TensorReader([path / TENSORS])
    weights = skeleton.get("weights") if isinstance(skeleton, dict) else None
    progress = Progress(**meta["progress"])
    if progress.step != meta["step"] or not isinstance(weights, dict) or not all(
            isinstance(v, dict) and isinstance(v.get(_TENSOR), str) and v[_TENSOR] in reader for v in weights.values()):
        raise _Damaged(f"{META} is inconsistent")
    state = join_state({k: v for k, v in skeleton.items() if k != "weights"}, _OnRead(reader))
    state["weights"] = StoredWeights(reader, {name: v[_TENSOR] for name, v in weights.items()})
    return Checkpoint(path, progress, int(meta["trajectory_records"]), state)


class _OnRead:
    """``reader[key]``: a tensor of the checkpoint's file, read when asked (for :func:`join_state`)."""

    def __init__(self, reader: TensorReader):
        self.reader = reader

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.reader.read(key)


class StoredWeights(Mapping[str, torch.Tensor]):
    """A checkpoint's weights by parameter name, each read from the file when asked: restoring an offloaded
    model (``model.offload``) holds one of its tensors in memory at a time, never the model."""

    def __init__(self, reader: TensorReader, keys: dict[str, str]):
        self._reader, self._keys = reader, keys

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._reader.read(self._keys[name])

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def rng_state() -> dict[str, Any]:
    """torch's CPU RNG state, and every CUDA device's when CUDA is available."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` saved (the CUDA part only where CUDA is available)."""
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def file_sha256(path: Path) -> str:
    """A file's SHA-256, read 16 MB at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- stopping on a signal ---------------------------------------------------------------------
@dataclass
class StopRequest:
    """The signal :func:`stop_on_signal` received, if any: the loop stops after its step once one was."""

    signal: str | None = None  # the name of the signal received, once one was


@contextlib.contextmanager
def stop_on_signal() -> Iterator[StopRequest]:
    """While inside: SIGTERM/SIGINT only set ``request.signal`` (the loop finishes its step,
    checkpoints and stops); a second signal stops at once (KeyboardInterrupt). The previous
    handlers are restored on exit. Outside the main thread, signals are left alone."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return

    def handler(signum: int, frame: Any) -> None:
        if request.signal:
            raise KeyboardInterrupt
        request.signal = signal.Signals(signum).name

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield request
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
