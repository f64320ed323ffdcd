"""Tuned weights in a run directory: the trainable tensors, by name, as safetensors (no pickle)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import DataError
from ..models.offload import release
from ..tensorfile import DTYPES, read_header, write_tensors

__all__ = ["FILENAME", "HEAD_PREFIX", "SAFETENSORS_DTYPES", "load_weights", "named_trainable", "read_header",
           "save_weights"]

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
    """Write the named tensors to ``path`` as safetensors (with string ``metadata``), one at a time:
    the bytes of safetensors' ``save_file``, without its copy of every tensor."""
    write_tensors(path, named, metadata, after=release)


SAFETENSORS_DTYPES = DTYPES  # safetensors' dtype names (zotune.tensorfile)


@torch.no_grad()
def load_weights(path: Path, named: list[tuple[str, torch.nn.Parameter]]) -> None:
    """Copy saved tensors into the named parameters; names, shapes and dtypes must match.

    Each tensor's bytes are read straight into its parameter (through a one-tensor buffer for one
    that is not a contiguous CPU tensor), so loading needs no second copy of the weights: a run with
    ``train.keep_best`` ends by loading its best weights, at the memory of the model alone."""
    header, start = read_header(path)
    params = dict(named)
    missing, unexpected = sorted(params.keys() - header.keys()), sorted(header.keys() - params.keys())
    if missing or unexpected:
        what = f"missing {missing[0]!r}" if missing else f"unexpected {unexpected[0]!r}"
        raise DataError(f"weights {path} do not fit this model and scheme ({what}; "
                        f"{len(header)} tensors saved, {len(params)} trainable)")
    for name, p in params.items():
        info = header[name]
        if not (isinstance(info, dict) and {"dtype", "shape", "data_offsets"} <= info.keys()):
            raise DataError(f"cannot read weights {path}: {name}'s header entry is malformed")
        dtype, shape = SAFETENSORS_DTYPES.get(info["dtype"]), tuple(info["shape"])
        if dtype != p.dtype or shape != tuple(p.shape):
            raise DataError(f"weights {path}: {name} is {info['dtype']} {shape}, the model has "
                            f"{p.dtype} {tuple(p.shape)}")
    with open(path, "rb") as f:
        for name, p in params.items():
            begin, end = header[name]["data_offsets"]
            direct = p.device.type == "cpu" and p.is_contiguous()
            target = p if direct else torch.empty(p.shape, dtype=p.dtype)
            view = target.detach().reshape(-1).view(torch.uint8).numpy()
            f.seek(start + begin)
            if end - begin != view.nbytes or f.readinto(view) != view.nbytes:
                raise DataError(f"weights {path}: {name} is truncated or malformed")
            if not direct:
                p.copy_(target)
            release(p)
