"""Perturb parameters on the fly, leaving the weights untouched.

MeZO perturbs weights in place (``x += eps*z`` ... ``x -= 2*eps*z`` ... ``x += eps*z``), which
does not return ``x`` bit-for-bit in floating point. Here the weights are never written during
a probe. Inside :class:`Perturbation`, a :class:`~torch.overrides.TorchFunctionMode` swaps
every registered parameter that reaches a torch op for ``p + scale * z(p)``, materialised
into a pooled buffer just before that op and recycled right after it. So:

* restoration is exact by construction (nothing to restore), whatever the dtype, and a
  closure that raises or returns NaN leaves the weights as they were;
* extra memory is O(largest parameter), never a second copy of the model;
* it works for any model and any closure (modules, tied weights, raw tensor maths), because
  it sees ops rather than modules. Its cost is one Python call per op (~2k ops per forward
  for a 30-layer model, unmeasurable next to the matmuls).

An op whose output aliases the perturbed buffer (``w.t()``, ``w.view(...)``) keeps the buffer
alive through that output; such a buffer is simply not recycled.

A parameter known to be used by several ops (``reuse``: e.g. an embedding tied to the LM
head) is materialised once and kept until the probe ends, instead of once per use.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch.overrides import TorchFunctionMode

from .directions import DirectionSampler

_PLAIN = (int, float, bool, str, type(None), torch.Size, torch.dtype, torch.device)

# Reads of metadata (``w.dtype``, ``w.shape``, ``w.size()``) also reach the mode; they are the
# same for ``w`` and ``w + eps*z``, so they must not cost a materialisation.
_TENSOR_ATTRS = torch._C.TensorBase.__dict__
_METADATA_DESCRIPTORS = frozenset(
    id(_TENSOR_ATTRS[name])
    for name in ("dtype", "shape", "device", "requires_grad", "is_leaf", "ndim", "layout", "is_cuda", "is_meta", "grad_fn", "names")
    if name in _TENSOR_ATTRS
)
_METADATA_METHODS = frozenset(
    getattr(torch.Tensor, name)
    for name in ("size", "dim", "numel", "nelement", "stride", "is_contiguous", "element_size", "is_floating_point", "get_device")
)


def _reads_metadata_only(func: object) -> bool:
    return func in _METADATA_METHODS or id(getattr(func, "__self__", None)) in _METADATA_DESCRIPTORS


class _BufferPool:
    """Free lists of flat buffers keyed by (numel, dtype, device)."""

    def __init__(self) -> None:
        self._free: dict[tuple[int, torch.dtype, torch.device], list[torch.Tensor]] = defaultdict(list)

    def take(self, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        free = self._free[(numel, dtype, device)]
        return free.pop() if free else torch.empty(numel, dtype=dtype, device=device)

    def give(self, buf: torch.Tensor) -> None:
        self._free[(buf.numel(), buf.dtype, buf.device)].append(buf)


def _may_alias(out: object, ptr: int) -> bool:
    """True unless ``out`` certainly holds no reference to the storage at ``ptr``."""
    if isinstance(out, torch.Tensor):
        return out.untyped_storage().data_ptr() == ptr
    if isinstance(out, (tuple, list)):
        return any(_may_alias(o, ptr) for o in out)
    return not isinstance(out, _PLAIN)


Terms = list[tuple[int, float]]  # (direction key, scale) pairs, summed in order


class Perturbation:
    """Context manager under which parameter ``params[i]`` reads as
    ``params[i] + sum(scale * z(key) for key, scale in terms[i])``.

    The sum is built with the same kernel and in the same order as the ZO update rules write
    it, so a perturbed point and the weights an update would produce are bit-identical (this is
    what lets ZO-SGD-Cons compare candidates exactly). ``along(...)`` builds the usual single
    direction. ``uses`` counts, per parameter id, how many ops read it; ``materializations`` how
    many perturbed copies were built. Parameters whose id is in ``reuse`` are built once.
    """

    recycle = True  # built tensors go back to the pool once no output aliases them

    def __init__(
        self,
        params: list[torch.Tensor],
        terms: list[Terms],
        sampler: DirectionSampler,
        pool: _BufferPool | None = None,
        reuse: frozenset[int] = frozenset(),
    ):
        self._targets = {id(p): (p, [t for t in ts if t[1] != 0]) for p, ts in zip(params, terms)}
        self.reuse = reuse
        self.uses: dict[int, int] = defaultdict(int)
        self._kept: dict[int, torch.Tensor] = {}
        self.sampler = sampler
        self.pool = pool if pool is not None else _BufferPool()
        self.materializations = 0
        self._mode: _PerturbMode | None = None

    @classmethod
    def along(
        cls,
        params: list[torch.Tensor],
        keys: list[int],
        scale: float,
        sampler: DirectionSampler,
        pool: _BufferPool | None = None,
        reuse: frozenset[int] = frozenset(),
    ) -> Perturbation:
        """``params[i] + scale * z(keys[i])``: one direction, one scale."""
        return cls(params, [[(k, scale)] for k in keys], sampler, pool, reuse)

    def materialize(self, p: torch.Tensor, terms: Terms) -> torch.Tensor:
        """``p + sum(scale * z)`` in p's dtype, built chunk by chunk into a pooled buffer."""
        if not terms:
            return p
        if not p.is_contiguous():
            raise ValueError("zotune perturbs contiguous parameters only")
        buf = self.pool.take(p.numel(), p.dtype, p.device)
        src = p.detach().view(-1)
        for key, scale in terms:

            def perturb(start: int, stop: int, z: torch.Tensor, src=src, scale=scale) -> None:
                torch.add(src[start:stop], z, alpha=scale, out=buf[start:stop])

            self.sampler.apply(p.numel(), key, perturb, p.device)
            src = buf
        self.materializations += 1
        return buf.view(p.shape)

    def __enter__(self) -> Perturbation:
        self._mode = _PerturbMode(self)
        self._mode.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._mode is not None
        self._mode.__exit__(*exc)
        self._mode = None
        if self.recycle:
            for buf in self._kept.values():
                self.pool.give(buf.view(-1))
        self._kept.clear()


