"""The host tier (``model.offload: cpu``): the layers' weights in CPU memory, each layer copied to
the compute device just ahead of its forward and back after it, as ZO2 does for a GPU.

* Outside a forward, a layer's parameters are its host tensors (pinned when the device is a
  GPU); the embedding, head and final norm live on the device.
* A forward pre-hook on layer k makes it resident: it waits for the copy started ahead (or makes
  it now), points the parameters at the device buffers, and starts copying layer k+1 on a side
  stream, so that the copy overlaps layer k's compute. At most two layers are on the device.
* A forward hook on layer k copies a trainable layer back to its host tensors (after layer k's
  compute, on the side stream) and gives its buffers back for later layers.
* Updates must run on the device: z comes from each device type's own generator, and the probes
  drew it there. So the tier takes the fused update (``zotune.optim.fused``), which applies a
  layer's update in its pre-hook, while the layer is resident, and :meth:`resident` for an update
  applied outside a forward.

On a CUDA device the copies are asynchronous, ordered by events. Elsewhere (the CPU: the tests)
they are plain copies with the same schedule, so the scheduling logic is exercised without a GPU.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

from ..errors import ConfigError
from ..estimators.perturb import HOSTED, BufferPool


class _Copier:
    """Copies between host and device: on a CUDA device on a side stream, each returning an event
    the compute stream waits for; elsewhere at once (no events)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> object | None:
        """``dst <- src`` on the side stream (after what it was told to wait for); its event."""
        if self.stream is None:
            dst.copy_(src)
            return None
        with torch.cuda.stream(self.stream):
            dst.copy_(src, non_blocking=True)
            return self.stream.record_event()

    def wait_for(self, event: object | None) -> None:
        """The compute stream waits for ``event`` (a copy) before what it runs next."""
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)

    def after_compute(self) -> None:
        """The side stream's next copies wait for everything the compute stream has queued."""
        if self.stream is not None:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))

    def synchronize(self) -> None:
        """Wait for every copy (the host tensors are then current)."""
        if self.stream is not None:
            self.stream.synchronize()


class HostOffload:
    """The host tier of ``layers``, computing on ``device``: see the module's docstring."""

    def __init__(self, layers: Sequence[torch.nn.Module], device: torch.device):
        if not len(layers):
            raise ConfigError("model.offload: the model has no stack of transformer layers to offload")
        self.device = torch.empty(0, device=device).device  # "cuda" -> "cuda:0": the key its buffers report
        self.layers = list(layers)
        self.params = [list(dict.fromkeys(layer.parameters())) for layer in self.layers]
        pin = self.device.type == "cuda"
        self.host = [[(p.detach().cpu().pin_memory() if pin else p.detach().cpu().clone()) for p in ps]
                     for ps in self.params]
        for ps, hs in zip(self.params, self.host):
            for p, h in zip(ps, hs):
                p.data = h
                setattr(p, HOSTED, True)  # never perturbed in place: its probes and updates happen on the device
        self._copier = _Copier(self.device)
        self._pool = BufferPool()  # device buffers, recycled from layer to layer
        self._ahead: dict[int, tuple[list[torch.Tensor], object | None]] = {}
        self.uploads = 0  # layers copied to the device (once per layer per step with the dual forward)
        self.peak_resident = 0  # the most layers on the device at once, the one copied ahead included
        self._hooks = [h for k, layer in enumerate(self.layers) for h in (
            layer.register_forward_pre_hook(lambda *_, k=k: self.enter(k)),
            layer.register_forward_hook(lambda *_, k=k: self.leave(k)))]
        self._buffers: dict[int, list[torch.Tensor]] = {}  # the device buffers of the resident layers

    def _upload(self, k: int) -> tuple[list[torch.Tensor], object | None]:
        """Start copying layer k to device buffers; the buffers and the last copy's event."""
        buffers = [self._pool.take(p.numel(), p.dtype, self.device) for p in self.params[k]]
        event = None
        for buf, host in zip(buffers, self.host[k]):
            event = self._copier.copy(buf, host.view(-1))
        self.uploads += 1
        self.peak_resident = max(self.peak_resident, len(self._buffers) + len(self._ahead) + 1)
        return buffers, event

    def enter(self, k: int) -> None:
        """Layer k's forward begins: make it resident, and start copying the next layer."""
        with torch._C.DisableTorchFunction():  # a probe's perturbation mode would swap the parameters set here
            self._bring(k)
            following = k + 1
            if following < len(self.layers) and following not in self._buffers and following not in self._ahead:
                self._ahead[following] = self._upload(following)

    def _bring(self, k: int) -> None:
        """Layer k on the device: its copy started ahead, or one made now."""
        if k in self._buffers:
            return
        buffers, event = self._ahead.pop(k, None) or self._upload(k)
        self._copier.wait_for(event)
        for p, buf in zip(self.params[k], buffers):
            p.data = buf.view(p.shape)
        self._buffers[k] = buffers

    def leave(self, k: int) -> None:
        """Layer k's forward is over: copy its trainable parameters back to the host, free its buffers.
        After the last layer nothing stays ahead, so that no copy outlives a change of the host tensors
        between forwards (a checkpoint's restore, the best weights loaded)."""
        with torch._C.DisableTorchFunction():
            buffers = self._buffers.pop(k, None)
            if buffers is not None:
                self._copier.after_compute()  # the copies back, and later uses of these buffers, follow layer k
                for p, host, buf in zip(self.params[k], self.host[k], buffers):
                    if p.requires_grad:
                        self._copier.copy(host.view(-1), buf)
                    p.data = host
                self._release(buffers)
            if k == len(self.layers) - 1:
                for ahead, _ in self._ahead.values():
                    self._release(ahead)
                self._ahead.clear()

    def _release(self, buffers: list[torch.Tensor]) -> None:
        for buf in buffers:
            self._pool.give(buf)

    @contextmanager
    def resident(self, k: int) -> Iterator[None]:
        """Layer k on the device for the duration (an update applied outside a forward), then back."""
        with torch._C.DisableTorchFunction():
            self._bring(k)
        try:
            yield
        finally:
            self.leave(k)
            self.synchronize()

    def synchronize(self) -> None:
        """Wait for every copy: the host tensors are then the current weights."""
        self._copier.synchronize()
