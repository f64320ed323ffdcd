"""Reused per-thread buffers for direction shapes, which run chunk by chunk on the sampler's pool threads.

A chunk-sized temporary allocated per call costs more than the arithmetic on it (a fresh buffer of
megabytes is fresh pages from the system, every time); one buffer per thread, name and dtype, grown
when too small, does not."""

from __future__ import annotations

import threading

import torch

_local = threading.local()


def scratch(name: str, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``numel`` values of this thread's buffer ``name`` of ``dtype`` on ``device`` (uninitialised; valid
    until this thread asks for the same name, dtype and device again)."""
    buffers = _local.__dict__.setdefault("buffers", {})
    key = (name, dtype, device)
    buf = buffers.get(key)
    if buf is None or buf.numel() < numel:
        buf = buffers[key] = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel]
