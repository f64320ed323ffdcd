"""ZO-Muon: Muon's orthogonalised momentum on the SPSA estimate."""

from __future__ import annotations

import math

import torch

from ..estimators.spsa import GradientEstimate
from .momentum import ZOSGDMomentum
from .newton_schulz import newton_schulz


class ZOMuon(ZOSGDMomentum):
    """``M <- momentum * M + grad_hat``; for a matrix ``W <- W - lr * scale * NS(M)`` with
    ``scale = sqrt(max(1, rows / cols))`` and ``NS`` five Newton-Schulz iterations; parameters
    of other shapes (norms, biases) take the momentum step ``W <- W - lr * M``, and so do the
    matrices of a param group with ``orthogonalize: False``: as in Muon, the token embeddings
    and the LM head are not hidden layers (``param_groups_for`` puts them in such a group;
    orthogonalising a 49152 x 576 embedding would also cost more than the two forwards).

    The SPSA estimate ``g * z`` is a random matrix scaled by ``g``; orthogonalised, every
    singular value of the step is about ``lr * scale`` whatever the size of ``g``: the step
    length is fixed, as in a sign method. ``M`` is float32. That step length suits no plain
    momentum step, so those parameters take ``plain_lr`` when given (as Muon pairs itself with
    AdamW at its own lr); otherwise ``lr``.
    """

    normalised_step = True  # each coordinate moves by about lr
    default_lr: dict[tuple[int, str], float] = {}  # the family's (not ZOSGDMomentum's): its sweep is not done

    elementwise = False  # Newton-Schulz: matrix maths on torch's own threads

    def __init__(
        self, params, lr: float, eps: float = 1e-3, seed: int = 0, momentum: float = 0.95, ns_steps: int = 5,
        plain_lr: float | None = None, **options,
    ):
        if not isinstance(ns_steps, int) or ns_steps < 1:
            raise ValueError(f"ns_steps must be an int >= 1, got {ns_steps!r}")
        if plain_lr is not None and not (isinstance(plain_lr, (int, float)) and plain_lr >= 0):
            raise ValueError(f"plain_lr must be a number >= 0, got {plain_lr!r}")
        super().__init__(params, lr=lr, eps=eps, seed=seed, momentum=momentum,
                         defaults=dict(ns_steps=ns_steps, orthogonalize=True, plain_lr=plain_lr), **options)

    @classmethod
    def param_groups_for(cls, model: torch.nn.Module, params: list) -> list:
        """``params`` (tensors or param groups) with the model's input and output embeddings
        moved into groups of their own with ``orthogonalize: False``."""
        embeddings = {id(m.weight) for m in (model.get_input_embeddings(), model.get_output_embeddings())
                      if m is not None and getattr(m, "weight", None) is not None}
        groups = params if params and isinstance(params[0], dict) else [{"params": list(params)}]
        out = []
        for group in groups:
            hidden = [p for p in group["params"] if id(p) not in embeddings]
            embedding = [p for p in group["params"] if id(p) in embeddings]
            out += [{**group, "params": hidden}] if hidden else []
            out += [{**group, "params": embedding, "orthogonalize": False}] if embedding else []
        return out

    def update_param(
        self, p: torch.Tensor, index: int, estimate: GradientEstimate, group: dict, state: dict
    ) -> None:
        """ZO-Muon: ``lr * scale * NS(M)`` for a matrix of an orthogonalised group; the momentum step (at
        ``plain_lr`` when given) for every other parameter."""
        m = self.accumulate(p, index, estimate, group, state)
        self.decay(p, group)
        if p.ndim != 2 or not group["orthogonalize"]:  # norms, biases, embeddings: momentum SGD
            p.add_(m, alpha=-(group["lr"] if group["plain_lr"] is None else group["plain_lr"]))
            return
        scale = math.sqrt(max(1.0, p.shape[0] / p.shape[1]))
        p.add_(newton_schulz(m, group["ns_steps"]), alpha=-group["lr"] * scale)
