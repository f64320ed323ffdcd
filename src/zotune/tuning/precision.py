"""Does zeroth-order training work at the trainable weights' precision? A check before training.

ZO in float16 / bfloat16 fails silently in two places, both relative to a weight's own ulp:

* the probe: ``w + eps*z`` rounds back to ``w`` (float16 has 11 significant bits, bfloat16 8),
  so both probes see the same model and the projected gradient is noise or zero;
* the update: ``w - lr*g*z`` rounds back to ``w`` when the step is under half an ulp of w
  (MeZO's full-FT lr 1e-6 against bfloat16 weights of magnitude 0.02, ulp 1.2e-4).

:func:`precision_report` measures both on a seeded sample of coordinates of every
half-precision trainable tensor, with the engine's own kernel (``torch.add`` of float32 z into
the weight's dtype). The step size ``lr * |g|`` uses the typical projected gradient ``|g|``,
measured by :func:`typical_projected_grad` with a few SPSA probes on a training batch (for
the sign / Adam / Muon rules, whose per-coordinate step is about ``lr`` whatever ``g`` is, the
step is ``lr``, times the optimizer's ``coordinate_sizes``: an orthogonalised matrix step, ZO-Muon's,
moves an entry by far less). :func:`check_precision` turns the report into a ConfigError (or a warning,
``tuning.precision_check``) when more than ``THRESHOLD`` of the coordinates would not move.

The remedy for the adapter schemes is ``tuning.trainable_dtype: float32``: LoRA / prefix /
prompt weights in float32 over a half-precision base (a linear head is always float32).
"""

from __future__ import annotations

import functools
import statistics
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..config import OWN_WEIGHTS_SCHEMES, Config
from ..errors import ConfigError
from ..estimators.spsa import SPSA
from ..optim.factory import resolved_settings, run_hparams
from ..optim.registry import zo_class

HALF = (torch.float16, torch.bfloat16)
THRESHOLD = 0.5  # the share of coordinates that may not move before training is called collapsed
SAMPLES = 4096  # coordinates sampled per tensor
_SEED = 0x5EED


@dataclass
class PrecisionReport:
    """What :func:`precision_report` measured: the half-precision dtypes and their coordinates, and the shares a
    probe and an update leave unchanged."""

    dtypes: list[str]  # half-precision dtypes among the trainable weights
    numel: int  # their coordinates
    probe_lost: float  # share of coordinates where w + eps*z == w
    update_lost: float | None  # share where w - step*z == w (None: step unknown)
    step: float | None  # the step size used: lr * |g| (or lr), times the per-coordinate sizes (mean over coordinates)


def precision_report(
    params: list[torch.Tensor], eps: float | None, step: float | None,
    distribution: str = "gaussian", samples: int = SAMPLES, seed: int = _SEED,
    sizes: Callable[[torch.Size], tuple[float, float]] | None = None,
) -> PrecisionReport | None:
    """Shares of the half-precision trainable coordinates that a probe of size ``eps`` and an
    update of size ``step`` (times z) leave unchanged. None if no trainable weight is in half
    precision. ``eps`` / ``step`` None: that part is not measured (reported as 0 / None).
    ``sizes``: a tensor's (probe, update) size per coordinate relative to those, by its shape (an
    optimizer's ``coordinate_sizes``; 1, 1 when not given)."""
    half = [p for p in params if p.dtype in HALF and p.numel()]
    if not half:
        return None
    gen = torch.Generator().manual_seed(seed)
    total = sum(p.numel() for p in half)
    probe = update = mean_step = 0.0
    for p in half:
        flat = p.detach().reshape(-1)
        idx = torch.randint(0, flat.numel(), (min(samples, flat.numel()),), generator=gen, device="cpu")
        w = flat[idx.to(flat.device)]
        if distribution == "rademacher":
            z = torch.randint(0, 2, (len(idx),), generator=gen).float().mul_(2).sub_(1)
        else:
            z = torch.randn(len(idx), generator=gen)
        z = z.to(flat.device)
        weight = p.numel() / total
        probe_size, update_size = sizes(p.shape) if sizes is not None else (1.0, 1.0)
        if eps is not None:
            probe += weight * _unchanged(w, z, eps * probe_size)
        if step is not None:
            update += weight * _unchanged(w, z, -step * update_size)
            mean_step += weight * step * update_size
    return PrecisionReport(sorted({str(p.dtype).removeprefix("torch.") for p in half}), total, probe,
                           update if step is not None else None, mean_step if step is not None else None)


