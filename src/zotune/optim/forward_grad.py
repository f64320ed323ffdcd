"""ForwardGrad: SGD on the forward gradient (ZO-Bench's Forward-Grad baseline)."""

from __future__ import annotations

from ..estimators.forward_grad import ForwardGradient
from .sgd import ZOSGD


class ForwardGrad(ZOSGD):
    """``x <- x - lr * ((1/q) sum_j (grad f . z_j) z_j + weight_decay * x)``.

    The closure runs once per query under forward-mode AD (``step`` keeps it under
    ``no_grad``, which forward AD ignores); its return value must depend on the parameters
    through differentiable torch ops, all with forward-AD rules (for Hugging Face models:
    ``model.set_attn_implementation("eager")``; SDPA's CPU flash kernel has none). ``eps`` is accepted for a uniform signature and unused:
    the directional derivative is exact. The step's record holds the JVPs as
    ``projected_grads``.
    """

    summary = "Forward-Grad: the exact directional derivative by forward-mode AD, one forward per query (Baydin et al. 2022)"

    forwards_per_query = 1
    needs_forward_ad = True  # the trainer switches HF models to eager attention

    def __init__(self, params, lr: float, eps: float = 1e-3, seed: int = 0, n_queries: int = 1,
                 distribution: str = "gaussian", weight_decay: float = 0.0):
        super().__init__(params, lr=lr, eps=eps, seed=seed, n_queries=n_queries,
                         distribution=distribution, weight_decay=weight_decay)
        self.estimator = ForwardGradient(n_queries, distribution)
