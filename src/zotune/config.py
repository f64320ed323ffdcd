"""Run configuration: YAML file + ``key=value`` overrides, validated into dataclasses.

Every key has a default here, so a config file only says what differs. Unknown keys, wrong
types and out-of-range values raise :class:`~zotune.errors.ConfigError` with one line naming
the key. The ``task`` section is free-form here and validated by :func:`zotune.tasks.task_spec`.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError
from .estimators.directions import DEFAULT_CHUNK, TABLE_MIN_CHUNKS
from .models.loader import resolve_device, resolve_dtype
from .models.offload import TIERS as OFFLOAD_TIERS
from .optim.registry import FIRST_ORDER, is_zeroth_order, optimizer_names, zo_class

NOISE_TABLE_MIN_MB = TABLE_MIN_CHUNKS * DEFAULT_CHUNK * 4 / 2**20  # float32 values: 32 MB
DEFAULT_TASK = "rotten_tomatoes"
SCHEMES = ("full", "lora", "prefix", "prompt", "top")  # zotune.tuning.SCHEMES: the builder of each, by its name
OWN_WEIGHTS_SCHEMES = ("full", "top")  # the schemes that tune the model's own weights, not adapters
PRECISION_CHECKS = ("error", "warn", "ignore")
OBJECTIVES = ("loss", "accuracy", "f1")
BASELINES = ("zero_shot", "icl", "linear_probe")
# The defaults' generations: 24: ZO-Muon's Newton-Schulz in its spectral form on a CPU for full fine-tuning (its class's default_options); 23: HiZOO's full fine-tuning lr at the fewer-forwards grid's length (its class's); 22: ZOMuonSubspace's full fine-tuning lr at the fewer-forwards grid's length (its class's); 21: HiZOO's LoRA-FA lr at the fewer-forwards grid's length, three seeds (its class's); 20: Sparse-MeZO's LoRA-FA lr at the fewer-forwards grid's length, three seeds (its class's); 19: ZO-SGD's LoRA-FA lr at the fewer-forwards grid's length, three seeds (its class's); 18: FZOO's LoRA-FA lr at the fewer-forwards grid's length (its class's); 17: JAGUAR's and LOZO's full fine-tuning lr at the fewer-forwards grid's length (their classes'); 16: ZO-Muon's and JAGUAR's LoRA-FA lr at the fewer-forwards grid's length (their classes'); 15: ZO-Muon's lr and plain_lr on full fine-tuning (its class's); 14: ZO-Muon's LoRA-FA lr; 13: ZOMuonSubspace's LoRA-FA lr; 12: ZO-SGD-Momentum's LoRA-FA lr (its class's default_lr); 11: Sparse-MeZO's
# LoRA-FA lr (its class's default_lr); 10: the next LoRA-FA
# sweeps' learning rates (LOZO: its class's default_lr);
# 9: the LoRA-FA sweeps' learning rates done so far (ZO-Adam, ZO-SGD-Sign, FZOO, JAGUAR:
# their classes' default_lr); 8: ZOMuonSubspace's lr on full fine-tuning (its class's); 7: ZO-Adam's lr on full fine-tuning, from its extended sweep (its class's
# default_lr); 6: the sign and momentum sweeps' learning rates on full fine-tuning (their classes'
# default_lr); 5: HiZOO's measured alpha (its class's default_options); 4: FZOO's measured lr (its class's default_lr); 3: learning rates
# measured on the default model (zotune.optim.factory); 2: the noise table by default
# (DEFAULT_NOISE_TABLE_MB); 1: before versions
CONFIG_VERSION = 24
UNVERSIONED = 1  # the version of a recorded config.yaml that names none (written before versions)
VERSIONS = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24)
DEFAULT_NOISE_TABLE_MB = 64.0
DROPOUT = ("off", "model_default")  # train.dropout
SCHEDULES = ("constant", "linear", "cosine")  # zotune.train.schedule.lr_factor
PARALLEL = ("data", "queries")  # kept in sync with zotune.distributed.PARALLEL_MODES


@dataclass
class ModelConfig:
    """``model``: the model to load (``smollm2-135m``, a GGUF file, a local directory or a hub id), its dtype,
    device and device map, and where its weights live (``offload``)."""

    name: str = "smollm2-135m"
    dtype: str = "float32"
    device: str = "auto"  # auto (cuda when torch sees one, else cpu), cpu, cuda, cuda:N, mps
    device_map: str | None = None  # e.g. "auto": transformers/accelerate place the layers over the GPUs
    # disk: the transformer layers' weights in files, in memory about a layer at a time (zotune.models.offload);
    # cpu: in CPU memory, each layer copied to model.device for its forward (zotune.models.host_offload)
    offload: str = "none"
    offload_dir: str | None = None  # the disk tier's files (default: a fresh directory under $ZOTUNE_CACHE/offload)


@dataclass
class HybridConfig:
    """``tuning.hybrid``: ZO-Bench's hybrid ZO-FO, the first ``zo_layers`` layers (and the embeddings) by the ZO
    optimizer, the rest by ``fo_optimizer``."""

    zo_layers: int | None = None  # ZO-Bench hybrid: the first K layers (+ embeddings) by ZO, the rest by FO
    fo_optimizer: str = "AdamW"
    fo_lr: float | None = None  # None: the FO optimizer's default


@dataclass
class LoraOptions:
    """``tuning.lora``: LoRA's rank, alpha, dropout, target modules and whether A stays frozen (LoRA-FA)."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] | None = None  # None: by architecture (Llama/Mistral/OPT q_proj, v_proj; GPT-2 c_attn; BERT query, value)
    # LoRA-FA: A stays at its random init (from the run seed), only B is tuned. None: the config
    # version's default (version 3: true under zeroth-order optimizers, where plain LoRA diverges)
    freeze_a: bool | None = None


