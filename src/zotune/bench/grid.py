"""A benchmark grid: one YAML file -> validated cells, each an ordinary ``zotune train`` config.

Format (docs/contract.md, "Benchmark grid", extended by ``budget``, ``description``, ``memory_csv``)::

    description: one line for the report          # optional
    base: {task: {name: rotten_tomatoes}}           # a train config shared by every cell
    axes:                                           # the cross product, first axis slowest
      optimizer.name: [ZOSGD, AdamW]
      seed: [0, 1]
    overrides:                                      # optional, applied in order
      - when: {optimizer.name: [SGD, AdamW]}        # a value or a list of values (any of them)
        set: {optimizer.lr: 1.0e-4}
    budget: {forward_passes: 48}                    # or {steps: N}; optional
    baselines: [zero_shot, icl, linear_probe]       # optional: `zotune eval` cells, rows of the report
    memory_csv: memory.csv                          # optional, relative to the grid file
    dev_levels: [0.625, 0.7]                        # optional: a report table of the forward passes to reach each
    paired_with: {optimizer.name: ZOSGD}            # optional: report tables of each cell minus this one on its seed

Each key of ``axes`` and ``set`` is a dotted config key and replaces that node (a mapping value
replaces the whole section); ``base`` may use nested or dotted keys. ``when`` is matched against
the cell's config after ``base`` and ``axes``, defaults included. ``budget.forward_passes: N``
gives each cell ``N // forward passes per step`` steps (equal forward-pass budget);
``budget.steps: N`` gives every cell N steps; without a budget each cell keeps its
``train.steps``. ``baselines`` adds, per baseline, one ``zotune eval`` cell for each value of the
axes that are not the optimizer's, training's or tuning's (``optimizer.*``, ``train.*``, ``tuning.*``): its row in the report
is the baseline (``ICL``), beside the optimizers. ``load_grid(path, overrides)`` applies
``key=value`` overrides (``zotune bench --grid G model.name=...``) to every cell, last; an override
of an axis leaves that axis one value, and ``train.steps=N`` replaces the budget. ``paired_with``
names one axis (not the seed) and one of its values: the report then pairs each cell with the cell
that differs from it on that axis alone (``optimizer.name: ZOSGD``: the same scheme and seed, so the
same training sentences) and tables the differences, which a seed's spread does not blur.
``train.save_weights`` is false in a cell unless the grid sets it. Every cell's config is validated before anything runs: a
malformed grid is one :class:`~zotune.errors.ConfigError` line.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import BASELINES, Config, from_dict, parse_override, read_yaml, set_dotted
from ..errors import ConfigError
from ..optim.factory import run_forwards_per_step
from ..tasks import task_spec

GRID_KEYS = ("description", "base", "axes", "overrides", "budget", "baselines", "memory_csv", "dev_levels",
             "paired_with")
BASELINE_LABELS = {"zero_shot": "zero-shot", "icl": "ICL", "linear_probe": "LP"}  # their rows in the report
TRAINING_AXES = ("optimizer.", "train.", "tuning.")  # axes a baseline (an evaluation) does not vary over
BUDGET_KINDS = ("forward_passes", "steps")
_MISSING = object()


@dataclass(frozen=True)
class Budget:
    """What the cells have in common: ``forward_passes`` or ``steps`` (``kind`` None: each
    cell's own ``train.steps``)."""

    kind: str | None = None
    value: int | None = None

    def describe(self) -> str:
        """The budget as a phrase of the report and the dry run (``Cells compare at ...``)."""
        if self.kind == "forward_passes":
            return (f"an equal forward-pass budget of {self.value} per cell (steps = {self.value} // forward "
                    "passes per step)")
        if self.kind == "steps":
            return f"an equal number of steps: {self.value} per cell"
        return "each cell's own train.steps (no budget given)"

    def short(self) -> str:
        """The budget in a few words, for plot titles."""
        return {"forward_passes": f"{self.value} forward passes per cell", "steps": f"{self.value} steps per cell",
                None: "steps as configured"}[self.kind]


@dataclass(frozen=True)
class Override:
    """One rule of ``overrides``: ``set`` applies to a cell whose config has, at every key of ``when``, one of its
    values."""

    when: dict[str, list[Any]]
    set: dict[str, Any]

    def matches(self, raw: dict[str, Any]) -> bool:
        """Whether the config mapping ``raw`` (defaults filling the keys it lacks) has one of ``when``'s values at
        each of its keys."""
        return all(lookup(raw, key) in values for key, values in self.when.items())


@dataclass
class Cell:
    """One run of the grid: its directory name, its axis values, its validated config."""

    name: str
    axes: dict[str, Any]
    config: dict[str, Any]  # nested mapping, written as the cell's config file
    cfg: Config
    forwards_per_step: int | None  # None: block-wise (the blocks are the model's layers)
    command: str = "train"  # "eval": a baseline cell (eval.baseline); "memory": a zotune memory cell
    args: tuple[str, ...] = ()  # more arguments of its command (a memory cell: --cell and its JSON)

    @property
    def planned_forward_passes(self) -> int | None:
        """Forward passes the cell should count: forward passes per step times ``train.steps`` (None:
        block-wise)."""
        return None if self.forwards_per_step is None else self.forwards_per_step * self.cfg.train.steps


@dataclass
class Grid:
    """A loaded grid: its file, description, axes and budget, the expanded cells (baseline cells last), the memory
    CSV and the command line's overrides."""

    path: Path
    description: str
    axes: dict[str, list[Any]]
    budget: Budget
    cells: list[Cell]
    memory_csv: Path | None = None
    overrides: tuple[str, ...] = ()  # key=value applied to every cell (the command line's)
    dev_levels: tuple[float, ...] = ()  # the report's "forward passes to reach a dev score" levels
    paired_with: tuple[str, Any] | None = None  # (axis, value): the report's paired differences against that cell

    @property
    def partner_label(self) -> str:
        """The ``paired_with`` cells in a few words: the optimizer's name (``ZOSGD``), else ``lr=3e-05``."""
        if self.paired_with is None:
            return ""
        axis, value = self.paired_with
        return value_label(value) if axis == "optimizer.name" else f"{axis_label(axis)}={value_label(value)}"


# -- loading -------------------------------------------------------------------------------
def load_grid(path: str | Path, overrides: tuple[str, ...] | list[str] = ()) -> Grid:
    """Read, validate and expand a grid file, ``key=value`` overrides applied to every cell last
    (ConfigError, one line, naming the problem)."""
    path = Path(path)
    try:
        raw = read_yaml(path)
    except ConfigError as err:
        raise ConfigError(str(err).replace("config file", "grid file", 1)) from None
    where = f"grid {path}"
    unknown = [k for k in raw if k not in GRID_KEYS]
    if unknown:
        near = difflib.get_close_matches(str(unknown[0]), GRID_KEYS, n=1)
        hint = f" (did you mean '{near[0]}'?)" if near else f"; valid keys: {', '.join(GRID_KEYS)}"
        raise ConfigError(f"{where}: unknown key '{unknown[0]}'{hint}")
    description = raw.get("description") or ""
    if not isinstance(description, str):
        raise ConfigError(f"{where}: description must be a text, got {description!r}")
    base = _base(raw.get("base"), where)
    axes = _axes(raw.get("axes"), where)
    paired_with = _paired_with(raw.get("paired_with"), axes, where)
    final = dict(parse_override(item) for item in overrides)
    axes = {k: [final[k]] if k in final else v for k, v in axes.items()}
    budget = _budget(raw.get("budget"), where)
    if "train.steps" in final:  # the command line's steps replace the grid's budget (a quick run of a paper grid)
        budget = Budget()
    rules = _overrides(raw.get("overrides"), where)
    if final:
        rules.append(Override({}, final))
    _check_budget_keys(budget, axes, rules, where)
    cells = expand(base, axes, rules, budget, where)
    cells += baseline_cells(_baselines(raw.get("baselines"), where), base, axes, rules, where)
    memory_csv = raw.get("memory_csv")
    if memory_csv is not None and not isinstance(memory_csv, str):
        raise ConfigError(f"{where}: memory_csv must be a file name, got {memory_csv!r}")
    levels = raw.get("dev_levels") or []
    if not isinstance(levels, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v <= 1
                                               for v in levels):
        raise ConfigError(f"{where}: dev_levels must be a list of dev scores in (0, 1], got {levels!r}")
    return Grid(path, description.strip(), axes, budget, cells,
                path.parent / memory_csv if memory_csv else None, tuple(overrides), tuple(sorted(set(levels))),
                paired_with)


def whole_grid(grid: Grid) -> Grid:
    """The grid file's own cells when every command-line override only picks cells out of it (names an axis and
    one of its values: a grid run in pieces, ``seed=2``), so that its report covers the whole grid; else ``grid``
    itself (an override that changes the cells, ``train.steps=5``, reports on those cells alone)."""
    if not grid.overrides:
        return grid
    whole = load_grid(grid.path)
    picks = [parse_override(item) for item in grid.overrides]
    return whole if all(key in whole.axes and value in whole.axes[key] for key, value in picks) else grid


def _mapping(value: Any, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{what} must be a mapping, got {value!r}")
    return value


def _base(value: Any, where: str) -> dict[str, Any]:
    """The base config as a nested mapping (dotted keys expanded)."""
    base: dict[str, Any] = {}
    for key, v in _mapping(value, f"{where}: base").items():
        try:
            set_dotted(base, str(key), copy.deepcopy(v))
        except ConfigError as err:
            raise ConfigError(f"{where}: base: {err}") from None
    return base


def _axes(value: Any, where: str) -> dict[str, list[Any]]:
    axes = {}
    for key, values in _mapping(value, f"{where}: axes").items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}: axis '{key}' must be a non-empty list of values, got {values!r}")
        texts = [json.dumps(v, sort_keys=True, default=str) for v in values]
        if len(set(texts)) < len(texts):
            raise ConfigError(f"{where}: axis '{key}' lists a value twice: {values!r}")
        axes[str(key)] = values
    return axes


def _paired_with(value: Any, axes: dict[str, list[Any]], where: str) -> tuple[str, Any] | None:
    """``paired_with`` as (axis, value): one axis of the grid file (not the seed) and one of its values."""
    if value is None:
        return None
    if not isinstance(value, dict) or len(value) != 1:
        raise ConfigError(f"{where}: paired_with must name one axis and one of its values "
                          f"(paired_with: {{optimizer.name: ZOSGD}}), got {value!r}")
    (key, val), = value.items()
    if key not in axes or key == "seed":
        choices = ", ".join(k for k in axes if k != "seed") or "none"
        raise ConfigError(f"{where}: paired_with: '{key}' is not an axis of the grid (axes but the seed: {choices})")
    if val not in axes[key]:
        raise ConfigError(f"{where}: paired_with: {key} has no value {val!r} (its values: "
                          f"{', '.join(map(str, axes[key]))})")
    return key, val


def _overrides(value: Any, where: str) -> list[Override]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ConfigError(f"{where}: overrides must be a list of {{when: ..., set: ...}}, got {value!r}")
    out = []
    defaults = Config().to_dict()
    for i, item in enumerate(value):
        at = f"{where}: overrides[{i}]"
        if not isinstance(item, dict) or set(item) != {"when", "set"}:
            raise ConfigError(f"{at} must be a mapping with exactly the keys 'when' and 'set', got {item!r}")
        when = _mapping(item["when"], f"{at}.when")
        sets = _mapping(item["set"], f"{at}.set")
        if not sets:
            raise ConfigError(f"{at}.set is empty")
        for key in when:
            if not str(key).startswith("task.") and lookup(defaults, str(key)) is _MISSING:
                raise ConfigError(f"{at}.when: unknown config key '{key}'")
        out.append(Override({str(k): v if isinstance(v, list) else [v] for k, v in when.items()},
                            {str(k): v for k, v in sets.items()}))
    return out


def _budget(value: Any, where: str) -> Budget:
    if value is None:
        return Budget()
    budget = _mapping(value, f"{where}: budget")
    if len(budget) != 1 or next(iter(budget)) not in BUDGET_KINDS:
        raise ConfigError(f"{where}: budget must be {{forward_passes: N}} or {{steps: N}}, got {value!r}")
    kind, n = next(iter(budget.items()))
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ConfigError(f"{where}: budget.{kind} must be an integer >= 1, got {n!r}")
    return Budget(kind, n)


def _baselines(value: Any, where: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or any(v not in BASELINES for v in value) or len(set(value)) < len(value):
        raise ConfigError(f"{where}: baselines must be a list of distinct values of {', '.join(BASELINES)}, got {value!r}")
    return value


def _check_budget_keys(budget: Budget, axes: dict[str, list], overrides: list[Override], where: str) -> None:
    """A budget fixes train.steps: an axis or override that also sets it is a contradiction."""
    if budget.kind is None:
        return
    setters = [*axes, *(k for o in overrides for k in o.set)]
    if any(k in ("train", "train.steps") for k in setters):
        raise ConfigError(f"{where}: train.steps is set by the budget ({budget.kind}: {budget.value}); "
                          "remove it from axes and overrides")


# -- expansion -----------------------------------------------------------------------------
def expand(base: dict[str, Any], axes: dict[str, list[Any]], overrides: list[Override], budget: Budget,
           where: str = "grid") -> list[Cell]:
    """The cross product of ``axes`` over ``base``, overrides and budget applied, validated."""
    combos = [dict(zip(axes, values)) for values in itertools.product(*axes.values())]
    names = cell_names(combos)
    cells = []
    for name, combo in zip(names, combos):
        try:
            cells.append(_cell(name, combo, _cell_config(base, combo, overrides), budget))
        except ConfigError as err:
            raise ConfigError(f"{where}: cell {name}: {err}") from None
    return cells


def baseline_cells(baselines: list[str], base: dict[str, Any], axes: dict[str, list[Any]], overrides: list[Override],
                   where: str = "grid") -> list[Cell]:
    """One ``zotune eval`` cell per baseline and value of the non-training axes; in the report its
    ``optimizer.name`` is the baseline's label, its other training axes "-"."""
    if not baselines:
        return []
    varied = {k: v for k, v in axes.items() if not k.startswith(TRAINING_AXES)}
    combos = [dict(zip(varied, values)) for values in itertools.product(*varied.values())]
    cells = []
    for baseline in baselines:
        names = [f"baseline={baseline}" + (f",{n}" if varied else "") for n in cell_names(combos)]
        for name, combo in zip(names, combos):
            shown = {k: BASELINE_LABELS[baseline] if k == "optimizer.name" else combo.get(k, "-") for k in axes}
            config = _cell_config(base, combo, overrides)
            set_dotted(config, "eval.baseline", baseline)
            try:
                cells.append(Cell(name, shown, config, from_dict(copy.deepcopy(config)), 0, command="eval"))
            except ConfigError as err:
                raise ConfigError(f"{where}: cell {name}: {err}") from None
    return cells


def _cell_config(base: dict[str, Any], combo: dict[str, Any], overrides: list[Override]) -> dict[str, Any]:
    """``base`` with the cell's axis values, then the sets of the overrides that match them. A cell keeps no
    weights files unless the grid sets ``train.save_weights`` (its figures are the point; a ZO cell's weights
    come back with ``zotune replay``): a grid of full fine-tunes would otherwise write ~1 GB per cell."""
    config = copy.deepcopy(base)
    if isinstance(config.setdefault("train", {}), dict):
        config["train"].setdefault("save_weights", False)
    for key, value in combo.items():
        set_dotted(config, key, copy.deepcopy(value))
    for override in [o for o in overrides if o.matches(config)]:
        for key, value in override.set.items():
            set_dotted(config, key, copy.deepcopy(value))
    return config


def _cell(name: str, combo: dict[str, Any], config: dict[str, Any], budget: Budget) -> Cell:
    cfg = from_dict(copy.deepcopy(config))
    task_spec(cfg.task)
    per_step = cell_forwards_per_step(cfg)
    if budget.kind == "forward_passes":
        if per_step is None:
            raise ConfigError("budget.forward_passes cannot size a block-wise cell (its forward passes per step "
                              "depend on the model's layers); use budget: {steps: N} for block-wise grids")
        if budget.value < per_step:
            raise ConfigError(f"budget.forward_passes {budget.value} is less than one step ({per_step} forward passes)")
        config.setdefault("train", {})["steps"] = budget.value // per_step
    elif budget.kind == "steps":
        config.setdefault("train", {})["steps"] = budget.value
    if budget.kind is not None:
        cfg = from_dict(copy.deepcopy(config))
    return Cell(name, combo, config, cfg, per_step)


def cell_forwards_per_step(cfg: Config) -> int | None:
    """Forward passes a training step of ``cfg`` counts (as the trainer does: a first-order
    step 1; hybrid ZO-FO adds its FO step's 1). None for block-wise ZO, whose count is
    per-block queries times the model's layers (+1), known only once the model is loaded."""
    # also refuses block-wise for the optimizers without it
    per_step = run_forwards_per_step(cfg)
    if cfg.optimizer.blockwise:
        return None
    return per_step + (1 if cfg.tuning.hybrid.zo_layers is not None else 0)


def lookup(raw: dict[str, Any], key: str) -> Any:
    """The value at dotted ``key`` of a config mapping: the mapping's own, else the default
    (``_MISSING`` when neither has it)."""
    value = _walk(raw, key)
    if value is not _MISSING or (key.startswith("task.") and "task" in raw):  # a task given replaces the default
        return value
    return _walk(Config().to_dict(), key)


def _walk(node: Any, key: str) -> Any:
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


# -- names ---------------------------------------------------------------------------------
def axis_label(key: str) -> str:
    """Short name of an axis: ``optimizer.name`` -> ``optimizer``, ``tuning.scheme`` -> ``scheme``."""
    parts = key.split(".")
    return parts[-2] if parts[-1] == "name" and len(parts) > 1 else parts[-1]


def value_label(value: Any) -> str:
    """Readable text of an axis value: a path's last part, a task mapping's name (other mappings:
    ``key=value+...``), YAML booleans and null."""
    if isinstance(value, dict):
        return str(value.get("name") or "+".join(f"{k}={value_label(v)}" for k, v in value.items()))
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    text = str(value)
    if "/" in text and Path(text).exists():
        return Path(text).name or text
    return text


def cell_names(combos: list[dict[str, Any]]) -> list[str]:
    """Stable directory names, ``optimizer=ZOSGD,scheme=lora,seed=0``: short axis labels (the
    dotted key where two labels would collide), file-name-safe values, and a short hash where
    two cells would still share a name."""
    keys = list(combos[0]) if combos else []
    labels = [axis_label(k) for k in keys]
    labels = [k if labels.count(lab) > 1 else lab for k, lab in zip(keys, labels)]
    names = [",".join(f"{lab}={_safe(value_label(c[k]))}" for lab, k in zip(labels, keys)) or "cell" for c in combos]
    return [
        f"{n}-{hashlib.sha1(json.dumps(c, sort_keys=True, default=str).encode()).hexdigest()[:6]}"
        if names.count(n) > 1 else n
        for n, c in zip(names, combos)
    ]


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+=-]+", "_", text)[:40] or "_"
