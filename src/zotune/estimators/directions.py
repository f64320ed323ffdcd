"""Seeded random directions z, regenerated on demand and never stored.

A direction is named by an integer key (derived from the step seed, the query index and the
parameter's index). Its values are produced in fixed-size chunks, each from a generator seeded
with ``mix(key, chunk_index)``, so that

* the same key gives the same z in every process, dtype and call order;
* no temporary larger than one chunk is allocated (memory O(chunk), not O(parameter));
* any chunk can be regenerated on its own.

z is always generated in float32 and cast where it is used, so a direction does not depend on
the dtype of the weights it perturbs.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

_MASK64 = (1 << 64) - 1
DISTRIBUTIONS = ("gaussian", "rademacher")
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


_BIT_SHIFTS = torch.arange(8, dtype=torch.uint8)


def _fill_rademacher(out: torch.Tensor, gen: torch.Generator) -> None:
    """+-1 with equal probability: 8 signs per random byte."""
    n = out.numel()
    packed = torch.randint(0, 256, ((n + 7) // 8,), dtype=torch.uint8, generator=gen)
    bits = (packed.unsqueeze(1) >> _BIT_SHIFTS).bitwise_and_(1).view(-1)[:n]
    out.copy_(bits).mul_(2.0).sub_(1.0)


class DirectionSampler:
    """Produces the chunks of z for a key: ``for start, stop, z in sampler.chunks(numel, key)``.

    The yielded ``z`` is a view into a reused float32 scratch buffer: use it before the next
    iteration.
    """

    def __init__(self, distribution: str = "gaussian", chunk_size: int = DEFAULT_CHUNK):
        if distribution not in DISTRIBUTIONS:
            raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.distribution = distribution
        self.chunk_size = chunk_size
        self._gen = torch.Generator(device="cpu")
        self._scratch = torch.empty(0, dtype=torch.float32)

    def chunks(self, numel: int, key: int) -> Iterator[tuple[int, int, torch.Tensor]]:
        size = min(numel, self.chunk_size)
        if self._scratch.numel() < size:
            self._scratch = torch.empty(size, dtype=torch.float32)
        for index, start in enumerate(range(0, numel, self.chunk_size)):
            stop = min(start + self.chunk_size, numel)
            z = self._scratch[: stop - start]
            self._gen.manual_seed(mix(key, index))
            if self.distribution == "gaussian":
                z.normal_(generator=self._gen)
            else:
                _fill_rademacher(z, self._gen)
            yield start, stop, z

    def full(self, numel: int, key: int) -> torch.Tensor:
        """The whole direction as a new float32 tensor (for tests and small parameters)."""
        out = torch.empty(numel, dtype=torch.float32)
        for start, stop, z in self.chunks(numel, key):
            out[start:stop] = z
        return out