@dataclass
class PrefixOptions:
    """``tuning.prefix``: prefix tuning's virtual tokens and how they are initialised."""

    num_virtual_tokens: int = 5
    init_from_real: bool = False  # MeZO: start from the keys/values of random real tokens


@dataclass
class PromptOptions:
    """``tuning.prompt``: prompt tuning's virtual tokens and the text their embeddings start from."""

    num_virtual_tokens: int = 10
    init_text: str | None = None  # None: embeddings of random vocabulary tokens (ZO-Bench)


@dataclass
class TopOptions:
    """``tuning.top``: how many top layers are tuned, whether the final norm is, and the frozen-prefix cache."""

    layers: int = 1  # the top K transformer layers are tuned (with the final norm)
    norm: bool = True  # the final norm too
    cache: bool = True  # training probes start from cached hidden states entering the lowest tuned layer


@dataclass
class TuningConfig:
    """``tuning``: what is tuned (the scheme and each scheme's options), the adapters' dtype, the half-precision
    check and hybrid ZO-FO."""

    scheme: str = "full"  # full | lora | prefix | prompt | top
    lora: LoraOptions = field(default_factory=LoraOptions)
    prefix: PrefixOptions = field(default_factory=PrefixOptions)
    prompt: PromptOptions = field(default_factory=PromptOptions)
    top: TopOptions = field(default_factory=TopOptions)
    trainable_dtype: str | None = None  # adapter schemes: e.g. float32 adapters over a half-precision base
    precision_check: str = "error"  # ZO in half precision, if probes or updates would round away: error | warn | ignore
    hybrid: HybridConfig = field(default_factory=HybridConfig)


