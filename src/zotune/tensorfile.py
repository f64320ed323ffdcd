"""The safetensors format, read and written one tensor at a time.

safetensors' own ``save_file`` serialises every tensor into one buffer before writing; a model
bigger than memory (zotune.models.offload) is written here tensor by tensor instead, in the
same format (an 8-byte header length, a JSON header, then the tensors' bytes, no holes), so
any safetensors reader loads the file.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from .errors import DataError

# safetensors' dtype names (https://github.com/huggingface/safetensors: the format's header)
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
          "U8": torch.uint8, "BOOL": torch.bool}
NAMES = {dtype: name for name, dtype in DTYPES.items()}
# safetensors stores tensors by dtype (this order, last first), then by name: so does write_tensors, and
# its files are byte-identical to save_file's (but for several metadata keys: save_file writes them in a
# hash map's order, which varies from process to process; write_tensors in the order given)
_DTYPE_ORDER = {name: rank for rank, name in enumerate(("BOOL", "U8", "I8", "I16", "F16", "BF16", "I32", "F32", "F64", "I64"))}

MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit


def read_header(path: Path) -> tuple[dict, int]:
    """The safetensors header of ``path`` (name -> dtype, shape, data_offsets) and where its data starts."""
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > MAX_HEADER_BYTES:
                raise ValueError(f"a header of {length} bytes")
            header = json.loads(f.read(length))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
    except (OSError, struct.error, ValueError, UnicodeDecodeError) as err:
        raise DataError(f"cannot read weights {path}: not a safetensors file ({err})") from None
    header.pop("__metadata__", None)
    return header, 8 + length


def layout(shapes: Iterable[tuple[str, torch.dtype, tuple[int, ...]]],
           metadata: dict[str, str] | None = None) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """The header bytes (length prefix included) for tensors ``(name, dtype, shape)``, and each
    tensor's byte range in the file (in safetensors' order: by dtype, then by name)."""
    header: dict[str, object] = {"__metadata__": metadata} if metadata is not None else {}
    offset, ranges = 0, {}
    for name, dtype, shape in sorted(shapes, key=lambda s: (-_DTYPE_ORDER[NAMES[s[1]]], s[0])):
        size = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        ranges[name] = (offset, offset + size)
        offset += size
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors pads it
    start = 8 + len(text)
    return struct.pack("<Q", len(text)) + text, {n: (start + a, start + b) for n, (a, b) in ranges.items()}


def write_tensors(path: Path, named: list[tuple[str, torch.Tensor]], metadata: dict[str, str] | None = None,
                  value: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
                  after: Callable[[torch.Tensor], None] | None = None) -> dict[str, tuple[int, int]]:
    """Write the named tensors to ``path`` as safetensors, one tensor in memory at a time, and
    return each tensor's byte range in the file. ``value(name, t)``: the values to write for
    ``t`` (of its dtype and shape; ``t`` may then be a meta tensor); ``after(t)``: called once
    ``t`` is written."""
    head, ranges = layout(((n, t.dtype, tuple(t.shape)) for n, t in named), metadata)
    with open(path, "wb") as f:
        f.write(head)
        for name, t in sorted(named, key=lambda nt: ranges[nt[0]]):
            data = (value(name, t) if value is not None else t).detach()
            if data.dtype != t.dtype or data.shape != t.shape:
                raise ValueError(f"{name}: values of {data.dtype} {tuple(data.shape)} for a tensor of "
                                 f"{t.dtype} {tuple(t.shape)}")
            if data.numel():
                f.write(data.contiguous().cpu().reshape(-1).view(torch.uint8).numpy().data)
            del data
            if after is not None:
                after(t)
    return ranges


class TensorReader:
    """The tensors of one or more safetensors files (a model's shards), each read when asked
    with plain file reads: unlike a mapping of the files, nothing read stays in the process's
    memory once the tensor is dropped."""

    def __init__(self, paths: Iterable[Path]):
        self._where: dict[str, tuple[Path, dict, int]] = {}
        for path in paths:
            header, start = read_header(path)
            for name, info in header.items():
                self._where[name] = (Path(path), info, start)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def read(self, name: str) -> torch.Tensor:
        """Tensor ``name``, read into a new CPU tensor of its stored dtype and shape."""
        path, info, start = self._where[name]
        dtype, (begin, end) = DTYPES.get(info.get("dtype")), info.get("data_offsets", (0, -1))
        if dtype is None:
            raise DataError(f"cannot read {name} from {path}: dtype {info.get('dtype')!r}")
        out = torch.empty(tuple(info["shape"]), dtype=dtype)
        view = out.reshape(-1).view(torch.uint8).numpy()
        with open(path, "rb") as f:
            f.seek(start + begin)
            if end - begin != view.nbytes or f.readinto(view) != view.nbytes:
                raise DataError(f"cannot read {name} from {path}: truncated or malformed")
        return out
