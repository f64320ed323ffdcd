"""Tuned weights in a run directory: the trainable tensors, by name, as safetensors (no pickle)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import DataError

FILENAME = "weights.safetensors"
HEAD_PREFIX = "zotune_head."  # a linear head (task.align: false) lives beside the model


def named_trainable(model: torch.nn.Module, head: torch.nn.Module | None,
                    trainable: list[torch.nn.Parameter]) -> list[tuple[str, torch.nn.Parameter]]:
    """``(name, parameter)`` of every trainable tensor, in the model's order (tied weights once)."""
    wanted = {id(p) for p in trainable}
    named = [(n, p) for n, p in model.named_parameters() if id(p) in wanted]
    if head is not None:
        named += [(HEAD_PREFIX + n, p) for n, p in head.named_parameters() if id(p) in wanted]
    return named


def save_weights(path: Path, named: list[tuple[str, torch.Tensor]], metadata: dict[str, str] | None = None) -> None:
    save_file({n: p.detach().contiguous().cpu() for n, p in named}, str(path), metadata=metadata)


@torch.no_grad()
def load_weights(path: Path, named: list[tuple[str, torch.nn.Parameter]]) -> None:
    """Copy saved tensors into the named parameters; names, shapes and dtypes must match."""
    try:
        saved = load_file(str(path))
    except (OSError, SafetensorError) as err:
        raise DataError(f"cannot read weights {path}: {err}") from None
    params = dict(named)
    missing, unexpected = sorted(params.keys() - saved.keys()), sorted(saved.keys() - params.keys())
    if missing or unexpected:
        what = f"missing {missing[0]!r}" if missing else f"unexpected {unexpected[0]!r}"
        raise DataError(f"weights {path} do not fit this model and scheme ({what}; "
                        f"{len(saved)} tensors saved, {len(params)} trainable)")
    for name, p in params.items():
        t = saved[name]
        if t.shape != p.shape or t.dtype != p.dtype:
            raise DataError(f"weights {path}: {name} is {t.dtype} {tuple(t.shape)}, the model has "
                            f"{p.dtype} {tuple(p.shape)}")
        p.copy_(t)
