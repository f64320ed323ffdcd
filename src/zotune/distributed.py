"""Several processes under ``torchrun``: zeroth-order training that exchanges only loss scalars.

Every process builds the same model from the same files and seed and regenerates the same
random directions from the shared step seed, so processes never exchange parameters or
gradients: one ``all_reduce`` per step combines the probe losses (:class:`LossExchange`, the
optimizers' ``loss_reducer``), every process forms the same estimate and applies the same
update, and the parameters stay identical (checked by digest, :meth:`World.compare_digests`).

* ``train.parallel: data`` (default): ``train.batch_size`` is the global batch; each process
  takes a contiguous, disjoint shard of every global batch (the batch size must be a multiple
  of the number of processes) and the exchange returns the shard-size-weighted mean of the
  processes' losses, i.e. the global-batch loss up to summation order.
* ``train.parallel: queries``: every process takes the whole batch and runs a contiguous share
  of the step's closure evaluations (SPSA: the 2q probes, so the q directions when the process
  count divides q); the exchange sums the disjoint parts, so the run is bit-identical to one
  process with the same ``n_queries``.

Backends: gloo for CPU tensors (the exchange always uses gloo), nccl for CUDA tensors (DDP of
the first-order baselines on GPUs). Collectives of the training loop wait at most
``ZOTUNE_DIST_TIMEOUT`` seconds (default 60): a process that died or hangs stops the others
with one line (:class:`~zotune.errors.TrainingError`), never a hang. Phases in which ranks
legitimately wait for rank 0 (its setup, checkpoint writes, evaluation gathers) use a second
gloo group with ``ZOTUNE_DIST_SETUP_TIMEOUT`` (default 1800).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from .config import PARALLEL as PARALLEL_MODES
from .errors import ConfigError, TrainingError, ZotuneError
from .estimators.reduce import LossReducer

TIMEOUT_ENV, SETUP_TIMEOUT_ENV = "ZOTUNE_DIST_TIMEOUT", "ZOTUNE_DIST_SETUP_TIMEOUT"
DEFAULT_TIMEOUT_S, DEFAULT_SETUP_TIMEOUT_S = 60.0, 1800.0
T = TypeVar("T")


class PeerFailed(ZotuneError):
    """Rank 0 failed during setup and reported it; the other ranks stop without repeating it."""

    quiet = True


def env_world_size() -> int:
    """``WORLD_SIZE`` as set by torchrun (1 outside it)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def _seconds(name: str, default: float) -> float:
    raw = os.environ.get(name)
    try:
        value = float(raw) if raw else default
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number of seconds") from None
    if value <= 0:
        raise ConfigError(f"{name}={raw!r} must be > 0 seconds")
    return value


