"""The disk tier: a model's transformer blocks kept in files, in memory about one block at a time.

ZO fine-tuning needs only forwards, and a forward visits the blocks in order. Here each block's
parameters live in one safetensors file, mapped read-write (``mmap``, shared with the file), and
the parameters are views of the mapping: every op (a forward, the perturbation mode, an update
rule, saving) reads and writes them as ordinary CPU tensors, and the values are the file's, bit
for bit. What keeps memory at about a block is when pages are dropped:

* a forward hook on each block asks the kernel to read the next block ahead
  (``MADV_WILLNEED``) on entry, and drops the block's pages (``MADV_DONTNEED``) on exit;
* whatever walks every weight (an update rule, hashing, saving, loading) calls :func:`release`
  on each parameter when done with it.

Dropping a page of a shared file mapping loses nothing: a written page goes back to the file
(through the page cache), and the next read maps it again. The embedding, the head and the
final norm (everything outside the blocks) stay in memory; their optimizer state (Adam's moments,
momentum) goes to mapped files as a block's does (:func:`state_like`), so a stateful optimizer adds
about a chunk to memory rather than twice the embedding.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import mmap
import os
import shutil
import tempfile
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ConfigError
from ..tensorfile import write_tensors
from .layers import transformer_layers

TIERS = ("none", "disk", "cpu")  # cpu: the host tier (host_offload.py)
_PAGES = "_zotune_pages"  # the attribute of an offloaded parameter: its Pages
_STATE_DIRECTORY = "_zotune_state_directory"  # of a parameter outside the blocks: where its optimizer state goes


@dataclass
class Pages:
    """A byte range of a mapped file: a parameter's values."""

    mapping: mmap.mmap
    start: int
    stop: int
    directory: Path | None = None  # the file's folder: where the parameter's optimizer state goes (state_like)

    def advise(self, advice: int) -> None:
        """``madvise`` over the whole pages inside the range (a page shared with a neighbour is left)."""
        lo = math.ceil(self.start / mmap.PAGESIZE) * mmap.PAGESIZE
        hi = self.stop // mmap.PAGESIZE * mmap.PAGESIZE
        if hi > lo and not self.mapping.closed:
            self.mapping.madvise(advice, lo, hi - lo)


def release(p: torch.Tensor) -> None:
    """Drop an offloaded parameter's pages from memory (its file keeps the values); nothing for
    any other tensor. Call it after reading or writing every value of a parameter."""
    release_span(p, 0, p.numel())


def release_span(p: torch.Tensor, start: int, stop: int) -> None:
    """:func:`release` for the values ``start:stop`` of an offloaded tensor (in its flat order); the pages
    shared with the values on either side stay."""
    pages = getattr(p, _PAGES, None)
    if pages is not None:
        size = p.element_size()
        Pages(pages.mapping, pages.start + start * size, pages.start + stop * size).advise(mmap.MADV_DONTNEED)


def state_directory(p: torch.Tensor) -> Path | None:
    """Where the optimizer state of ``p`` is kept on disk (:func:`state_like`): the folder of an offloaded
    parameter's file, or of the model's block files for a parameter outside its blocks; None when in memory."""
    pages = getattr(p, _PAGES, None)
    return pages.directory if pages is not None else getattr(p, _STATE_DIRECTORY, None)