class _PerturbMode(TorchFunctionMode):
    def __init__(self, perturbation: Perturbation):
        super().__init__()
        self.p = perturbation

    def _swap(self, arg: object, built: list[torch.Tensor]) -> object:
        if isinstance(arg, torch.Tensor):
            pid = id(arg)
            target = self.p._targets.get(pid)
            if target is None:
                return arg
            self.p.uses[pid] += 1
            if not target[1]:  # nothing to add: the parameter as it is
                return arg
            if pid in self.p.reuse:
                if pid not in self.p._kept:
                    self.p._kept[pid] = self.p.materialize(*target)
                return self.p._kept[pid]
            buf = self.p.materialize(*target)
            built.append(buf)
            return buf
        if isinstance(arg, (list, tuple)) and any(id(a) in self.p._targets for a in arg):
            return type(arg)(self._swap(a, built) for a in arg)
        return arg

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _reads_metadata_only(func):
            return func(*args, **kwargs)
        built: list[torch.Tensor] = []
        args = tuple(self._swap(a, built) for a in args)
        if kwargs:
            kwargs = {k: self._swap(v, built) for k, v in kwargs.items()}
        out = func(*args, **kwargs)
        if self.p.recycle:
            for buf in built:
                if not _may_alias(out, buf.untyped_storage().data_ptr()):
                    self.p.pool.give(buf.view(-1))
        return out


class Tangents(Perturbation):
    """Under ``torch.autograd.forward_ad.dual_level()``: every op sees the dual tensor
    ``(p, z(key))`` in place of ``p``, so the closure's output carries the directional
    derivative ``grad f . z`` as its tangent (forward-mode AD through the unchanged closure).
    Tangents are fresh tensors, never pooled: a dual's primal storage is the weight itself."""

    recycle = False

    def materialize(self, p: torch.Tensor, terms: Terms) -> torch.Tensor:
        import torch.autograd.forward_ad as fwAD

        if not terms:
            return p
        ((key, scale),) = terms
        tangent = torch.empty(p.numel(), dtype=p.dtype, device=p.device)

        def fill(start: int, stop: int, z: torch.Tensor) -> None:
            torch.mul(z, scale, out=tangent[start:stop])

        self.sampler.apply(p.numel(), key, fill, p.device)
        self.materializations += 1
        return fwAD.make_dual(p.detach(), tangent.view(p.shape))