# -- the process group -------------------------------------------------------------------------
@dataclass
class World:
    """This process's place among the processes of a run (``size == 1``: alone, no collective)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    timeout_s: float = DEFAULT_TIMEOUT_S
    setup_timeout_s: float = DEFAULT_SETUP_TIMEOUT_S
    slow: Any = field(default=None, repr=False)  # the long-timeout gloo group

    @property
    def is_main(self) -> bool:
        """Whether this process is rank 0."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Whether the run has several processes (collectives needed)."""
        return self.size > 1

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the body first (it creates the run directory and fills model caches);
        the others wait for it, then run the body themselves. If rank 0 fails, they stop with
        :class:`PeerFailed` (quiet: rank 0 reports the error once)."""
        if not self.distributed:
            yield
            return
        if self.is_main:
            try:
                yield
            except BaseException as err:
                self.broadcast(str(err).splitlines()[0] if str(err) else type(err).__name__)
                raise
            self.broadcast(None)
        else:
            failed = self.broadcast(None)
            if failed is not None:
                raise PeerFailed(f"rank 0 stopped during setup: {failed}")
            yield

    def broadcast(self, obj: T) -> T:
        """Rank 0's ``obj`` on every rank (long timeout)."""
        if not self.distributed:
            return obj
        box = [obj]
        _collective("waiting for rank 0", self.setup_timeout_s, dist.broadcast_object_list, box, src=0, group=self.slow)
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank (long timeout)."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.size
        _collective("gathering results", self.setup_timeout_s, dist.all_gather_object, out, obj, group=self.slow)
        return out

    def barrier(self) -> None:
        """Wait for every rank (long timeout): after rank 0 alone wrote a checkpoint."""
        if self.distributed:
            _collective("waiting for rank 0", self.setup_timeout_s, dist.barrier, group=self.slow)

    def compare_digests(self, digest: str, when: str) -> list[str]:
        """Every rank's parameter digest (a hex SHA-256); a mismatch is a TrainingError."""
        if not self.distributed:
            return [digest]
        mine = torch.tensor(list(digest.encode()), dtype=torch.uint8)
        out = [torch.empty_like(mine) for _ in range(self.size)]
        _collective("comparing parameters", self.setup_timeout_s, dist.all_gather, out, mine, group=self.slow)
        digests = [bytes(t.tolist()).decode() for t in out]
        if len(set(digests)) > 1:
            differing = ", ".join(f"rank {r} {d[:12]}" for r, d in enumerate(digests))
            raise TrainingError(f"the parameters differ across processes {when} (SHA-256 {differing}): the ranks "
                                "ran different code, data or hardware; the run stops here")
        return digests

    def shard(self, indices: Sequence[T]) -> list[T]:
        """This rank's contiguous share of a global batch (data parallel; its size divides evenly)."""
        n = len(indices) // self.size
        return list(indices[self.rank * n : (self.rank + 1) * n])

    def batch_share(self, items: Sequence[T], batch_size: int) -> list[T]:
        """The items of batches ``rank, rank + size, ...`` of ``items`` (sharded evaluation: every
        batch is the one a single process would form)."""
        starts = range(self.rank * batch_size, len(items), self.size * batch_size)
        return [x for s in starts for x in items[s : s + batch_size]]

    def gather_batches(self, mine: list[T], batch_size: int) -> list[T]:
        """Inverse of :meth:`batch_share`: every rank's results, back in the items' order."""
        shares = [[s[i : i + batch_size] for i in range(0, len(s), batch_size)] for s in self.gather(mine)]
        out: list[T] = []
        for b in range(sum(len(s) for s in shares)):
            out += shares[b % self.size][b // self.size]
        return out


SINGLE = World()


def _backend() -> str:
    return "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"


@contextlib.contextmanager
def world_from_env() -> Iterator[World]:
    """The process group of a torchrun launch (``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/
    ``MASTER_ADDR``/``MASTER_PORT``), destroyed on exit; :data:`SINGLE` outside torchrun."""
    size = env_world_size()
    if size <= 1:
        yield SINGLE
        return
    timeout, setup = _seconds(TIMEOUT_ENV, DEFAULT_TIMEOUT_S), _seconds(SETUP_TIMEOUT_ENV, DEFAULT_SETUP_TIMEOUT_S)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    _collective("joining the process group", setup, dist.init_process_group, backend=_backend(),
                timeout=timedelta(seconds=timeout))
    try:
        slow = dist.new_group(backend="gloo", timeout=timedelta(seconds=setup))
        yield World(dist.get_rank(), dist.get_world_size(), local_rank, timeout, setup, slow)
    finally:
        dist.destroy_process_group()


def _collective(what: str, timeout_s: float, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run a collective; a peer that died or did not answer in time becomes one line."""
    try:
        return fn(*args, **kwargs)
    except RuntimeError as err:  # torch.distributed.DistError and gloo's RuntimeErrors
        text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        detail = re.sub(r"^\[[^\]]*\]\s*", "", text).split(". ")[0][:160]  # gloo: "[file:line] what. advice"
        raise TrainingError(f"{what} failed: another process stopped, or did not answer within {timeout_s:g} s "
                            f"({detail}); the last checkpoint is intact: run the same command again to resume") from None


# -- the loss exchange -------------------------------------------------------------------------
class LossExchange(LossReducer):
    """The optimizers' ``loss_reducer`` across processes: one all_reduce (float64) per call.

    ``data``: every process runs every evaluation on its shard; the result is
    ``sum_r w_r v_r / sum_r w_r`` with ``w_r`` = :attr:`weight`, the shard's example count.
    ``queries``: evaluation ``k`` of ``n`` runs on rank ``k * size // n`` alone, with the whole
    batch; the result is the sum, which is exact (every other rank contributes 0.0).

    Each call also carries this process's stop request (SIGTERM/SIGINT seen, :attr:`stop`), so
    all processes agree, at no extra collective, to stop after the same step
    (:attr:`stop_agreed`). :attr:`bytes` counts the payload this process contributed to the
    collectives (8 bytes per value), :attr:`calls` the collectives.
    """

    def __init__(self, world: World, parallel: str = "data", stop: Callable[[], bool] = lambda: False):
        if parallel not in PARALLEL_MODES:
            raise ConfigError(f"train.parallel must be one of {', '.join(PARALLEL_MODES)}, got {parallel!r}")
        self.world, self.parallel, self.stop = world, parallel, stop
        self.weight = 1.0
        self.step = 0
        self.stop_agreed = False
        self.calls = 0
        self.bytes = 0

    def begin(self, step: int, n_examples: int) -> None:
        """A new training step (1-based, for messages); ``n_examples`` on this rank (data parallel)."""
        self.step, self.weight = step, float(n_examples)

    def runs_here(self, n: int) -> list[bool]:
        """``data``: every evaluation; ``queries``: evaluation ``k`` of ``n`` on rank ``k * size // n`` only."""
        if self.parallel == "data":
            return [True] * n
        return [k * self.world.size // n == self.world.rank for k in range(n)]

    def reduce(self, values: list[float]) -> list[float]:
        """One float64 all_reduce of the values and the stop flag: the mean weighted by shard size (``data``) or the
        sum (``queries``); updates ``stop_agreed``."""
        n = len(values)
        data = self.parallel == "data"
        payload = [self.weight * v for v in values] + [self.weight] if data else list(values)
        payload.append(1.0 if self.stop() else 0.0)
        t = torch.tensor(payload, dtype=torch.float64)
        if self.world.distributed:
            self.all_reduce(t)
        self.calls += 1
        self.bytes += t.numel() * t.element_size()
        out = t.tolist()
        self.stop_agreed = self.stop_agreed or out[-1] > 0
        return [v / out[n] for v in out[:n]] if data else out[:n]


    def all_reduce(self, t: torch.Tensor) -> None:
        """Sum ``t`` over the processes, in place (the one collective of :meth:`reduce`)."""
        _collective(f"the loss exchange of step {self.step}", self.world.timeout_s, dist.all_reduce, t)


def check_batch(batch_size: int, world_size: int, parallel: str) -> None:
    """Data parallel: the global batch splits evenly across processes, or a ConfigError."""
    if world_size <= 1 or parallel != "data":
        return
    if batch_size < world_size:
        raise ConfigError(f"train.batch_size {batch_size} is smaller than the {world_size} processes: each takes an "
                          f"equal share of the global batch; use a multiple of {world_size}")
    if batch_size % world_size:
        raise ConfigError(f"train.batch_size {batch_size} is not a multiple of the {world_size} processes: each takes "
                          f"an equal share of the global batch; use e.g. {batch_size // world_size * world_size or world_size} "
                          f"or {(batch_size // world_size + 1) * world_size}")


def check_queries(n_evaluations: int, world_size: int, parallel: str) -> None:
    """Query parallel: at least one closure evaluation per process and step, or a ConfigError."""
    if parallel == "queries" and world_size > n_evaluations:
        raise ConfigError(f"train.parallel=queries shares a step's {n_evaluations} probes among the processes, and there "
                          f"are {world_size}: raise optimizer.n_queries, or use train.parallel=data")


# -- first-order baselines: torch's DistributedDataParallel ------------------------------------
class _DDP(torch.nn.parallel.DistributedDataParallel):
    """DDP that exposes the wrapped model as ``get_base_model()`` (as peft does), so callers that
    read ``forward``'s keyword arguments (``position_ids``, ``logits_to_keep``) find them."""

    def get_base_model(self) -> torch.nn.Module:
        return self.module


def data_parallel(model: torch.nn.Module, counter: dict[str, int]) -> torch.nn.Module:
    """``model`` under DDP; every gradient all_reduce adds its bucket's bytes to ``counter["bytes"]``."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    def counting_allreduce(state, bucket):  # no annotations: DDP checks them, and here they would be strings
        state["bytes"] += bucket.buffer().numel() * bucket.buffer().element_size()
        return default_hooks.allreduce_hook(None, bucket)

    device = next(model.parameters()).device
    wrapped = _DDP(model, device_ids=[device] if device.type == "cuda" else None)
    wrapped.register_comm_hook(counter, counting_allreduce)
    return wrapped


# -- `zotune train --nproc N`: torch's elastic launcher ----------------------------------------
def launch(nproc: int, argv: list[str]) -> int:
    """Run ``python -m zotune ARGV`` in ``nproc`` local processes through torch's elastic launcher
    (``torchrun --standalone``). The workers report their own errors; returns an exit status."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    logging.getLogger("torch.distributed").setLevel(logging.ERROR)  # the launcher's banners
    try:
        run(parse_args(["--standalone", f"--nproc-per-node={nproc}", "-m", "zotune", *argv]))
    except ChildFailedError as err:
        rank, failure = err.get_first_failure()
        if failure.exitcode < 0:  # killed by a signal: no line of its own
            print(f"zotune: error: rank {rank} was killed ({failure.signal_name()})", flush=True, file=sys.stderr)
            return 1
        return failure.exitcode
    except SignalException as err:
        print(f"zotune: stopped by {err.sigval.name}", flush=True, file=sys.stderr)
        return 130
    return 0