@dataclass
class OptimizerConfig:
    """``optimizer``: the optimizer by name and its hyperparameters (None: the optimizer's or the config version's
    default), class-specific ``options`` included."""

    name: str = "ZOSGD"
    lr: float | None = None  # None: the default for this optimizer and scheme
    eps: float | None = None
    n_queries: int | None = None  # None: the optimizer's own (1; FZOO: a batch of probes)
    distribution: str | None = None  # gaussian | rademacher; None: the optimizer's own (gaussian; FZOO: rademacher)
    weight_decay: float = 0.0
    blockwise: bool = False  # ZO-Bench block-wise ZO: one query set per transformer layer / the rest
    direction_cache_mb: float = 0.0  # z kept from a step's first probe for the rest of the step (speed for memory)
    # z as windows of one pre-drawn table of this size (speed for memory; other z). None: the
    # config version's default (version 2: DEFAULT_NOISE_TABLE_MB for optimizers that take one)
    noise_table_mb: float | None = None
    # a query's + and - probes in one pass, layer by layer (bit-identical losses; estimators/lockstep.py).
    # None: on with model.offload (disk or cpu) for the optimizers that take it, off otherwise
    dual_forward: bool | None = None
    # a step's update of a layer applied when the next forward enters it (bit-identical; optim/fused.py).
    # None: on with model.offload (disk or cpu) for the optimizers that take it, off otherwise
    fused_update: bool | None = None
    options: dict[str, Any] = field(default_factory=dict)  # class-specific: momentum, betas, ...


@dataclass
class TrainConfig:
    """``train``: steps, batch size, evaluation, logging and checkpoint intervals, objective, lr schedule,
    parallelism and dropout."""

    steps: int = 1000
    batch_size: int = 16
    eval_every: int = 0  # 0: evaluate on the dev set only at the end
    test_every: int = 0  # also the test set every this many steps (convergence curves); 0: only at the end
    log_every: int = 10
    max_length: int = 128  # prompt + continuation tokens; longer prompts are cut on the left
    objective: str = "loss"  # "loss" | "accuracy" | "f1": ZO on minus the batch metric (MeZO 3.4)
    max_skipped_in_a_row: int = 10  # stop after this many consecutive NaN/inf losses (0: never)
    divergence_ratio: float = 0.0  # end the run early once a step's loss passes this multiple of the first step's (0: never)
    checkpoint_every: int = 50  # steps between resumable checkpoints (0: only on SIGTERM/SIGINT)
    parallel: str = "data"  # several processes (torchrun): "data" (shard the batch) | "queries" (share the probes)
    lr_schedule: str = "constant"  # "constant" | "linear" | "cosine" (to 0 at the last step)
    warmup_steps: int = 0  # the lr rises linearly over these first steps
    keep_best: bool = False  # with eval_every: the final weights are the best on dev (MeZO's protocol)
    # with eval_every: end the run once this many dev evaluations in a row have not passed the best one (0: never)
    early_stop_patience: int = 0
    # write weights.safetensors (and keep best.safetensors) at the end; false: the run keeps its metrics, summary
    # and trajectory only (a ZO run's weights are rebuilt by `zotune replay`). zotune bench's cells: false by default
    save_weights: bool = True
    dropout: str = "off"  # first-order steps: "off" | "model_default" (the model's own dropout, as MeZO's FT); ZO: off


@dataclass
class EvalConfig:
    """``eval``: the test evaluation (examples, batch size, zero-shot before training, length) and ``zotune eval``'s
    baseline."""

    max_examples: int | None = None  # cap on test examples (None: all of the task's test set)
    batch_size: int = 16
    zero_shot: bool = True  # `zotune train` also evaluates before training
    baseline: str = "zero_shot"  # `zotune eval`: "zero_shot" | "icl" | "linear_probe"
    icl_shots: int = 16  # in-context demonstrations (from the task's train sample, seeded)
    max_length: int | None = None  # None: train.max_length (icl: 1024, room for the demonstrations)


@dataclass
class Config:
    """A run's whole configuration: seed, the defaults' version, one section per part and a free-form ``task``."""

    seed: int = 0
    version: int | None = None  # the defaults' generation (CONFIG_VERSION); None: the current one
    model: ModelConfig = field(default_factory=ModelConfig)
    tuning: TuningConfig = field(default_factory=TuningConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    task: dict[str, Any] = field(default_factory=lambda: {"name": DEFAULT_TASK})

    def to_dict(self) -> dict[str, Any]:
        """The config as nested plain data (``dataclasses.asdict``)."""
        return dataclasses.asdict(self)


# -- loading -------------------------------------------------------------------------------
def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                default_version: int = CONFIG_VERSION, check_device: bool = True) -> Config:
    """Read a YAML config (optional), apply ``a.b=value`` overrides, validate (see
    :func:`from_dict` for ``default_version`` and ``check_device``)."""
    return from_dict(raw_config(path, overrides), default_version, check_device)


