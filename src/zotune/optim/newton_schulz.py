"""Newton-Schulz orthogonalisation, as in Keller Jordan's Muon."""

from __future__ import annotations

import torch


def newton_schulz(g: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """Approximately ``U V^T`` for ``g = U S V^T`` (every singular value pushed towards 1).

    Quintic iteration ``X <- a X + b (X X^T) X + c (X X^T)^2 X`` with a, b, c = 3.4445,
    -4.7750, 2.0315 on the Frobenius-normalised matrix, in float32, transposed so that the
    Gram matrix is the small side. The result's singular values land in about [0.7, 1.2]:
    fast rather than exact, which is all Muon needs.
    """
    if g.ndim != 2:
        raise ValueError(f"newton_schulz needs a matrix, got shape {tuple(g.shape)}")
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.float() / (g.float().norm() + eps)
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x
