"""Seeded random directions z, regenerated on demand and never stored.

A direction is named by an integer key (derived from the step seed, the query index and the
parameter's index). Its values are produced in fixed-size chunks, each from a generator seeded
with ``mix(key, chunk_index)``, so that

* the same key gives the same z in every process, dtype and call order;
* no temporary larger than one chunk is allocated (memory O(chunk), not O(parameter));
* any chunk can be regenerated on its own, so chunks are generated on two threads at once
  (torch releases the GIL; the generator is the single-threaded part of the work) without
  changing a single value.

z is always generated in float32 and cast where it is used, so a direction does not depend on
the dtype of the weights it perturbs.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import torch

_MASK64 = (1 << 64) - 1
DISTRIBUTIONS = ("gaussian", "rademacher")  # user-facing; "coordinates" is JAGUAR's block mask
DEFAULT_CHUNK = 1 << 20


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def mix(*values: int) -> int:
    """Hash integers into a 63-bit seed; stable across processes and platforms."""
    h = 0
    for v in values:
        h = _splitmix64(h ^ (int(v) & _MASK64))
    return h >> 1


_CPU = torch.device("cpu")


def _fill_rademacher(out: torch.Tensor, gen: torch.Generator) -> None:
    """+-1 with equal probability: 8 signs per random byte."""
    n = out.numel()
    packed = torch.randint(0, 256, ((n + 7) // 8,), dtype=torch.uint8, generator=gen, device=out.device)
    shifts = torch.arange(8, dtype=torch.uint8, device=out.device)
    bits = (packed.unsqueeze(1) >> shifts).bitwise_and_(1).view(-1)[:n]
    out.copy_(bits).mul_(2.0).sub_(1.0)


ChunkFn = Callable[[int, int, torch.Tensor], None]


class DirectionSampler:
    """Produces the chunks of z for a key.

    ``apply(numel, key, fn)`` calls ``fn(start, stop, z)`` for every chunk, several chunks at
    once on ``threads`` threads (one when torch itself has one: ``torch.get_num_threads()``):
    ``fn`` must touch only its own slice ``[start, stop)``.
    ``chunks(numel, key)`` yields the same chunks in order, on the calling thread. Either way
    ``z`` is a view into a reused float32 scratch buffer, valid until ``fn`` returns or the
    next iteration.
    """

    def __init__(
        self, distribution: str = "gaussian", chunk_size: int = DEFAULT_CHUNK, threads: int = 2, fraction: float = 1.0
    ):
        if distribution not in (*DISTRIBUTIONS, "coordinates"):
            raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")
        if distribution == "coordinates" and not 0.0 < fraction <= 1.0:
            raise ValueError(f"the fraction of coordinates must be in (0, 1], got {fraction!r}")
        self.fraction = fraction
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.distribution = distribution
        self.chunk_size = chunk_size
        self.threads = max(1, threads)
        self._local = threading.local()
        self._executor: ThreadPoolExecutor | None = None

    def _fill(self, key: int, index: int, length: int, device: torch.device) -> torch.Tensor:
        """Chunk ``index`` of z(key), from this thread's own generator and scratch on ``device``.

        On an accelerator z comes from that device's generator: the same key gives the same z
        on every run of that device type, not the same values as on the CPU."""
        per_device = self._local.__dict__.setdefault("per_device", {})
        if device not in per_device:
            per_device[device] = [torch.Generator(device=device), torch.empty(0, device=device)]
        gen, scratch = per_device[device]
        if scratch.numel() < length:
            scratch = per_device[device][1] = torch.empty(length, dtype=torch.float32, device=device)
        z = scratch[:length]
        gen.manual_seed(mix(key, index))
        if self.distribution == "gaussian":
            z.normal_(generator=gen)
        elif self.distribution == "rademacher":
            _fill_rademacher(z, gen)
        else:  # coordinates: 1 on a random `fraction` of the entries, 0 elsewhere
            z.uniform_(generator=gen)
            z.copy_(z < self.fraction)
        return z

    def _ranges(self, numel: int) -> list[tuple[int, int, int]]:
        return [(i, s, min(s + self.chunk_size, numel)) for i, s in enumerate(range(0, numel, self.chunk_size))]

    def chunks(self, numel: int, key: int, device: torch.device = _CPU) -> Iterator[tuple[int, int, torch.Tensor]]:
        for index, start, stop in self._ranges(numel):
            yield start, stop, self._fill(key, index, stop - start, device)

    def apply(self, numel: int, key: int, fn: ChunkFn, device: torch.device = _CPU) -> None:
        ranges = self._ranges(numel)
        # within torch's thread budget: OMP_NUM_THREADS=1 (e.g. one of several processes) is serial
        if min(self.threads, torch.get_num_threads()) == 1 or len(ranges) == 1 or device.type != "cpu":
            for index, start, stop in ranges:
                fn(start, stop, self._fill(key, index, stop - start, device))
            return
        if self._executor is None:
            self._executor = ThreadPoolExecutor(self.threads, thread_name_prefix="zotune-z")

        grad_enabled = torch.is_grad_enabled()  # grad mode is thread-local: carry it over

        def run(r: tuple[int, int, int]) -> None:
            index, start, stop = r
            with torch.set_grad_enabled(grad_enabled):
                fn(start, stop, self._fill(key, index, stop - start, device))

        for _ in self._executor.map(run, ranges):  # re-raises a worker's exception here
            pass

    def __getstate__(self) -> dict:
        return {"distribution": self.distribution, "chunk_size": self.chunk_size, "threads": self.threads,
                "fraction": self.fraction}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)

    def full(self, numel: int, key: int, device: torch.device = _CPU) -> torch.Tensor:
        """The whole direction as a new float32 tensor (for tests and small parameters)."""
        out = torch.empty(numel, dtype=torch.float32, device=device)
        for start, stop, z in self.chunks(numel, key, device):
            out[start:stop] = z
        return out