def raw_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """The mapping of a YAML config (optional, ``{}`` without one) with ``a.b=value`` overrides applied, not
    validated: what :func:`load_config` validates."""
    raw: dict[str, Any] = read_yaml(Path(path)) if path is not None else {}
    for item in overrides:
        set_dotted(raw, *parse_override(item))
    return raw


def parse_override(item: str) -> tuple[str, Any]:
    """``a.b=value`` -> (``a.b``, the value read as YAML; a template kept verbatim)."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r} is not of the form key=value")
    key = key.strip()
    # templates such as "{text} It was" would parse as YAML mappings: keep them verbatim
    return key, value if key.endswith("template") else _parse_value(value)


def from_dict(raw: dict[str, Any], default_version: int = CONFIG_VERSION, check_device: bool = True) -> Config:
    """Build and validate a :class:`Config` from nested plain data. A config without ``version``
    gets ``default_version``'s defaults: the current ones for a new run, the recorded run's for
    a run written before versions existed (1, see :func:`recorded_version`). ``check_device=False``: a
    ``model.device`` this machine lacks is no error (a recorded run's config, read to compare or report)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"a config must be a mapping of keys, got {type(raw).__name__}")
    cfg = _build(Config, _refining_default_task(raw), prefix="")
    if cfg.version is None:
        cfg.version = default_version
    _require(cfg.version in VERSIONS, "version", f"must be one of {', '.join(map(str, VERSIONS))}", cfg.version)
    _versioned_defaults(cfg)
    validate(cfg, check_device)
    return cfg


def _versioned_defaults(cfg: Config) -> None:
    """Fill the keys whose default depends on the config version (``VERSIONED_DEFAULTS``)."""
    for section, key, default in VERSIONED_DEFAULTS:
        options = _section(cfg, section)
        if getattr(options, key) is None:
            setattr(options, key, default(cfg.version, cfg.optimizer))


def default_noise_table_mb(version: int, optimizer: OptimizerConfig) -> float:
    """``optimizer.noise_table_mb`` when the config gives none. Version 2 on: the noise table,
    the fast direction path, for zeroth-order optimizers that take one and have no direction
    cache. Version 1 (runs recorded before versions): z drawn per chunk."""
    cls = zo_class(optimizer.name)
    fast = version >= 2 and cls is not None and cls.takes_noise_table and not optimizer.direction_cache_mb
    return DEFAULT_NOISE_TABLE_MB if fast else 0.0


def default_freeze_a(version: int, optimizer: OptimizerConfig) -> bool:
    """``tuning.lora.freeze_a`` when the config gives none. Version 3 on: LoRA-FA under zeroth-order
    optimizers. With A frozen, delta W = B A is linear in the tuned B, so the curvature a ZO step
    meets does not grow as B does; plain LoRA at its best 100-step lr diverges after ~150 steps
    (docs/convergence.md)."""
    return version >= 3 and is_zeroth_order(optimizer.name)


# (section, key, default(version, optimizer)): the keys whose default depends on the config version
def default_n_queries(version: int, optimizer: OptimizerConfig) -> int:
    """``optimizer.n_queries`` when the config gives none: the optimizer class's ``default_n_queries``
    (1, as MeZO; FZOO's step needs a batch of probes); 1 for first-order optimizers."""
    cls = zo_class(optimizer.name)
    return cls.default_n_queries if cls is not None else 1


def default_distribution(version: int, optimizer: OptimizerConfig) -> str:
    """``optimizer.distribution`` when the config gives none: the class's ``default_distribution``."""
    cls = zo_class(optimizer.name)
    return cls.default_distribution if cls is not None else "gaussian"


# (section, key, default(version, optimizer)): the keys whose default depends on the config version
# or the optimizer; a resolved config (config.yaml of a run) holds them all
VERSIONED_DEFAULTS = (
    ("optimizer", "noise_table_mb", default_noise_table_mb),
    ("tuning.lora", "freeze_a", default_freeze_a),
    ("optimizer", "n_queries", default_n_queries),
    ("optimizer", "distribution", default_distribution),
)


def _section(cfg: Config, dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def unresolved_versioned_defaults(cfg: Config) -> dict[str, Any]:
    """``cfg.to_dict()`` with every versioned key that holds its default back at None, so that a
    config derived from it with another optimizer (``zotune memory``'s cells) gets that
    optimizer's default."""
    raw = cfg.to_dict()
    for section, key, default in VERSIONED_DEFAULTS:
        if getattr(_section(cfg, section), key) == default(cfg.version, cfg.optimizer):
            set_dotted(raw, f"{section}.{key}", None)
    return raw


def recorded_version(run_dir: str | Path, finished_too: bool = False) -> int:
    """The config version an unfinished run in ``run_dir`` (or a finished one, ``finished_too``: to extend it)
    was recorded with (1 for a ``config.yaml`` without ``version``: written before versions existed); the
    current version when there is no run to resume there."""
    path = Path(run_dir)
    if not (path / "config.yaml").is_file() or ((path / "summary.json").exists() and not finished_too):
        return CONFIG_VERSION
    try:
        recorded = load_yaml((path / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):
        return CONFIG_VERSION  # the resume check reports the unreadable file
    version = recorded.get("version", UNVERSIONED) if isinstance(recorded, dict) else CONFIG_VERSION
    return version if version in VERSIONS else CONFIG_VERSION


def recorded_config(path: str | Path) -> Config:
    """A run directory's ``config.yaml``, under the defaults of the version it was recorded with; a run made on a
    device this machine lacks (a GPU) reads too (running it again is what needs the device)."""
    return load_config(path, default_version=UNVERSIONED, check_device=False)


# a task section naming none of these refines the default task (task.k_shot=4) instead of
# replacing it with an inline spec
TASK_IDENTITY_KEYS = frozenset({"name", "path", "hf", "package", "text_template"})


def _refining_default_task(raw: dict[str, Any]) -> dict[str, Any]:
    task = raw.get("task")
    if isinstance(task, dict) and task and not task.keys() & TASK_IDENTITY_KEYS:
        return {**raw, "task": {"name": DEFAULT_TASK, **task}}
    return raw


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, with YAML 1.2's floats: ``1e-2`` and ``3E+1`` are numbers (YAML 1.1, which PyYAML
    reads, wants ``1.0e-2``, and leaves ``1e-2`` a text: an override ``optimizer.lr=1e-2`` would name its bench
    cell ``lr=1e-2`` where the grid's ``1.0e-02`` names it ``lr=0.01``)."""


_Loader.add_implicit_resolver("tag:yaml.org,2002:float",
                              re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


def load_yaml(text: str) -> Any:
    """``text`` read as YAML (safe: plain data only), exponents without a dot read as floats."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)


def read_yaml(path: Path) -> dict[str, Any]:
    """The mapping in a YAML file (``{}`` for an empty one); a one-line ConfigError for a missing, non-UTF-8 or
    malformed file, or one that holds no mapping."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = load_yaml(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise ConfigError(f"config file {path} is not valid YAML{where}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys, got {type(data).__name__}")
    return data


def _parse_value(text: str) -> Any:
    try:
        return load_yaml(text) if text.strip() else ""
    except yaml.YAMLError:
        return text


def set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    """Set dotted ``key`` of a nested mapping to ``value``, creating the sections on the way (ConfigError where one
    is not a mapping)."""
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set {key!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def _build(cls: type, raw: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in names:
            near = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{prefix}{near[0]}'?)" if near else f"; valid keys: {', '.join(names)}"
            raise ConfigError(f"unknown config key '{prefix}{key}'{hint}")
    values = {}
    for name in names:
        if name not in raw:
            continue
        typ, value, dotted = hints[name], raw[name], f"{prefix}{name}"
        if dataclasses.is_dataclass(typ):
            if not isinstance(value, dict):
                raise ConfigError(f"config key {dotted!r} must be a section (mapping), got {value!r}")
            values[name] = _build(typ, value, prefix=f"{dotted}.")
        else:
            values[name] = _coerce(value, typ, dotted)
    return cls(**values)


def _coerce(value: Any, typ: Any, key: str) -> Any:
    """Check ``value`` against a field type; numbers written as strings (``1e-6``) are parsed."""
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(typ)
        if value is None and type(None) in options:
            return None
        typ = next(t for t in options if t is not type(None))
        origin = typing.get_origin(typ)
    if origin is dict or typ is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key!r} must be a mapping, got {value!r}")
        return value
    if origin is list:
        if isinstance(value, str):  # key=a,b on the command line
            value = [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, list) and value and all(isinstance(v, str) and v for v in value):
            return value
        raise ConfigError(f"config key {key!r} must be a non-empty list of names, got {value!r}")
    if typ is bool:
        if isinstance(value, bool):
            return value
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif typ is str:
        if isinstance(value, str):
            return value
        if value is False:  # YAML 1.1 reads an unquoted `off` as false (train.dropout: off)
            return "off"
    raise ConfigError(f"config key {key!r} must be {_type_name(typ)}, got {value!r}")


def _type_name(typ: Any) -> str:
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(typ, str(typ))


# -- validation ----------------------------------------------------------------------------
def validate(cfg: Config, check_device: bool = True) -> None:
    """Range and choice checks that types alone do not express, section by section (``check_device``: also
    that this machine has ``model.device``)."""
    _validate_model(cfg.model, check_device)
    if cfg.tuning.scheme not in SCHEMES:
        raise ConfigError(
            f"tuning.scheme {cfg.tuning.scheme!r} is not available; choose one of {', '.join(SCHEMES)}"
        )
    _validate_tuning(cfg.tuning)
    _validate_hybrid(cfg)
    _validate_offload(cfg)
    _validate_optimizer(cfg.optimizer)
    _validate_train(cfg)
    _validate_eval(cfg.eval)
    if not cfg.task:
        raise ConfigError("config key 'task' is empty: give task.name or an inline task spec")


def _validate_model(m: ModelConfig, check_device: bool = True) -> None:
    resolve_dtype(m.dtype)
    _require(bool(re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", m.device)), "model.device",
             "must be auto, cpu, mps, cuda or cuda:N", m.device)
    _require(m.device_map is None or m.device == "auto", "model.device_map",
             "places the model itself; leave model.device at auto", m.device_map)
    if check_device:
        resolve_device(m.device)  # cuda asked for, none seen: say so before loading anything
    _require(m.offload in OFFLOAD_TIERS, "model.offload", f"must be one of {', '.join(OFFLOAD_TIERS)}", m.offload)
    if m.offload == "disk":
        _require(m.device in ("auto", "cpu"), "model.device", "must be auto or cpu with model.offload: disk "
                 "(the disk tier computes on the CPU)", m.device)
    if m.offload != "none":
        _require(m.device_map is None, "model.device_map", f"cannot be set with model.offload: {m.offload}",
                 m.device_map)


def _validate_offload(cfg: Config) -> None:
    if cfg.model.offload == "none":
        return
    _require(is_zeroth_order(cfg.optimizer.name), "optimizer.name", f"must be a zeroth-order optimizer with "
             f"model.offload: {cfg.model.offload} (a backward pass would need every layer's activations)",
             cfg.optimizer.name)
    _require(cfg.tuning.hybrid.zo_layers is None, "tuning.hybrid.zo_layers",
             f"cannot be set with model.offload: {cfg.model.offload}", cfg.tuning.hybrid.zo_layers)
    _require(cfg.model.offload != "cpu" or cfg.optimizer.fused_update is not False, "optimizer.fused_update",
             "cannot be false with model.offload: cpu (the host tier updates each layer on the device, where the "
             "fused update applies it)", cfg.optimizer.fused_update)


def _validate_hybrid(cfg: Config) -> None:
    hybrid = cfg.tuning.hybrid
    _require(hybrid.fo_optimizer in FIRST_ORDER, "tuning.hybrid.fo_optimizer",
             f"must be one of {', '.join(FIRST_ORDER)}", hybrid.fo_optimizer)
    _require(hybrid.fo_lr is None or hybrid.fo_lr >= 0, "tuning.hybrid.fo_lr", "must be >= 0", hybrid.fo_lr)
    if hybrid.zo_layers is not None:
        _require(hybrid.zo_layers >= 0, "tuning.hybrid.zo_layers", "must be >= 0", hybrid.zo_layers)
        _require(is_zeroth_order(cfg.optimizer.name), "optimizer.name",
                 "must be a zeroth-order optimizer with tuning.hybrid", cfg.optimizer.name)


def _validate_optimizer(o: OptimizerConfig) -> None:
    names = optimizer_names()
    if o.name not in names:
        near = difflib.get_close_matches(o.name, names, n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else f"; choose one of {', '.join(names)}"
        raise ConfigError(f"unknown optimizer.name {o.name!r}{hint}")
    _require(o.lr is None or o.lr >= 0, "optimizer.lr", "must be >= 0", o.lr)
    _require(o.eps is None or o.eps > 0, "optimizer.eps", "must be > 0", o.eps)
    _require(o.n_queries >= 1, "optimizer.n_queries", "must be >= 1", o.n_queries)
    _require(o.weight_decay >= 0, "optimizer.weight_decay", "must be >= 0", o.weight_decay)
    _require(o.direction_cache_mb >= 0, "optimizer.direction_cache_mb", "must be >= 0", o.direction_cache_mb)
    _require(o.noise_table_mb == 0 or o.noise_table_mb >= NOISE_TABLE_MIN_MB, "optimizer.noise_table_mb",
             f"must be 0 (off) or >= {NOISE_TABLE_MIN_MB:g} ({TABLE_MIN_CHUNKS} chunks of {DEFAULT_CHUNK:,} values)",
             o.noise_table_mb)
    _require(not (o.noise_table_mb and o.direction_cache_mb), "optimizer.noise_table_mb",
             "and optimizer.direction_cache_mb exclude each other (a table's windows need no cache)", o.noise_table_mb)
    _require(o.distribution in ("gaussian", "rademacher"), "optimizer.distribution", "must be gaussian or rademacher",
             o.distribution)


def _validate_train(cfg: Config) -> None:
    t, name = cfg.train, cfg.optimizer.name
    zo = is_zeroth_order(name)
    _require(t.steps >= 1, "train.steps", "must be >= 1", t.steps)
    _require(t.batch_size >= 1, "train.batch_size", "must be >= 1", t.batch_size)
    _require(t.eval_every >= 0, "train.eval_every", "must be >= 0", t.eval_every)
    _require(t.test_every >= 0, "train.test_every", "must be >= 0", t.test_every)
    _require(t.log_every >= 1, "train.log_every", "must be >= 1", t.log_every)
    _require(t.max_length >= 8, "train.max_length", "must be >= 8", t.max_length)
    _require(t.max_skipped_in_a_row >= 0, "train.max_skipped_in_a_row", "must be >= 0", t.max_skipped_in_a_row)
    _require(t.divergence_ratio == 0 or t.divergence_ratio > 1, "train.divergence_ratio", "must be 0 (never) or > 1",
             t.divergence_ratio)
    _require(t.checkpoint_every >= 0, "train.checkpoint_every", "must be >= 0", t.checkpoint_every)
    _require(t.parallel in PARALLEL, "train.parallel", f"must be one of {', '.join(PARALLEL)}", t.parallel)
    _require(t.parallel == "data" or zo, "train.parallel",
             f"must be 'data' for the first-order optimizer {name} (it has no probes to share)", t.parallel)
    _require(t.lr_schedule in SCHEDULES, "train.lr_schedule", f"must be one of {', '.join(SCHEDULES)}", t.lr_schedule)
    _require(0 <= t.warmup_steps < t.steps, "train.warmup_steps", "must be >= 0 and below train.steps", t.warmup_steps)
    _require(not t.keep_best or t.eval_every > 0, "train.keep_best",
             "needs train.eval_every > 0 (the dev evaluations it picks from)", t.keep_best)
    _require(t.early_stop_patience >= 0, "train.early_stop_patience", "must be >= 0 (0: never)", t.early_stop_patience)
    _require(not t.early_stop_patience or t.eval_every > 0, "train.early_stop_patience",
             "needs train.eval_every > 0 (the dev evaluations it counts)", t.early_stop_patience)
    _require(t.dropout in DROPOUT, "train.dropout", f"must be one of {', '.join(DROPOUT)}", t.dropout)
    _require(t.dropout == "off" or not zo or cfg.tuning.hybrid.zo_layers is not None,
             "train.dropout", f"must be 'off' for the zeroth-order optimizer {name} (its probes run with dropout "
             "off, as in MeZO; model_default is for first-order steps)", t.dropout)
    _require(t.objective in OBJECTIVES, "train.objective", f"must be one of {', '.join(OBJECTIVES)}", t.objective)
    _require(t.objective == "loss" or zo, "train.objective",
             f"must be 'loss' for the first-order optimizer {name} (a metric has no gradient; "
             "use a zeroth-order optimizer)", t.objective)


def _validate_eval(e: EvalConfig) -> None:
    _require(e.max_examples is None or e.max_examples >= 1, "eval.max_examples", "must be >= 1", e.max_examples)
    _require(e.batch_size >= 1, "eval.batch_size", "must be >= 1", e.batch_size)
    _require(e.baseline in BASELINES, "eval.baseline", f"must be one of {', '.join(BASELINES)}", e.baseline)
    _require(e.icl_shots >= 1, "eval.icl_shots", "must be >= 1", e.icl_shots)
    _require(e.max_length is None or e.max_length >= 8, "eval.max_length", "must be >= 8", e.max_length)


def _validate_tuning(tc: TuningConfig) -> None:
    lora, prefix, prompt = tc.lora, tc.prefix, tc.prompt
    _require(lora.r >= 1, "tuning.lora.r", "must be >= 1", lora.r)
    _require(lora.alpha > 0, "tuning.lora.alpha", "must be > 0", lora.alpha)
    _require(0 <= lora.dropout < 1, "tuning.lora.dropout", "must be in [0, 1)", lora.dropout)
    _require(prefix.num_virtual_tokens >= 1, "tuning.prefix.num_virtual_tokens", "must be >= 1", prefix.num_virtual_tokens)
    _require(tc.top.layers >= 1, "tuning.top.layers", "must be >= 1", tc.top.layers)
    _require(prompt.num_virtual_tokens >= 1, "tuning.prompt.num_virtual_tokens", "must be >= 1", prompt.num_virtual_tokens)
    _require(prompt.init_text is None or prompt.init_text.strip() != "", "tuning.prompt.init_text",
             "must be null or a non-empty text", prompt.init_text)
    _require(tc.precision_check in PRECISION_CHECKS, "tuning.precision_check",
             f"must be one of {', '.join(PRECISION_CHECKS)}", tc.precision_check)
    if tc.trainable_dtype is not None:
        try:
            resolve_dtype(tc.trainable_dtype)
        except ConfigError:
            _require(False, "tuning.trainable_dtype", "must be null, float32, bfloat16 or float16", tc.trainable_dtype)
        _require(tc.scheme not in OWN_WEIGHTS_SCHEMES, "tuning.trainable_dtype",
                 f"applies to the adapter schemes (lora, prefix, prompt) only: {tc.scheme} tunes the model's "
                 "own weights, in model.dtype (use model.dtype=float32 instead)", tc.trainable_dtype)


def _require(ok: bool, key: str, rule: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"config key {key!r} {rule}, got {value!r}")