def _unchanged(w: torch.Tensor, z: torch.Tensor, scale: float) -> float:
    """Share of ``w`` that ``w + scale*z`` (computed as the engine does) leaves bit-identical."""
    return float((torch.add(w, z, alpha=scale).to(w.dtype) == w).float().mean())


@torch.no_grad()
def typical_projected_grad(closure: Callable[[], object], params: list[torch.Tensor], eps: float,
                           distribution: str = "gaussian", queries: int = 2, seed: int = _SEED) -> float | None:
    """Median |projected gradient| of ``queries`` SPSA probes (2 forwards each); None if not finite."""
    estimate = SPSA(eps, queries, distribution).estimate(closure, params, list(range(len(params))), seed)
    grads = [abs(g) for g in estimate.projected_grads]
    if not all(torch.isfinite(torch.tensor(grads))):
        return None
    return statistics.median(grads)


def check_precision(cfg: Config, params: list[torch.Tensor], closure: Callable[[], object] | None,
                    log=print) -> PrecisionReport | None:
    """The guard, before zeroth-order training: measure (``precision_report``) and raise a
    ConfigError naming the remedy, or log a warning (``tuning.precision_check: warn``), when
    more than ``THRESHOLD`` of the trainable half-precision coordinates would not move.
    ``closure`` (the loss on a training batch) measures the typical projected gradient; None
    skips the update part. Nothing to do for float32 weights or first-order optimizers."""
    mode, cls = cfg.tuning.precision_check, zo_class(cfg.optimizer.name)
    if mode == "ignore" or cls is None or not any(p.dtype in HALF for p in params):
        return None
    lr, eps = run_hparams(cfg)
    probe_eps = None if cls.needs_forward_ad else eps  # a JVP has no probe
    dist = cfg.optimizer.distribution
    options = resolved_settings(cfg)["options"]
    sizes = functools.partial(cls.coordinate_sizes, options=options)
    report = precision_report(params, probe_eps, None, dist, sizes=sizes)
    if report.probe_lost <= THRESHOLD and lr > 0:
        step = lr if cls.normalised_step else None
        if step is None and closure is not None:
            g = typical_projected_grad(closure, params, eps, dist)
            step = None if g is None else lr * g
        if step is not None:
            report = precision_report(params, probe_eps, step, dist, sizes=sizes)
    problem = _problem(report, lr, eps)
    if problem is None:
        return report
    what, knob = problem
    if mode == "error":
        raise ConfigError(f"{what}; {_remedy(cfg, knob)}, or tuning.precision_check=warn to train anyway")
    log(f"WARNING: {what}; {_remedy(cfg, knob)}")
    return report


def _problem(report: PrecisionReport, lr: float, eps: float) -> tuple[str, str] | None:
    """(what goes wrong, the hyperparameter whose increase helps), or None."""
    dtypes = "/".join(report.dtypes)
    if report.probe_lost > THRESHOLD:
        what = (f"zeroth-order training in {dtypes} would not perturb {report.probe_lost:.0%} of the trainable "
                f"coordinates (w + eps*z == w with optimizer.eps={eps:g}): the probes cannot see the loss change")
        return what, "optimizer.eps"
    if report.update_lost is not None and report.update_lost > THRESHOLD:
        what = (f"zeroth-order training in {dtypes} would leave {report.update_lost:.0%} of the trainable "
                f"coordinates unchanged at every step (the step, about {report.step:.2g}*z per coordinate with "
                f"optimizer.lr={lr:g}, is under half an ulp of the weights)")
        return what, "optimizer.lr"
    return None


def _remedy(cfg: Config, knob: str) -> str:
    if cfg.tuning.scheme in OWN_WEIGHTS_SCHEMES:
        return (f"remedies: model.dtype=float32, or an adapter scheme (tuning.scheme=lora) with "
                f"tuning.trainable_dtype=float32, or a larger {knob}")
    return (f"remedies: tuning.trainable_dtype=float32 (the adapter weights in float32 over the "
            f"{cfg.model.dtype} base), or a larger {knob}")
