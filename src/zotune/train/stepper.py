"""One training step, chosen once per run: ``step(batch) -> (loss, forward passes)``.

* :class:`FirstOrderStep`: forward, backward, ``optimizer.step()`` (FO-SGD, FO-AdamW; under DDP
  with several processes).
* :class:`ZerothOrderStep`: the ZO optimizer's step on a closure (its probes), the record handed
  on (the trajectory), then, for hybrid ZO-FO, a first-order step on the upper layers.

The trainer, ``zotune memory`` and the benchmarks take the same steps through :func:`make_step`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

Loss = Callable[[Any, Any], torch.Tensor]  # (model, batch) -> scalar loss


def first_order_step(
    opt: torch.optim.Optimizer, model, loss: Loss, batch, frozen: Sequence[torch.nn.Parameter] = (),
    reduce: Callable[[list[float]], list[float]] | None = None, dropout: bool = False,
) -> float:
    """Forward, backward, step. ``frozen`` parameters (hybrid ZO-FO's ZO part) do not require
    grad meanwhile, so autograd keeps no activations below the first FO layer. ``reduce``
    (several processes, ``model`` under DDP): the global batch's loss, so that every rank takes
    the same decision to skip a non-finite step before DDP's backward. ``dropout``: the model in
    training mode for this step (its own dropout, drawn from the checkpointed torch RNG), evaluation
    mode again after it."""
    for p in frozen:
        p.requires_grad_(False)
    if dropout:
        model.train()
    try:
        opt.zero_grad(set_to_none=True)
        value_t = loss(model, batch)
        value = float(value_t.detach())
        if reduce is not None:
            value = reduce([value])[0]
        if not math.isfinite(value):  # skip, as the ZO optimizers do
            return value
        value_t.backward()
        opt.step()
        return value
    finally:
        model.eval()
        for p in frozen:
            p.requires_grad_(True)


class FirstOrderStep:
    """A first-order step: one forward pass (its backward is not counted)."""

    def __init__(self, opt: torch.optim.Optimizer, model, loss: Loss, frozen: Sequence[torch.nn.Parameter] = (),
                 reduce: Callable[[list[float]], list[float]] | None = None, dropout: bool = False):
        self.opt, self.model, self.loss, self.frozen, self.reduce, self.dropout = opt, model, loss, frozen, reduce, dropout

    def __call__(self, batch) -> tuple[float, int]:
        return first_order_step(self.opt, self.model, self.loss, batch, self.frozen, self.reduce, self.dropout), 1


class ZerothOrderStep:
    """A zeroth-order step (its probes: ``opt.forwards_per_step``), its record to ``record``, then
    ``then`` (hybrid ZO-FO: the first-order step of the upper layers)."""

    def __init__(self, opt, probe, objective: Loss, record: Callable[[Any], None] | None = None,
                 then: FirstOrderStep | None = None):
        self.opt, self.probe, self.objective, self.record, self.then = opt, probe, objective, record, then

    def __call__(self, batch) -> tuple[float, int]:
        loss = float(self.opt.step(lambda: self.objective(self.probe, batch)))
        forwards = self.opt.forwards_per_step
        if self.record is not None:
            self.record(self.opt.last_record)
        if self.then is not None:
            forwards += self.then(batch)[1]
        return loss, forwards


def make_step(opt, fo_opt, zo_params: Sequence[torch.nn.Parameter], *, model, loss: Loss, zeroth_order: bool,
              probe=None, objective: Loss | None = None, fo_model=None, record: Callable[[Any], None] | None = None,
              reduce: Callable[[list[float]], list[float]] | None = None, dropout: bool = False):
    """The run's step. ZO: ``opt`` probes ``probe`` (default ``model``) on ``objective`` (default
    ``loss``), with ``fo_opt`` (hybrid) then stepping ``model`` by backward, ``zo_params`` frozen.
    FO: ``opt`` steps ``fo_model`` (default ``model``; under DDP its wrapper), ``reduce`` sharing the
    loss between processes. ``dropout``: first-order steps in training mode."""
    if not zeroth_order:
        return FirstOrderStep(opt, fo_model if fo_model is not None else model, loss, reduce=reduce, dropout=dropout)
    then = FirstOrderStep(fo_opt, model, loss, frozen=zo_params, dropout=dropout) if fo_opt is not None else None
    return ZerothOrderStep(opt, probe if probe is not None else model, objective or loss, record, then)
