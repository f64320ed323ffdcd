"""The training recipe: config -> task, model, scheme -> optimizer -> loop -> run directory.

Reads top to bottom like a torchtune recipe. Zeroth-order optimizers get a closure that runs
one forward on the batch (the optimizer calls it 2q times, under ``no_grad``); first-order
baselines (``torch.optim.SGD`` / ``AdamW``) go through the same loop with ``backward``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import math
import random
import resource
import sys
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from collections.abc import Iterator
from typing import Any

import torch
from tqdm.auto import tqdm

from ..config import Config, OptimizerConfig
from ..distributed import SINGLE, LossExchange, World, check_batch, check_queries, data_parallel
from ..errors import ConfigError, TrainingError
from ..estimators.directions import mix
from ..models import load_model
from ..models.loader import input_device
from ..optim.base import ZOOptimizer
from ..optim.factory import build_optimizer, defaults_row, run_forwards_per_step, run_hparams
from ..optim.registry import is_zeroth_order, zo_class
from ..tasks import Example, TaskData, load_task, task_spec
from ..trajectory import FILENAME as TRAJECTORY
from ..trajectory import TrajectoryWriter, weights_sha256
from ..tuning import apply_scheme, check_precision, hybrid_split, layer_blocks, transformer_layers
from ..tuning.frozen_prefix import FrozenPrefix, supports_frozen_prefix
from .baselines import icl_prefix, linear_probe
from .checkpoint import Checkpoint, Checkpoints, Progress, RunInterrupted, read_checkpoint, stop_on_signal
from .evaluate import EvalResult, evaluate, task_metrics
from .plots import plot_training
from .rundir import RunDir
from .schedule import Schedule
from .scoring import Scorer, make_scorer
from .stepper import make_step
from .trajectory_resume import TrajectoryResume
from .weights import FILENAME as WEIGHTS
from .weights import load_weights, named_trainable, save_weights


BEST_WEIGHTS = "best.safetensors"  # train.keep_best: the trainable weights at the best dev evaluation
ICL_MAX_LENGTH = 1024  # eval.max_length's default for in-context learning: room for the demonstrations


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (MB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_memory() -> dict[str, float]:
    """The summary's memory figures: host ``peak_rss_mb``, and on CUDA what matters there,
    ``peak_cuda_allocated_mb`` / ``peak_cuda_reserved_mb`` (torch's peak counters, this device)."""
    out = {"peak_rss_mb": round(peak_rss_mb(), 1)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["peak_cuda_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        out["peak_cuda_reserved_mb"] = round(torch.cuda.max_memory_reserved() / 2**20, 1)
    return out


def device_summary(model: torch.nn.Module) -> dict[str, str]:
    """Where the run computed: ``device`` (its type: cpu, cuda, mps) and, on a GPU, ``device_name``
    (e.g. "NVIDIA H200"); results.csv shows the type, the name says which GPU made the wall times."""
    device = input_device(model)
    out = {"device": device.type}
    if device.type == "cuda":
        out["device_name"] = torch.cuda.get_device_name(device)
    return out


@lru_cache(maxsize=4)
def _epoch_order(seed: int, epoch: int, n: int) -> tuple[int, ...]:
    order = list(range(n))
    random.Random(mix(seed, epoch)).shuffle(order)
    return tuple(order)


def batch_indices(step: int, batch_size: int, n: int, seed: int) -> list[int]:
    """Examples of a step's batch: consecutive slices of seeded per-epoch shuffles.

    A pure function of (step, seed), so a resumed run draws the same batches."""
    out = []
    for pos in range(step * batch_size, (step + 1) * batch_size):
        epoch, offset = divmod(pos, n)
        out.append(_epoch_order(seed, epoch, n)[offset])
    return out


@dataclass
class Session:
    """Everything a run needs, built once from the config."""

    cfg: Config
    data: TaskData | None  # None: the model alone (replay)
    model: torch.nn.Module
    tokenizer: Any
    scorer: Scorer
    trainable: list[torch.nn.Parameter] = field(default_factory=list)
    world: World = field(default_factory=lambda: SINGLE)  # several processes: shards evaluation

    @classmethod
    def build(cls, cfg: Config, log=print, with_data: bool = True, world: World = SINGLE) -> Session:
        """Load the task's data (unless ``with_data`` is False), the model and its tokenizer, apply the tuning
        scheme and make the scorer; a ConfigError when a max length exceeds the model's positions."""
        spec = task_spec(cfg.task)
        data = None
        if with_data:
            data = load_task(spec, seed=cfg.seed)
            log(f"task {spec.name}: {len(data.train)} train / {len(data.dev)} dev / {len(data.test)} test examples")
        t0 = time.perf_counter()
        model, tokenizer = load_model(cfg.model.name, dtype=cfg.model.dtype, device=cfg.model.device,
                                      device_map=cfg.model.device_map, offload=cfg.model.offload,
                                      offload_dir=cfg.model.offload_dir)
        n_params = sum(p.numel() for p in model.parameters())
        log(f"model {cfg.model.name}: {n_params / 1e6:.1f}M parameters, {cfg.model.dtype}, loaded in {time.perf_counter() - t0:.1f}s")
        limit = getattr(model.config, "max_position_embeddings", None)
        for key, length in (("train.max_length", cfg.train.max_length), ("eval.max_length", cfg.eval.max_length)):
            if limit is not None and length is not None and length > limit:
                raise ConfigError(f"{key} is {length}, but {cfg.model.name} reads at most {limit} positions")
        if (zo := zo_class(cfg.optimizer.name)) is not None and zo.needs_forward_ad:
            model.set_attn_implementation("eager")  # SDPA's CPU kernel has no forward-AD rule
        torch.manual_seed(cfg.seed)  # adapters and heads initialise from the run seed: replayable
        model, trainable = apply_scheme(model, cfg.tuning)
        # Dropout off (peft leaves a LoRA model in training mode). ZO probes are then deterministic
        # functions of the weights, as in MeZO's zo_forward: the + and - probes of a query differ only
        # by the direction, and a replay sees what training saw. First-order steps switch to training
        # mode themselves under train.dropout=model_default.
        model.eval()
        scorer = make_scorer(tokenizer, spec, cfg.train.max_length, model)
        trainable += scorer.parameters()  # align: false -> the linear head, tuned alongside
        return cls(cfg, data, model, tokenizer, scorer, trainable, world)

    def eval_scorer(self, prefix: str = "", log=print) -> Scorer:
        """A scorer for evaluation: ``eval.max_length`` (default: train's; with a prefix 1024, or
        the model's maximum positions when it reads fewer)."""
        length = self.cfg.eval.max_length or (ICL_MAX_LENGTH if prefix else self.cfg.train.max_length)
        limit = getattr(self.model.config, "max_position_embeddings", None)
        if self.cfg.eval.max_length is None and limit is not None and length > limit:
            log(f"eval.max_length: {length} tokens do not fit {self.cfg.model.name} ({limit} positions); using {limit}")
            length = limit
        if prefix:
            return make_scorer(self.tokenizer, self.data.spec, length, self.model, prefix)
        if length == self.scorer.max_length:
            return self.scorer
        scorer = copy.copy(self.scorer)  # shares a linear head (align: false) with training
        scorer.max_length = length
        return scorer

    def probe_model(self, log=print) -> torch.nn.Module | FrozenPrefix:
        """What training forwards call: the model, or under the ``top`` scheme its frozen-prefix
        activation cache (the probes start at the lowest tuned layer)."""
        top = self.cfg.tuning.top
        if self.cfg.tuning.scheme != "top" or not top.cache:
            return self.model
        if not supports_frozen_prefix(self.model):
            log(f"tuning.top.cache: no activation cache for model type {self.model.config.model_type!r}; "
                "the probes run full forwards")
            return self.model
        return FrozenPrefix(self.model, len(transformer_layers(self.model)) - top.layers)

    def named_trainable(self) -> list[tuple[str, torch.nn.Parameter]]:
        """``(name, parameter)`` of every trainable tensor, the linear head's included."""
        return named_trainable(self.model, getattr(self.scorer, "head", None), self.trainable)

    def optimizers(self, log=print) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer | None, list]:
        """The configured optimizer over the trainable parameters (block-wise: one param group
        per layer); with hybrid ZO-FO also the FO optimizer of the upper layers. Returns
        ``(optimizer, fo_optimizer or None, ZO parameters)``."""
        cfg, model = self.cfg, self.model
        if self.data is not None:  # ZO in half precision: would probes and updates register? (ConfigError if not)
            first = self.scorer.encode(self.data.train[: cfg.train.batch_size])
            check_precision(cfg, self.trainable, lambda: self.scorer.loss(model, first), log)
        params, fo_params = self.trainable, []
        hybrid = cfg.tuning.hybrid
        if hybrid.zo_layers is not None:
            params, fo_params = hybrid_split(model, self.trainable, hybrid.zo_layers)
        zo_params = params
        if cfg.optimizer.blockwise:
            params = layer_blocks(model, params)
        if is_zeroth_order(cfg.optimizer.name):
            params = zo_class(cfg.optimizer.name).param_groups_for(model, params)
        opt = build_optimizer(cfg.optimizer, params, defaults_row(cfg.tuning), cfg.seed, cfg.version)
        if isinstance(opt, ZOOptimizer):
            if _engine_mode(cfg, opt, "dual_forward", "it needs each query's + and - probes: two-sided SPSA"):
                opt.dual_forward(model)
            if _engine_mode(cfg, opt, "fused_update", "its update or its directions are its own"):
                opt.fuse_update(model)
            elif cfg.model.offload == "cpu":
                raise ConfigError(f"model.offload: cpu updates each layer on the device through the fused update, "
                                  f"which {cfg.optimizer.name} does not take (its update or its directions are its own)")
        fo_opt = None
        if fo_params:
            fo_cfg = OptimizerConfig(name=hybrid.fo_optimizer, lr=hybrid.fo_lr)
            fo_opt = build_optimizer(fo_cfg, fo_params, defaults_row(cfg.tuning), cfg.seed, cfg.version)
            log(f"hybrid ZO-FO: {sum(p.numel() for p in zo_params) / 1e6:.2f}M parameters by {cfg.optimizer.name}, "
                f"{sum(p.numel() for p in fo_params) / 1e6:.2f}M by {hybrid.fo_optimizer}")
        return opt, fo_opt, zo_params

    def trajectory_header(self) -> dict[str, Any]:
        """Who made the trajectory: enough to rebuild the optimizer and check the start point."""
        cfg = self.cfg
        return {
            "format": "zotune-trajectory",
            "version": 2,
            "model": cfg.model.name,
            "dtype": cfg.model.dtype,
            "tuning": dataclasses.asdict(cfg.tuning),
            "optimizer": dataclasses.asdict(cfg.optimizer),
            "seed": cfg.seed,
            "initial_sha256": weights_sha256(self.named_trainable()),
            # z is drawn by each device type's own generator: a replay must run on the same type
            "device_type": "+".join(sorted({p.device.type for p in self.trainable})),
        }

    def test_examples(self) -> list[Example]:
        """The task's test examples, the first ``eval.max_examples`` when set."""
        n = self.cfg.eval.max_examples
        return self.data.test if n is None else self.data.test[:n]

    def evaluate(self, examples: list[Example], desc: str, scorer: Scorer | None = None) -> EvalResult:
        """Predictions and metrics; several processes each evaluate batches ``rank, rank + N, ...``
        (the batches one process would form) and all get the merged result."""
        scorer, size, world = scorer or self.eval_scorer(), self.cfg.eval.batch_size, self.world
        result = evaluate(self.model, scorer, world.batch_share(examples, size), size, desc=desc,
                          progress=sys.stderr.isatty() and world.is_main)
        if not world.distributed:
            return result
        predictions = world.gather_batches(result.predictions, size)
        return EvalResult(task_metrics(scorer.spec, predictions), predictions, -(-len(examples) // size))

    def compare_params(self, when: str) -> list[str] | None:
        """Several processes: every rank's SHA-256 of the trainable parameters, a TrainingError
        if they differ; one process: None (nothing to compare)."""
        if not self.world.distributed:
            return None
        return self.world.compare_digests(weights_sha256(self.named_trainable()), when)


def run_eval(cfg: Config, out: str | Path, overwrite: bool = False, log=print,
             weights: str | Path | None = None) -> dict[str, Any]:
    """`zotune eval`: a baseline on the task's test examples (``eval.baseline``): zero-shot,
    in-context learning, or linear probing on the frozen model; ``weights`` (a run's
    ``weights.safetensors``) loads tuned weights first."""
    run = RunDir(out, overwrite)
    t0 = time.perf_counter()
    session = Session.build(cfg, log)
    if weights is not None:
        load_weights(Path(weights), session.named_trainable())
        log(f"weights: {weights}")
    run.write_yaml("config.yaml", cfg.to_dict())  # after the data and model loaded: a bad one leaves no run
    baseline, test = cfg.eval.baseline, session.test_examples()
    if baseline == "linear_probe":
        result = linear_probe(session.model, session.scorer, session.data.train, test, cfg.eval.batch_size)
    elif baseline == "icl":
        prefix = icl_prefix(session.data.spec, session.data.train, cfg.eval.icl_shots, cfg.seed)
        result = session.evaluate(test, "icl eval", session.eval_scorer(prefix, log))
    else:
        result = session.evaluate(test, "eval")
    result.write_predictions(run.file("predictions.jsonl"))
    summary = {
        "baseline": baseline,
        "eval": result.metrics,
        "steps": 0,
        "forward_passes": 0,
        "eval_forward_passes": result.forward_passes,
        "n_test": len(result.predictions),
        **peak_memory(),
        **device_summary(session.model),
        "wall_s": round(time.perf_counter() - t0, 2),
    }
    run.write_json("summary.json", summary)
    for name, value in result.metrics.items():
        log(f"{baseline} {name}: {value:.4f} on {len(result.predictions)} test examples")
    return summary


def run_train(cfg: Config, out: str | Path, overwrite: bool = False, log=print, world: World = SINGLE,
              extend: bool = False) -> dict[str, Any]:
    """`zotune train`: (zero-shot eval), fine-tune, final eval; everything into the run dir.

    Checkpoints every ``train.checkpoint_every`` steps and on SIGTERM/SIGINT (then stops with
    :class:`RunInterrupted`); the same command on the same ``out`` resumes bit-identically.

    ``world`` (several processes, see zotune.distributed): rank 0 alone writes the run
    directory; zeroth-order optimizers exchange only their probe losses, first-order ones run
    under DDP; evaluation is sharded by batches; the ranks compare parameter digests at the
    start, at every evaluation and at the end.

    ``extend``: the zeroth-order run in ``out``, finished or not, goes on to ``train.steps`` (more than it was
    given) by replaying its trajectory, bit-identical to a run given those steps from the start (see
    :class:`RunDir` for what its config may change)."""
    _check_world(cfg, world)
    if extend and world.distributed:  # the rest of what --extend needs: RunDir
        raise ConfigError("--extend goes on by replaying the run's trajectory, in one process")
    # bad optimizer options: one line before anything loads
    run_forwards_per_step(cfg)
    log = log if world.is_main else _quiet
    t_start = time.perf_counter()
    # rank 0 first: it owns the run directory; its errors stop every rank once; it alone prints warnings
    with world.main_first(), _muted(not world.is_main):
        run = RunDir(out, overwrite, cfg.to_dict(), extend=extend) if world.is_main else None
        session = Session.build(cfg, log, world=world)
        optimizers = session.optimizers(log)  # first: a bad precision setup fails before any eval
        _check_optimizer_world(cfg, world, optimizers[0], session)
        if run is not None:
            run.write_yaml("config.yaml", cfg.to_dict())  # after data, model and optimizer: a bad one leaves no run
            if extend:
                run.forget_summary()
    training = Training(cfg, session, run, Path(out), world, log, *optimizers)
    training.start()
    training.loop()
    return training.finish(t_start)


class Training:
    """One run of :func:`run_train` after its set-up: ``start`` (resume point, zero-shot evaluation,
    trajectory, the step), ``loop`` (steps, evaluations, logs, checkpoints), ``finish`` (weights,
    best-on-dev, final evaluation, summary, plot)."""

    def __init__(self, cfg: Config, session: Session, run: RunDir | None, out: Path, world: World, log,
                 opt: torch.optim.Optimizer, fo_opt: torch.optim.Optimizer | None, zo_params: list):
        self.cfg, self.session, self.run, self.out, self.world, self.log = cfg, session, run, out, world, log
        self.opt, self.fo_opt, self.zo_params = opt, fo_opt, zo_params
        self.tcfg, self.metric = cfg.train, session.data.spec.metric
        self.zo = is_zeroth_order(cfg.optimizer.name)
        self.test = session.test_examples()
        self.optimizers = {"optimizer": opt, "fo_optimizer": fo_opt}
        self.schedule = Schedule([o for o in (opt, fo_opt) if o is not None], self.tcfg.lr_schedule, self.tcfg.steps,
                                 self.tcfg.warmup_steps)
        self.checkpoints = Checkpoints(out / "checkpoints", self.tcfg.checkpoint_every, log)
        self.trajectory: TrajectoryWriter | None = None
        self.exchange = LossExchange(world, self.tcfg.parallel) if world.distributed else None
        self.ddp_bytes = {"bytes": 0}
        self.steps_here = 0
        self.wall_before = 0.0  # training wall time of the processes this run resumed (summary's wall_s counts it)
        self.diverged_at = 0  # the step at which train.divergence_ratio ended the run (0: it did not)
        self.stopped_early_at = 0  # the step at which train.early_stop_patience ended the run (0: it did not)

    def start(self) -> None:
        """The resume point or a fresh start (zero-shot evaluation), the trajectory, the step."""
        cfg, session, run, tcfg, opt = self.cfg, self.session, self.run, self.tcfg, self.opt
        resumed = _resume_point(self.world, run, self.checkpoints)
        replayed = self.trajectory_resume(resumed)
        if run is not None and run.resuming and resumed is None and replayed is None:
            self.log(f"no checkpoint or trajectory to resume from in {run.path}: starting the run over")
        self.progress = progress = replayed.progress if replayed else resumed.progress if resumed else Progress()
        if run is not None:
            run.keep_records("metrics.jsonl", progress.step)
        if cfg.eval.zero_shot and progress.zero_shot is None:
            before = session.evaluate(self.test, "zero-shot eval")
            if run is not None:
                before.write_predictions(run.file("predictions_zero_shot.jsonl"))
            progress.zero_shot = before.metrics
        if progress.zero_shot:
            self.log(f"zero-shot {self.metric}: {progress.zero_shot[self.metric]:.4f}")
        lr, eps = self.hparams = run_hparams(cfg)
        self.log(f"training {cfg.optimizer.name} ({cfg.tuning.scheme}): lr={lr:g}" + (f" eps={eps:g}" if self.zo else "")
                 + f", {tcfg.steps} steps of batch {tcfg.batch_size}"
                 + (f" on {self.world.size} processes ({tcfg.parallel} parallel)" if self.world.distributed else ""))
        if self.zo and run is not None:
            self.trajectory = TrajectoryWriter(run.file(TRAJECTORY), session.trajectory_header(),
                                               opt.n_queries * len(opt.blocks()), len(opt.param_groups),
                                               keep=progress.step if replayed else
                                               resumed.trajectory_records if resumed else None,
                                               n_extra=opt.extra_values_per_step)
        if resumed:  # after the trajectory header hashed the initial weights
            resumed.restore(session.named_trainable(), self.optimizers)
            if not replayed:
                self.log(f"resuming at step {progress.step} from {resumed.path}")
        if replayed:  # on to the last logged step by replaying the trajectory (no forward pass)
            replayed.restore(opt, session.named_trainable, run.file(BEST_WEIGHTS) if tcfg.keep_best else None, self.log)
        session.compare_params(f"at step {progress.step}")  # several processes: the same start everywhere
        self.probe = session.probe_model(self.log)
        exchange = self.exchange
        if exchange and self.zo:
            opt.loss_reducer = exchange
        objective = session.scorer.loss
        if tcfg.objective != "loss":  # MeZO 3.4: minus the batch metric, a non-differentiable objective
            objective = lambda model, batch: session.scorer.objective(model, batch, tcfg.objective)  # noqa: E731
        fo_model = data_parallel(session.model, self.ddp_bytes) if exchange and not self.zo else self.probe  # FO: DDP
        self.take_step = make_step(opt, self.fo_opt, self.zo_params, model=session.model, loss=session.scorer.loss,
                                   zeroth_order=self.zo, probe=self.probe, objective=objective, fo_model=fo_model,
                                   record=self.trajectory.append if self.trajectory is not None else None,
                                   reduce=exchange.reduce if exchange else None,
                                   dropout=tcfg.dropout == "model_default")  # first-order steps in training mode

    def trajectory_resume(self, checkpoint: Checkpoint | None) -> TrajectoryResume | None:
        """A resuming zeroth-order run goes on by replaying its trajectory past ``checkpoint`` (or from the start,
        with none left) to the last step metrics.jsonl logged: one process, no first-order part (what the
        trajectory alone rebuilds); None where it cannot or need not."""
        run, cfg = self.run, self.cfg
        if (run is None or not run.resuming or not self.zo or self.world.distributed
                or cfg.tuning.hybrid.zo_layers is not None):
            return None
        return TrajectoryResume.find(run.path, self.metric, self.tcfg.keep_best, checkpoint)

    def loop(self) -> None:
        """Every step from the resume point; a signal stops it after a step, with a checkpoint."""
        tcfg, progress, exchange = self.tcfg, self.progress, self.exchange
        train = self.session.data.train
        self.wall_before = progress.wall_s
        progress.start_clock()
        self.interactive = sys.stderr.isatty() and self.world.is_main
        bar = tqdm(range(progress.step, tcfg.steps), desc="train", unit="step", disable=not self.interactive,
                   initial=progress.step, total=tcfg.steps)
        with stop_on_signal() as stop:
            if exchange:  # every exchange also carries the stop request: all ranks stop after the same step
                exchange.stop = lambda: stop.signal is not None
            for step in bar:
                indices = batch_indices(step, tcfg.batch_size, len(train), self.cfg.seed)
                if exchange:
                    if tcfg.parallel == "data":  # this rank's shard of the global batch
                        indices = self.world.shard(indices)
                    exchange.begin(step + 1, len(indices))
                batch = self.session.scorer.encode([train[i] for i in indices])
                self.schedule.set(step)
                with _out_of_memory_reported(batch):
                    loss, forwards = self.take_step(batch)
                progress.forwards += forwards
                self.steps_here += 1
                self.after_step(step + 1, loss)
                bar.set_postfix(loss=f"{loss:.4f}", fwd=progress.forwards)
                if self.diverged_at or self.stopped_early_at:
                    break
                stopping = exchange.stop_agreed if exchange else stop.signal is not None
                if stopping or self.checkpoints.due(step + 1):
                    self.settle()
                    path = (self.checkpoints.save(progress, self.session.named_trainable(), self.optimizers, self.trajectory)
                            if self.run else None)
                    self.world.barrier()  # the other ranks wait for rank 0's write here, not in the next exchange
                    if stopping:
                        bar.close()
                        raise RunInterrupted(f"interrupted ({stop.signal or 'by another process'}) at step {step + 1}; "
                                             f"checkpoint written to {path}; run the same command again to resume")
        bar.close()
        self.train_wall = progress.elapsed()

    def check_divergence(self, done: int, loss: float) -> None:
        """End the run after step ``done`` if its loss passed ``train.divergence_ratio`` times the first step's
        (``diverged_at``, the summary's ``diverged_at_step``): a sweep's cell stops instead of spending its budget
        on a diverged lr."""
        ratio, losses = self.tcfg.divergence_ratio, self.progress.losses
        if ratio and losses and loss > ratio * losses[0]:
            self.log(f"diverged: the loss of step {done}, {loss:.4g}, is over {ratio:g}x the first step's "
                     f"({losses[0]:.4g}); the run ends here (train.divergence_ratio)")
            self.diverged_at = done

    def check_patience(self, done: int) -> None:
        """End the run after step ``done`` if its last ``train.early_stop_patience`` dev evaluations did not pass the
        best one (``stopped_early_at``, the summary's ``stopped_early_at_step``): a function of the dev curve alone,
        so a resumed run stops where the uninterrupted one does."""
        patience, dev = self.tcfg.early_stop_patience, self.progress.dev
        since = evaluations_since_best(dev)
        if patience and since >= patience:
            best_step, best = dev[-1 - since]
            self.log(f"early stop: dev {self.metric} has not passed {best:.4f} (step {best_step}) in {since} "
                     f"evaluations; the run ends at step {done} (train.early_stop_patience)")
            self.stopped_early_at = done

    def after_step(self, done: int, loss: float) -> None:
        """The step's bookkeeping: the NaN guard, dev and test evaluations, metrics.jsonl, a progress line."""
        tcfg, progress, session, metric = self.tcfg, self.progress, self.session, self.metric
        non_finite = progress.non_finite = 0 if math.isfinite(loss) else progress.non_finite + 1
        if tcfg.max_skipped_in_a_row and non_finite >= tcfg.max_skipped_in_a_row:
            raise TrainingError(f"the loss was NaN/inf for {non_finite} steps in a row (steps {done + 1 - non_finite}"
                                f"-{done}; each was skipped, the weights are those before them): lower "
                                "optimizer.lr / optimizer.eps, or use float32 (train.max_skipped_in_a_row)")
        self.check_divergence(done, loss)
        progress.step = done
        progress.losses.append(loss)
        record: dict[str, Any] = {}
        t_eval = time.perf_counter()
        if tcfg.eval_every and done % tcfg.eval_every == 0:
            dev = session.evaluate(session.data.dev, "dev eval")
            self.settle()
            session.compare_params(f"after step {done}")
            record["dev"] = dev.metrics
            if tcfg.keep_best and self.run is not None and dev.metrics[metric] > max((v for _, v in progress.dev), default=-math.inf):
                save_weights(self.run.file(BEST_WEIGHTS), session.named_trainable())
            progress.dev.append((done, dev.metrics[metric]))
            self.check_patience(done)
        if tcfg.test_every and done % tcfg.test_every == 0 and done < tcfg.steps:
            record["test"] = session.evaluate(self.test, "test eval").metrics  # the final one follows the loop
        progress.eval_s += time.perf_counter() - t_eval
        last = done == tcfg.steps or self.diverged_at or self.stopped_early_at
        if self.run is not None and (record or done % tcfg.log_every == 0 or last):
            zo = {"projected_grad": self.opt.last_record.projected_grads, "skipped_steps": self.opt.skipped_steps} if self.zo else {}
            self.run.append_jsonl("metrics.jsonl", {
                "step": done, "loss": loss, "forward_passes": progress.forwards, "wall_s": round(progress.elapsed(), 3),
                "eval_s": round(progress.eval_s, 3), "lr": self.opt.param_groups[0]["lr"], **zo, **record,
            })
        if not self.interactive and (done % max(1, tcfg.steps // 10) == 0 or last):  # a line per tenth
            dev_note = f", dev {metric} {progress.dev[-1][1]:.3f}" if progress.dev and progress.dev[-1][0] == done else ""
            self.log(f"step {done}/{tcfg.steps}: loss {loss:.4f}, {progress.forwards} forward passes, "
                     f"{progress.elapsed() / done:.2f} s/step{dev_note}")

    def settle(self) -> None:
        """Apply the updates the fused update keeps pending (optimizer.fused_update): before the weights are read
        other than by a forward (saved, hashed, checkpointed)."""
        if isinstance(self.opt, ZOOptimizer):
            self.opt.flush_update()

    def finish(self, t_start: float) -> dict[str, Any]:
        """Final weights (the best on dev with keep_best), the final evaluation, summary.json and the plot."""
        cfg, tcfg, session, run, progress, metric = self.cfg, self.tcfg, self.session, self.run, self.progress, self.metric
        if self.trajectory is not None:
            self.trajectory.close()
        self.settle()
        if run is not None and tcfg.save_weights:
            save_weights(run.file(WEIGHTS), session.named_trainable())
            if hasattr(session.model, "peft_config"):  # adapters also in peft's own format: PeftModel.from_pretrained(base, dir)
                session.model.save_pretrained(run.file("adapter"), safe_serialization=True)
        best = None
        if tcfg.keep_best and progress.dev:
            best = progress.dev[first_best(progress.dev)]
            load_weights(self.out / BEST_WEIGHTS, session.named_trainable())
            self.log(f"best dev {metric}: {best[1]:.4f} at step {best[0]}; its weights are the final ones")
        after = session.evaluate(self.test, "final eval")
        digests = session.compare_params("at the end")
        zero_shot = progress.zero_shot  # measured in this process or before a resume
        summary = self.summary(after, best, t_start)
        if self.exchange:
            summary.update(world_size=self.world.size, parallel=tcfg.parallel, rank_param_sha256=digests,
                           bytes_exchanged_per_step=round((self.exchange.bytes + self.ddp_bytes["bytes"])
                                                          / max(self.steps_here, 1), 1))
        if run is None:
            return summary
        after.write_predictions(run.file("predictions.jsonl"))
        run.write_json("summary.json", summary)
        self.checkpoints.clear()  # finished: nothing left to resume
        if not tcfg.save_weights:
            run.file(BEST_WEIGHTS).unlink(missing_ok=True)  # read by the final evaluation, kept no longer
        plot_training(
            run.file("training.png"), list(range(1, len(progress.losses) + 1)), progress.losses, progress.dev, metric,
            zero_shot[metric] if zero_shot else None, after.metrics[metric],
            f"{cfg.optimizer.name} on {session.data.spec.name} ({cfg.model.name}, {cfg.tuning.scheme})",
        )
        line = f"test {metric}: {after.metrics[metric]:.4f}"
        if zero_shot:
            line = f"test {metric}: zero-shot {zero_shot[metric]:.4f} -> after {cfg.optimizer.name} {after.metrics[metric]:.4f}"
        self.log(line)
        self.log(f"run directory: {run.path}")
        return summary

    def summary(self, after: EvalResult, best: tuple[int, float] | None, t_start: float) -> dict[str, Any]:
        """summary.json's figures."""
        cfg, progress, metric = self.cfg, self.progress, self.metric
        lr, eps = self.hparams
        return {
            "eval": after.metrics,
            **({"eval_zero_shot": progress.zero_shot} if progress.zero_shot else {}),
            "steps": progress.step,
            **({"diverged_at_step": self.diverged_at} if self.diverged_at else {}),
            **({"stopped_early_at_step": self.stopped_early_at} if self.stopped_early_at else {}),
            "forward_passes": progress.forwards,
            "skipped_steps": self.opt.skipped_steps if self.zo else 0,
            "optimizer": cfg.optimizer.name,
            "lr": lr,
            **({"eps": eps} if self.zo else {}),
            **({"best_step": best[0], f"best_dev_{metric}": best[1]} if best else {}),
            **({"activation_cache_mb": round(self.probe.cache_bytes / 2**20, 3)} if isinstance(self.probe, FrozenPrefix) else {}),
            "trainable_params": sum(p.numel() for _, p in self.session.named_trainable()),
            "n_train": len(self.session.data.train),
            "n_test": len(self.test),
            "train_wall_s": round(self.train_wall, 2),
            "s_per_step": round(self.train_wall / max(progress.step, 1), 4),
            **peak_memory(),
            **device_summary(self.session.model),
            "wall_s": round(time.perf_counter() - t_start + self.wall_before, 2),  # resumes included
        }


def first_best(dev: list[tuple[int, float]]) -> int:
    """The index of the first of the best (step, metric) evaluations: train.keep_best's weights."""
    return max(range(len(dev)), key=lambda i: (dev[i][1], -i))


def evaluations_since_best(dev: list[tuple[int, float]]) -> int:
    """How many of the (step, metric) evaluations came after the first of the best (0 when the last is it)."""
    return len(dev) - 1 - first_best(dev) if dev else 0


def _quiet(*_: Any) -> None:
    """The log of ranks other than 0: rank 0 speaks for the run."""


def _muted(mute: bool) -> contextlib.AbstractContextManager:
    """stderr discarded (ranks other than 0 during setup: the same data warnings as rank 0's);
    exceptions still propagate and are reported."""
    return contextlib.redirect_stderr(io.StringIO()) if mute else contextlib.nullcontext()


def _engine_mode(cfg: Config, opt: ZOOptimizer, mode: str, why_not: str) -> bool:
    """Whether the run takes ``optimizer.<mode>`` (dual_forward, fused_update): as the config says (a ConfigError
    if the optimizer does not take it), or by default with ``model.offload`` (disk or cpu) when the optimizer takes it."""
    wanted, takes = getattr(cfg.optimizer, mode), getattr(opt, f"takes_{mode}")
    if wanted and not takes:
        raise ConfigError(f"optimizer.{mode}: {cfg.optimizer.name} does not take it ({why_not})")
    return wanted if wanted is not None else cfg.model.offload != "none" and takes


def _check_world(cfg: Config, world: World) -> None:
    """What several processes refuse before anything loads (ConfigError, one line)."""
    if not world.distributed:
        return
    check_batch(cfg.train.batch_size, world.size, cfg.train.parallel)
    if cfg.model.offload != "none":
        raise ConfigError("model.offload runs in one process only")
    if cfg.tuning.hybrid.zo_layers is not None:
        raise ConfigError("tuning.hybrid runs in one process only (its first-order part is not data-parallel yet)")
    if cfg.train.keep_best:
        raise ConfigError("train.keep_best runs in one process only (the best weights are a file of rank 0's)")


def _check_optimizer_world(cfg: Config, world: World, opt: torch.optim.Optimizer, session: Session) -> None:
    """What several processes refuse once the optimizer exists (ConfigError, one line)."""
    if not world.distributed:
        return
    if isinstance(opt, ZOOptimizer):
        check_queries(opt.forwards_per_query * opt.n_queries * len(opt.blocks()), world.size, cfg.train.parallel)
    elif session.scorer.parameters():
        raise ConfigError(f"task.align: false with the first-order {cfg.optimizer.name} runs in one process only "
                          "(its linear head is outside DDP)")


def _resume_point(world: World, run: RunDir | None, checkpoints: Checkpoints) -> Checkpoint | None:
    """Rank 0 picks the checkpoint to resume from (if its run directory is resuming); every rank
    reads that one (a filesystem shared by the ranks is assumed)."""
    resumed = checkpoints.latest() if run is not None and run.resuming else None
    if not world.distributed:
        return resumed
    path = world.broadcast(str(resumed.path) if resumed else None)
    return resumed if world.is_main else (read_checkpoint(Path(path)) if path else None)


@contextlib.contextmanager
def _out_of_memory_reported(batch) -> Iterator[None]:
    """Out of memory on a batch -> one line naming its shape (the usual fix: a smaller one)."""
    try:
        yield
    except torch.OutOfMemoryError:
        n, length = batch.input_ids.shape
        raise TrainingError(f"out of memory on a batch of {n} sequences x {length} tokens: lower train.batch_size "
                            "or train.max_length") from None