def state_like(p: torch.Tensor, fill: float = 0.0, shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """A float32 tensor of ``p``'s shape (or ``shape``, of as many values) filled with ``fill``, for an
    optimizer's state of ``p`` (momentum, moments, a Hessian estimate). For an offloaded ``p``, in a file of
    its own in p's :func:`state_directory`, mapped and paged as an offloaded parameter is (:func:`release`
    drops it after use; the file is unlinked at once, so its space goes with the mapping); in memory for a
    model that is not offloaded."""
    shape = tuple(p.shape) if shape is None else tuple(shape)
    directory = state_directory(p)
    if directory is None or p.numel() == 0 or p.device.type != "cpu":
        return torch.full(shape, fill, dtype=torch.float32, device=p.device)
    nbytes = p.numel() * 4
    fd, name = tempfile.mkstemp(prefix=".state-", suffix=".bin", dir=directory)
    try:
        os.ftruncate(fd, nbytes)  # zeros
        mapping = mmap.mmap(fd, nbytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)
        os.unlink(name)
    out = torch.frombuffer(mapping, dtype=torch.float32).view(shape)
    setattr(out, _PAGES, Pages(mapping, 0, nbytes, directory))
    if fill:
        out.fill_(fill)
    release(out)
    return out


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
LARGE_ALLOCATION = 1 << 20  # bytes: allocations this large or larger get pages of their own (mmap)


def map_large_allocations() -> bool:
    """Have glibc's malloc give every allocation of :data:`LARGE_ALLOCATION` bytes or more pages of its own
    (``mallopt(M_MMAP_THRESHOLD)``), returned to the system when freed. By default glibc raises that threshold
    as large blocks are freed (up to 32 MB), after which the chunk-sized temporaries of the probes and updates
    come from per-thread heaps that keep their memory. Measured on the disk tier with the dual forward and the
    fused update: 0.5-0.7 GB more resident memory over 3 steps of a 256 MB model (docs/offload.md), which a memory cap does not
    have. Returns whether it took effect (False off glibc)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        return bool(libc is not None and libc.mallopt(M_MMAP_THRESHOLD, LARGE_ALLOCATION))
    except (OSError, AttributeError):
        return False


def is_offloaded(p: torch.Tensor) -> bool:
    """Whether ``p`` is a view of an offloaded block's file."""
    return getattr(p, _PAGES, None) is not None


class BlockFile:
    """One block's parameters in one safetensors file, mapped read-write: :attr:`views` holds a
    view of the mapping per parameter name."""

    def __init__(self, path: Path, named: list[tuple[str, torch.Tensor]],
                 value: Callable[[str, torch.Tensor], torch.Tensor]):
        self.path = path
        partial = path.with_name(f".{path.name}.tmp")
        ranges = write_tensors(partial, named, value=value)
        os.replace(partial, path)  # a new file: a mapping of an earlier one (an earlier run's) keeps its own
        fd = os.open(path, os.O_RDWR)
        try:
            self.mapping = mmap.mmap(fd, 0, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)  # the mapping keeps the file
        data = torch.frombuffer(self.mapping, dtype=torch.uint8)
        self.views: dict[str, torch.Tensor] = {}
        for name, p in named:
            start, stop = ranges[name]
            self.views[name] = data[start:stop].view(p.dtype).view(p.shape)
            self.views[name].pages = Pages(self.mapping, start, stop, path.parent)  # type: ignore[attr-defined]
        self.nbytes = len(self.mapping)

    def prefetch(self) -> None:
        """Ask the kernel to read the block's pages ahead of use (asynchronously)."""
        Pages(self.mapping, 0, self.nbytes).advise(mmap.MADV_WILLNEED)

    def drop(self) -> None:
        """Drop the block's pages from memory; the file keeps them."""
        Pages(self.mapping, 0, self.nbytes).advise(mmap.MADV_DONTNEED)


class DiskOffload:
    """The disk tier of a model: each of ``blocks`` (its transformer layers) in its own file
    under ``directory``, read one block ahead during a forward and dropped after it.

    ``value(name, param)`` gives each block parameter's initial values (e.g. read from a
    checkpoint; ``param`` may be a meta tensor). Each block parameter is replaced by a new
    ``nn.Parameter`` over its view of the file (tied parameters stay tied), so offload a model
    before making its optimizer; the parameters outside the blocks stay in memory, their optimizer
    state goes to files in the same directory (:func:`state_directory`). A
    directory this object made itself (``directory=None``: a fresh one under ``root``) is deleted
    when the object goes."""

    def __init__(self, model: torch.nn.Module, blocks: list[torch.nn.Module],
                 value: Callable[[str, torch.Tensor], torch.Tensor],
                 directory: Path | None = None, root: Path | None = None):
        if not len(blocks):
            raise ConfigError("model.offload: the model has no stack of transformer layers to offload")
        if directory is None:
            root = Path(root or tempfile.gettempdir())
            root.mkdir(parents=True, exist_ok=True)
            remove_orphans(root)
            directory = Path(tempfile.mkdtemp(prefix="offload-", dir=root))
            (directory / OWNER).write_text(str(os.getpid()))
            weakref.finalize(self, shutil.rmtree, directory, True)
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        map_large_allocations()  # memory freed by the probes and updates goes back at once
        names = {id(p): n for n, p in model.named_parameters()}
        self.files: list[BlockFile] = []
        for k, block in enumerate(blocks):
            named = [(names[id(p)], p) for p in block.parameters()]
            self.files.append(BlockFile(self.directory / f"block-{k:03d}.safetensors", named, value))
            replace_parameters(block, {id(p): self.files[-1].views[n] for n, p in named})
        for p in model.parameters():
            if not is_offloaded(p):
                setattr(p, _STATE_DIRECTORY, self.directory)
        self._hooks = [h for k, block in enumerate(blocks) for h in (
            block.register_forward_pre_hook(lambda *_, k=k: self._enter(k)),
            block.register_forward_hook(lambda *_, k=k: self._leave(k)))]
        self.drop()

    @property
    def nbytes(self) -> int:
        """Bytes of weights kept on disk."""
        return sum(f.nbytes for f in self.files)

    def _enter(self, k: int) -> None:
        self.files[(k + 1) % len(self.files)].prefetch()

    def _leave(self, k: int) -> None:
        self.files[k].drop()

    def drop(self) -> None:
        """Drop every block's pages from memory."""
        for f in self.files:
            f.drop()


OWNER = "owner.pid"  # in a directory DiskOffload made itself: the process that made it


def remove_orphans(root: Path) -> list[Path]:
    """Delete the directories under ``root`` that a DiskOffload made for itself (``offload-*``) in a process that
    is gone: one killed before its clean-up (SIGKILL, out of memory) left a model's size on disk. Returns them."""
    removed = []
    for directory in root.glob("offload-*"):
        try:
            pid = int((directory / OWNER).read_text())
        except (OSError, ValueError):
            continue  # not one of ours, or being made right now
        if not _alive(pid):
            shutil.rmtree(directory, ignore_errors=True)
            removed.append(directory)
    return removed


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists (on this machine)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def replace_parameters(root: torch.nn.Module, views: dict[int, torch.Tensor]) -> None:
    """Replace every parameter of ``root`` whose id is in ``views`` by a Parameter over that
    tensor (one new Parameter per old one: tied parameters stay tied); a view of a block file
    makes an offloaded parameter."""
    made: dict[int, torch.nn.Parameter] = {}
    for module in root.modules():
        for key, old in list(module._parameters.items()):
            if old is None or id(old) not in views:
                continue
            if id(old) not in made:
                view = views[id(old)]
                new = torch.nn.Parameter(view, requires_grad=old.requires_grad)
                if getattr(view, "pages", None) is not None:
                    setattr(new, _PAGES, view.pages)
                made[id(old)] = new
            module._parameters[key] = made[id(old)]


def offload_to_disk(model: torch.nn.Module, directory: str | Path | None = None) -> DiskOffload:
    """Move an in-memory model's transformer layers to the disk tier (files under ``directory``,
    or a fresh temporary directory deleted with the model); returns the tier, also kept on the
    model. Do it before making the optimizer (the layers' parameters are replaced). The model
    was in memory whole before this; ``load_model(..., offload="disk")`` never holds it whole."""
    offload = DiskOffload(model, transformer_layers(model), lambda _, p: p, Path(directory) if directory else None)
    model._zotune_offload = offload  # the files live as long as the model
    return offload


def check_tier(tier: str) -> str:
    """``model.offload``'s value, checked: ``none``, ``disk`` or ``cpu``."""
    if tier not in TIERS:
        raise ConfigError(f"model.offload must be one of {', '.join(TIERS)}, got {tier!r}")
    return tier
