"""The fused update (ZO2's): a step's update of a transformer layer waits for the next forward to
visit the layer, so that a step reads and writes each layer's weights on one visit.

A ZO step ends with an update that walks every weight, and the next step begins with probes that
read them all again; on the disk tier each walk is a pass over the files. Here the update of the
parameters inside the layers is kept pending, with what it needs (the step's estimate, each
parameter's group options as they were), and applied by a forward pre-hook when a forward first
enters the layer: the next step's first probe, or an evaluation. The same update rule runs on the
same values, so the weights are bit-identical to updating at once; only the moment differs.

With the host tier (``models/host_offload.py``) the fused update is what keeps updates on the
device: a layer's update is applied while the layer is there, and a flush brings it there.

What must see the weights outside a forward (saving them, a checkpoint, the optimizer's state
dict) calls :meth:`FusedUpdate.flush` first, as does the next update. A small trainable set
(perturbed by writing it in place, before any hook could run) is updated at once, and so are the
parameters outside the layers. While a parameter's update is pending it is marked, and the
perturbation mode does not build its perturbed copy ahead of its layer's forward.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext

import torch

from ..estimators.perturb import HOSTED, PENDING, Perturbation
from ..models.host_offload import HostOffload
from ..estimators.spsa import GradientEstimate

Move = tuple[int, torch.Tensor, dict, dict]  # (index, parameter, its group's options, its state)


class FusedUpdate:
    """Keeps each layer's update pending until a forward enters the layer; ``apply(estimate, moves)``
    is the optimizer's own update of those parameters. With the host tier (``offload``, the model's
    tier), an update applied outside a forward brings its layer to the device first."""

    def __init__(self, layers: Sequence[torch.nn.Module], apply: Callable[[GradientEstimate, list[Move]], None],
                 offload: object | None = None):
        self._apply = apply
        self._host = offload if isinstance(offload, HostOffload) else None
        self._layer_of = {id(p): k for k, layer in enumerate(layers) for p in layer.parameters()}
        self._pending: dict[int, tuple[GradientEstimate, list[Move]]] = {}
        self._hooks = [layer.register_forward_pre_hook(lambda *_, k=k: self.apply_layer(k))
                       for k, layer in enumerate(layers)]

    def defer(self, estimate: GradientEstimate, moves: list[Move]) -> list[Move]:
        """Keep the moves of the layers' parameters pending (after applying any still pending);
        returns the moves to apply now."""
        self.flush()
        small = sum(p.numel() for _, p, _, _ in moves) <= Perturbation.in_place_numel
        if small and not any(getattr(p, HOSTED, False) for _, p, _, _ in moves):
            return moves  # the probes write such a set in place, before a hook could update it
        now: list[Move] = []
        later: dict[int, list[Move]] = {}
        for index, p, group, state in moves:
            k = self._layer_of.get(id(p))
            if k is None:
                now.append((index, p, group, state))
                continue
            later.setdefault(k, []).append((index, p, {key: v for key, v in group.items() if key != "params"}, state))
            setattr(p, PENDING, True)
        self._pending = {k: (estimate, layer_moves) for k, layer_moves in later.items()}
        return now

    @property
    def pending(self) -> int:
        """Layers whose update is pending."""
        return len(self._pending)

    def apply_layer(self, k: int) -> None:
        """Apply layer ``k``'s pending update, if any (without autograd, and outside any perturbation
        mode: the update writes the parameters themselves)."""
        entry = self._pending.pop(k, None)
        if entry is None:
            return
        estimate, moves = entry
        with torch.no_grad(), torch._C.DisableTorchFunction():
            self._apply(estimate, moves)
        for _, p, _, _ in moves:
            setattr(p, PENDING, False)

    def flush(self) -> None:
        """Apply every pending update now, layer by layer (on the device, with the host tier; the host
        tensors are current afterwards)."""
        for k in sorted(self._pending):
            with self._host.resident(k) if self._host is not None else nullcontext():
                self.apply_layer(k)
        if self._host is not None:
            self._host.synchronize()

    def remove(self) -> None:
        """Apply what is pending and stop deferring."""
        self.flush()
        for hook in self._hooks:
            hook.remove()
