"""Low-rank directions ``Z = L R`` (``L`` m x r, ``R`` r x n) for the subspace methods, LOZO and ZO-Muon:
seeded factors, and the direction shape that writes any chunk of ``Z`` from them."""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch

from ..estimators.directions import mix
from .scratch import scratch

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
    Each factor is kept for the key last asked for only: a probe reads one key's chunks, an update one
    key's after another, so each is drawn once per pass, and a step of q queries holds one set of
    factors rather than q (for a rank-64 ZO-Muon of 4 queries on the default model, about 130 MB less)."""
    drawn: dict[int, tuple[int, torch.Tensor]] = {}  # which factor -> (key, its value)
    lock = threading.Lock()

    def factor(which: int, fn: Factor, key: int) -> torch.Tensor:
        with lock:
            kept = drawn.get(which)
            if kept is None or kept[0] != key:
                kept = drawn[which] = (key, fn(key))
            return kept[1]

    def shape(key: int, start: int, stop: int, device: torch.device, draw: Callable[[], torch.Tensor],
              out: torch.Tensor) -> torch.Tensor:
        rows, cols = factor(0, left, key), factor(1, right, key)
        first, last = start // n, (stop - 1) // n
        if start % n == 0 and stop % n == 0 and out.dtype == cols.dtype and out.is_contiguous():
            # whole rows (a whole matrix, most often): written in place, no second copy of Z
            return torch.mm(rows[first : last + 1], cols, out=out.view(-1, n)).view(-1)
        # the rows of Z the chunk overlaps, into this thread's scratch: a chunk's worth of memory, taken once
        # (chunk-sized temporaries freed on the sampler's threads fragment the heap, which shows in the peak RSS)
        block = torch.mm(rows[first : last + 1], cols, out=scratch("low-rank", (last + 1 - first) * n, cols.dtype, cols.device).view(-1, n))
        return out.copy_(block.view(-1)[start - first * n : stop - first * n])

    return shape
