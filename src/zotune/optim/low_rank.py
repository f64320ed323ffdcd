"""Low-rank directions ``Z = L R`` (``L`` m x r, ``R`` r x n) for the subspace methods, LOZO and ZO-Muon:
seeded factors, and the direction shape that writes any chunk of ``Z`` from them."""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch

from ..estimators.directions import mix

Factor = Callable[[int], torch.Tensor]  # direction key -> a factor (float32)


def gaussian(key: int, rows: int, cols: int, device: torch.device, tag: int) -> torch.Tensor:
    """A ``rows x cols`` standard Gaussian matrix named by ``(key, tag)`` (float32)."""
    gen = torch.Generator().manual_seed(mix(key, tag))
    return torch.randn(rows, cols, generator=gen).to(device)


def orthonormal_basis(key: int, rows: int, rank: int, device: torch.device) -> torch.Tensor:
    """A ``rows x rank`` matrix with orthonormal columns, Haar-distributed (QR of a Gaussian matrix, the signs
    of R's diagonal moved into Q), named by ``key`` (float32)."""
    q, r = torch.linalg.qr(gaussian(key, rows, rank, torch.device("cpu"), 0x4F52544F))
    signs = torch.sign(torch.diagonal(r))
    return (q * torch.where(signs == 0, 1.0, signs)).to(device)


def low_rank_shape(n: int, left: Factor, right: Factor) -> Callable[..., torch.Tensor]:
    """The direction shape (``directions.Shape`` with the key first) of ``Z = left(key) @ right(key)`` for a
    matrix with ``n`` columns: a chunk of the flat ``Z`` is computed from the factors' rows it overlaps.
    Each factor is drawn once per key and kept for the step (the shape lives as long as the step)."""
    drawn: dict[tuple[int, int], torch.Tensor] = {}
    lock = threading.Lock()

    def factor(which: int, fn: Factor, key: int) -> torch.Tensor:
        with lock:
            if (which, key) not in drawn:
                drawn[which, key] = fn(key)
            return drawn[which, key]

    def shape(key: int, start: int, stop: int, device: torch.device, draw: Callable[[], torch.Tensor],
              out: torch.Tensor) -> torch.Tensor:
        rows, cols = factor(0, left, key), factor(1, right, key)
        first, last = start // n, (stop - 1) // n
        block = (rows[first : last + 1] @ cols).view(-1)  # the rows of Z the chunk overlaps
        return out.copy_(block[start - first * n : stop - first * n])

    return shape
