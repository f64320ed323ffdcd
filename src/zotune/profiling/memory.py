"""Peak memory of tuning against inference: ``zotune memory``.

Every cell (one optimizer x scheme x sequence length, plus one inference cell per length) runs
in a fresh ``zotune memory --cell JSON`` process, since a process's peak memory never goes down:
the cells are ``zotune bench`` cells, run by its runner (:func:`zotune.bench.runner.run_cells`)
into the same layout under ``--out`` (``configs/``, ``cells/<cell>/`` with the cell's
``config.yaml`` and its row as ``summary.json``, ``logs/``), so a finished cell is skipped when
the command runs again and an interrupted one stops cleanly. A cell builds model, scheme and optimizer as ``zotune train`` does
(:class:`~zotune.train.trainer.Session`), then runs ``steps`` training steps (first-order
ones through the trainer's own step) on a synthetic batch: ``batch_size`` rows of ``length``
random token ids from the tokenizer's vocabulary, with ``labels = input_ids``. The loss is
the causal-LM loss over the whole sequence (the LM head on every position): no dataset is
needed and any length up to the model's positions works; the task scorers run the head on
the continuation tokens only, so a real run's activations are at most these. The inference
cell runs the same batch through a no-grad forward, the same number of times.

Measured (bytes; CPU: resident set size from ``/proc/self/status``; CUDA:
``torch.cuda.memory_allocated`` / ``max_memory_allocated``):

* ``weights``: parameters + buffers of the (scheme-applied) model, from the tensors;
* ``runtime``: the baseline after loading, minus the weights (interpreter, libraries,
  allocator slack; about 0 on CUDA);
* ``optimizer_state``: the tensors in ``optimizer.state`` after the steps, exact;
* ``gradients``: the ``.grad`` tensors after the steps (first-order only), exact;
* ``activations``: the rest of the peak (activations and temporaries of the steps);

so that ``weights + runtime + optimizer_state + gradients + activations = peak``. On Linux the
peak is reset after loading (``/proc/self/clear_refs``), so a loader's transient copies do not
mask the steps' peak; where it cannot be, ``peak_reset`` is false and the peak includes loading.
"""

from __future__ import annotations

import csv
import ctypes
import difflib
import gc
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from ..bench.benchdir import BenchDir
from ..bench.grid import Cell as BenchCell
from ..bench.runner import run_cells
from ..config import SCHEMES, Config, from_dict, unresolved_versioned_defaults
from ..errors import ConfigError
from ..models.loader import resolve_source
from ..optim.factory import run_forwards_per_step
from ..optim.registry import is_zeroth_order, optimizer_names
from ..train.stepper import make_step
from ..train.trainer import Session

INFERENCE = "inference"
DEFAULT_OPTIMIZERS = ("ZOSGD", "ZOAdam", "SGD", "AdamW")
DEFAULT_SCHEMES = ("full", "lora")
DEFAULT_LENGTHS = (64, 128, 256, 512, 1024, 2048)
PARTS = ("weights", "runtime", "optimizer_state", "gradients", "activations")
COLUMNS = ("length", "batch_size", "optimizer", "scheme", "device", "steps", "trainable_params", "trainable_bytes",
           *(f"{p}_bytes" for p in PARTS), "peak_bytes", "peak_vs_inference", "peak_reset", "wall_s", "status", "error")
FO_VS_ZO = {"SGD": "ZOSGD", "AdamW": "ZOAdam"}  # ZO-Bench's FO / ZO memory ratios
MB = 2**20


@dataclass(frozen=True)
class Cell:
    """One measurement: ``optimizer`` is an optimizer name or ``"inference"`` (scheme ``-``)."""

    optimizer: str
    scheme: str
    length: int
    batch_size: int
    steps: int
    device: str

    @property
    def label(self) -> str:
        """The cell's name in the log: ``inference`` or ``optimizer (scheme)``."""
        return INFERENCE if self.optimizer == INFERENCE else f"{self.optimizer} ({self.scheme})"

    @property
    def name(self) -> str:
        """Its directory name under ``--out``: ``inference-L64``, ``ZOSGD-full-L64``."""
        return f"{INFERENCE if self.optimizer == INFERENCE else f'{self.optimizer}-{self.scheme}'}-L{self.length}"


# -- meters ---------------------------------------------------------------------------------
class RssMeter:
    """Resident set size of this process (Linux ``/proc/self/status``; else ``ru_maxrss``)."""

    name = "rss"

    @staticmethod
    def _status(key: str) -> int | None:
        try:
            text = Path("/proc/self/status").read_text()
        except OSError:
            return None
        match = re.search(rf"^{key}:\s+(\d+) kB", text, re.M)
        return int(match.group(1)) * 1024 if match else None

    def current(self) -> int:
        """The current resident set size, bytes (the peak where ``/proc`` is missing)."""
        rss = self._status("VmRSS")
        return rss if rss is not None else self._maxrss()

    def reset_peak(self) -> bool:
        """Set the peak to the current RSS (Linux >= 4.0); False where impossible."""
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            return False
        return True

    def peak(self) -> int:
        """The peak resident set size since the last reset, bytes."""
        hwm = self._status("VmHWM")
        return hwm if hwm is not None else self._maxrss()

    @staticmethod
    def _maxrss() -> int:
        import resource

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss if sys.platform == "darwin" else rss * 1024  # bytes on macOS, KiB on Linux


class CudaMeter:
    """Bytes allocated by torch on the current CUDA device."""

    name = "cuda"

    def current(self) -> int:
        """Bytes torch has allocated on the device now."""
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated()

    def reset_peak(self) -> bool:
        """Reset torch's peak allocation statistics; always True."""
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return True

    def peak(self) -> int:
        """The most bytes torch has allocated on the device since the last reset."""
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()


def make_resident(model: torch.nn.Module) -> None:
    """Read every weight once: weights loaded by memory-mapping the safetensors file are only
    paged in by their first use, which would then count as the steps' memory, not the weights'."""
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            t.sum()


def release_freed_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc), so that the
    baseline counts live memory only."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


# -- exact tensor accounting ----------------------------------------------------------------
def tensor_bytes(tensors: Iterable[Any]) -> int:
    """Bytes of the distinct tensors among ``tensors`` (others ignored)."""
    unique = {id(t): t for t in tensors if isinstance(t, torch.Tensor)}
    return sum(t.numel() * t.element_size() for t in unique.values())


def weights_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters and buffers (a shared tensor once)."""
    return tensor_bytes([*model.parameters(), *model.buffers()])


def optimizer_state_bytes(optimizers: Iterable[torch.optim.Optimizer]) -> int:
    """Bytes of every tensor in the optimizers' ``state`` (moments, momentum, step counters)."""
    return tensor_bytes(v for opt in optimizers for state in opt.state.values() for v in state.values())


def optimizer_params(optimizers: Iterable[torch.optim.Optimizer]) -> list[torch.Tensor]:
    """The distinct parameters that require grad in the optimizers' param groups."""
    unique = {id(p): p for opt in optimizers for g in opt.param_groups for p in g["params"] if p.requires_grad}
    return list(unique.values())


# -- one cell (in its own process) ----------------------------------------------------------
class LMLoss:
    """The causal-LM loss of a batch with ``labels``: the scorer the trainer's steps call."""

    @staticmethod
    def loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The model's own loss on ``batch`` (the causal-LM loss of its ``labels``)."""
        return model(**batch).loss


def synthetic_batch(vocab_size: int, length: int, batch_size: int, device: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """``batch_size`` x ``length`` random token ids (seeded), labels = ids."""
    ids = torch.randint(0, vocab_size, (batch_size, length), generator=torch.Generator().manual_seed(seed))
    ids = ids.to(device)
    return {"input_ids": ids, "labels": ids}


def check_length(length: int, limit: int | None, model_name: str) -> None:
    """A ConfigError when ``length`` exceeds the model's ``limit`` positions (None: no limit known)."""
    if limit is not None and length > limit:
        raise ConfigError(f"sequence length {length} is beyond {model_name}'s {limit} positions")


def cell_config(cfg: Config, cell: Cell) -> Config:
    """The run config of a cell: its optimizer and scheme (inference: the plain model), and its batch
    shape and steps as ``train.batch_size`` / ``max_length`` / ``steps`` (so that a cell measured
    with other ones is not taken for done)."""
    raw = unresolved_versioned_defaults(cfg)  # defaults that depend on the optimizer: each cell's own
    inference = cell.optimizer == INFERENCE
    raw["tuning"]["scheme"] = "full" if inference else cell.scheme
    raw["optimizer"]["name"] = "ZOSGD" if inference else cell.optimizer  # inference: no special attention
    raw["train"] |= {"batch_size": cell.batch_size, "max_length": cell.length, "steps": cell.steps}
    return from_dict(raw)


def measure_cell(cfg: Config, cell: Cell) -> dict[str, Any]:
    """Build, measure the baseline, run the steps, return the breakdown (bytes). Meant for a
    fresh process: the peak it reports is this process's."""
    t0 = time.perf_counter()
    session = Session.build(cell_config(cfg, cell), log=lambda *_: None, with_data=False)
    model = session.model.to(cell.device)
    check_length(cell.length, getattr(model.config, "max_position_embeddings", None), cfg.model.name)
    vocab = min(len(session.tokenizer), model.get_input_embeddings().num_embeddings)
    batch = synthetic_batch(vocab, cell.length, cell.batch_size, cell.device, seed=cfg.seed)
    optimizers: list[torch.optim.Optimizer] = []
    if cell.optimizer != INFERENCE:
        opt, fo_opt, zo_params = session.optimizers(log=lambda *_: None)
        optimizers = [o for o in (opt, fo_opt) if o is not None]
        take_step = make_step(opt, fo_opt, zo_params, model=model, loss=LMLoss.loss,
                              zeroth_order=is_zeroth_order(cell.optimizer))  # the trainer's steps

    meter = CudaMeter() if cell.device.startswith("cuda") else RssMeter()
    make_resident(model)
    release_freed_memory()
    baseline = meter.current()
    reset = meter.reset_peak()
    for _ in range(cell.steps):
        if cell.optimizer == INFERENCE:
            with torch.no_grad():
                LMLoss.loss(model, batch)
        else:
            take_step(batch)
    peak = meter.peak()

    params = optimizer_params(optimizers)
    weights = weights_bytes(model)
    state = optimizer_state_bytes(optimizers)
    grads = tensor_bytes(p.grad for p in params)
    parts = {"weights": weights, "runtime": baseline - weights, "optimizer_state": state, "gradients": grads,
             "activations": peak - baseline - state - grads}
    return {
        "length": cell.length, "batch_size": cell.batch_size, "optimizer": cell.optimizer, "scheme": cell.scheme,
        "device": cell.device, "steps": cell.steps, "trainable_params": sum(p.numel() for p in params),
        "trainable_bytes": tensor_bytes(params), **{f"{k}_bytes": v for k, v in parts.items()},
        "peak_bytes": peak, "peak_reset": reset,
        "wall_s": round(time.perf_counter() - t0, 2), "status": "ok", "error": "",
    }


def measure_one(cfg: Config, cell_json: str, out: str | Path) -> dict[str, Any]:
    """``zotune memory --cell JSON --config C --out RUN`` (a cell process, started by the runner):
    measure the cell in this process, write ``RUN/config.yaml`` and its row as ``RUN/summary.json``."""
    try:
        cell = Cell(**json.loads(cell_json))
    except (ValueError, TypeError) as err:
        raise ConfigError(f"--cell must be a memory cell as JSON: {err}") from None
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    row = measure_cell(cfg, cell)
    run = Path(out)
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), encoding="utf-8")
    (run / "summary.json").write_text(json.dumps(row, indent=2) + "\n", encoding="utf-8")
    return row


def parse_names(text: str, valid: Sequence[str], what: str) -> list[str]:
    """``"a,b"`` -> ``["a", "b"]``, each one of ``valid`` (ConfigError naming the bad one)."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise ConfigError(f"--{what} is empty; choose from {', '.join(valid)}")
    for name in names:
        if name not in valid:
            near = difflib.get_close_matches(name, valid, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else f"; choose from {', '.join(valid)}"
            raise ConfigError(f"unknown {what[:-1]} {name!r} in --{what}{hint}")
    return list(dict.fromkeys(names))


def parse_lengths(text: str) -> list[int]:
    """``"64,128"`` -> sorted distinct ints >= 2 (ConfigError otherwise)."""
    try:
        lengths = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--lengths must be comma-separated integers, got {text!r}") from None
    if not lengths or min(lengths) < 2:
        raise ConfigError(f"--lengths must be integers >= 2 (tokens per sequence), got {text!r}")
    return sorted(set(lengths))


def resolve_device(device: str) -> str:
    """``--device``: ``auto`` is ``cuda`` when torch sees one, else ``cpu``; ``cuda`` must be available (ConfigError
    otherwise)."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda, but torch sees no CUDA device")
    if device not in ("cpu", "cuda"):
        raise ConfigError(f"--device must be auto, cpu or cuda, got {device!r}")
    return device


def max_positions(model_name: str) -> int | None:
    """The model's positions from its config, without loading weights (None: unknown here).
    A missing model raises its one-line ModelError."""
    from transformers import AutoConfig

    source = resolve_source(model_name)
    if not isinstance(source, Path):
        return None  # a hub id: the cell checks once the model is loaded
    return getattr(AutoConfig.from_pretrained(source), "max_position_embeddings", None)


def plan(optimizers: Sequence[str], schemes: Sequence[str], lengths: Sequence[int], batch_size: int, steps: int,
         device: str) -> list[Cell]:
    """Per length: the inference cell, then every optimizer x scheme."""
    cells = []
    for length in lengths:
        cells.append(Cell(INFERENCE, "-", length, batch_size, steps, device))
        cells += [Cell(o, s, length, batch_size, steps, device) for o in optimizers for s in schemes]
    return cells


def bench_cell(cfg: Config, cell: Cell) -> BenchCell:
    """The runner's cell for a measurement: its config, and ``zotune memory --cell JSON`` as its command."""
    config = cell_config(cfg, cell)
    return BenchCell(cell.name, {}, config.to_dict(), config, forwards_per_step=None, command="memory",
                     args=("--cell", json.dumps(asdict(cell))))


def run_memory(
    cfg: Config, out: str | Path, optimizers: str = ",".join(DEFAULT_OPTIMIZERS),
    schemes: str = ",".join(DEFAULT_SCHEMES), lengths: str = ",".join(map(str, DEFAULT_LENGTHS)),
    steps: int = 3, batch_size: int = 1, device: str = "auto", overwrite: bool = False,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """``zotune memory``: measure every cell (those an interrupted run measured already are kept);
    write ``memory.csv``, ``memory.md`` and ``memory_vs_length.png`` into ``out`` (an earlier
    ``memory.csv`` there: only with ``overwrite``, which measures every cell again); return the rows."""
    names = parse_names(optimizers, optimizer_names(), "optimizers")
    scheme_names = parse_names(schemes, SCHEMES, "schemes")
    sizes = parse_lengths(lengths)
    if steps < 1 or batch_size < 1:
        raise ConfigError(f"--steps and --batch-size must be >= 1, got {steps} and {batch_size}")
    device = resolve_device(device)
    check_length(max(sizes), max_positions(cfg.model.name), cfg.model.name)
    cells = plan(names, scheme_names, sizes, batch_size, steps, device)
    for cell in cells:  # bad optimizer options: one line before any cell loads the model
        if cell.optimizer != INFERENCE:
            run_forwards_per_step(cell_config(cfg, cell))
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a directory")
    if (out / "memory.csv").exists() and not overwrite:
        raise ConfigError(f"{out} already holds memory.csv (--overwrite to replace it)")
    if overwrite:  # measure every cell again
        for sub in ("cells", "configs", "logs"):
            shutil.rmtree(out / sub, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)

    title = f"{cfg.model.name} ({cfg.model.dtype}), batch {batch_size}, {steps} step{'s' * (steps != 1)}, {device}"
    bench, runs = BenchDir(out), {cell: bench_cell(cfg, cell) for cell in cells}
    bench.prepare_cells(list(runs.values()))
    todo = [run for run in runs.values() if bench.state(run) != "done"]
    log(f"{len(cells)} cells, each in a fresh process ({len(cells) - len(todo)} measured before, kept): {title}")
    run_cells(todo, bench, jobs=1, log=log, interactive=False)  # one at a time: each peak its own machine's
    rows = []
    for cell, run in runs.items():
        outcome = bench.outcome(run)
        summary = bench.run_dir(run) / "summary.json"
        row = (json.loads(summary.read_text(encoding="utf-8")) if summary.is_file() else
               {**asdict(cell), "status": "failed", "error": outcome.error if outcome else "not run",
                "wall_s": outcome.seconds if outcome else 0.0})
        rows.append(row)
    inference = {r["length"]: r["peak_bytes"] for r in rows if r["status"] == "ok" and r["optimizer"] == INFERENCE}
    for row in rows:
        if row["status"] == "ok" and row["length"] in inference:
            row["peak_vs_inference"] = round(row["peak_bytes"] / inference[row["length"]], 3)
    for i, (cell, row) in enumerate(zip(cells, rows), 1):
        log(f"[{i}/{len(cells)}] {cell.label}, {batch_size}x{cell.length} tokens: {_summary(row)}")
    write_csv(out / "memory.csv", rows)
    write_markdown(out / "memory.md", rows, title)
    plot_memory(out / "memory_vs_length.png", rows, title)
    log(f"memory table: {out / 'memory.md'}")
    return rows


def _summary(row: dict[str, Any]) -> str:
    if row["status"] != "ok":
        return f"failed: {row['error']}"
    parts = ", ".join(f"{p.replace('_', ' ')} {row[f'{p}_bytes'] / MB:.0f}" for p in PARTS)
    ratio = f", x{row['peak_vs_inference']:.2f} inference" if row.get("peak_vs_inference") else ""
    return f"peak {row['peak_bytes'] / MB:.0f} MB ({parts}){ratio}, {row['wall_s']:.1f}s"


# -- outputs --------------------------------------------------------------------------------
def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """Write the rows to ``path`` under the :data:`COLUMNS` (a missing value empty)."""
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows({c: row.get(c, "") for c in COLUMNS} for row in rows)


def _series(rows: list[dict[str, Any]]) -> dict[tuple[str, str], dict[int, dict[str, Any]]]:
    """(optimizer, scheme) -> length -> row, for the measured rows, in order of appearance."""
    series: dict[tuple[str, str], dict[int, dict[str, Any]]] = {}
    for row in rows:
        if row["status"] == "ok":
            series.setdefault((row["optimizer"], row["scheme"]), {})[row["length"]] = row
    return series


def _table(header: Sequence[str], body: Iterable[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(c) for c in line) + " |" for line in body]


def write_markdown(path: Path, rows: list[dict[str, Any]], title: str) -> None:
    """Three tables: peak by length, the breakdown of every cell, and FO / ZO ratios."""
    mb = lambda b: f"{b / MB:.1f}"  # noqa: E731
    lengths = sorted({r["length"] for r in rows})
    series = _series(rows)
    lines = [f"# Peak memory: {title}", "", "## Peak (MB) by sequence length", ""]
    lines += _table(["optimizer", "scheme", *map(str, lengths)],
                    ([o, s, *(mb(by[n]["peak_bytes"]) if n in by else "-" for n in lengths)]
                     for (o, s), by in series.items()))
    lines += ["", "## Breakdown (MB)", ""]
    lines += _table(["length", "optimizer", "scheme", *PARTS, "peak", "x inference"],
                    ([r["length"], r["optimizer"], r["scheme"], *(mb(r[f"{p}_bytes"]) for p in PARTS),
                      mb(r["peak_bytes"]), f"{r['peak_vs_inference']:.2f}" if "peak_vs_inference" in r else "-"]
                     if r["status"] == "ok"
                     else [r["length"], r["optimizer"], r["scheme"], *["-"] * (len(PARTS) + 1), r["error"]]
                     for r in rows))
    ratios = [(s, n, fo, zo, series[(fo, s)][n]["peak_bytes"] / series[(zo, s)][n]["peak_bytes"])
              for s in dict.fromkeys(k[1] for k in series) for n in lengths for fo, zo in FO_VS_ZO.items()
              if n in series.get((fo, s), {}) and n in series.get((zo, s), {})]
    if ratios:
        lines += ["", "## First-order / zeroth-order peak", ""]
        lines += _table(["scheme", "length", "FO", "ZO", "FO / ZO"], ([*r[:4], f"{r[4]:.2f}"] for r in ratios))
    lines += ["", "weights: parameters + buffers; runtime: the rest of the baseline after loading (interpreter, "
              "libraries); optimizer_state: tensors in optimizer.state; gradients: .grad tensors; activations: "
              "the rest of the peak. They sum to the peak. x inference: peak / the inference peak at that length.", ""]
    path.write_text("\n".join(lines), encoding="utf-8")


def plot_memory(path: Path, rows: list[dict[str, Any]], title: str) -> None:
    """Peak memory against sequence length: a line per optimizer and scheme, inference dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = {"full": "-", "lora": ":", "prefix": "-.", "prompt": (0, (5, 1, 1, 1))}
    colors: dict[str, str] = {}
    for (opt, scheme), by in _series(rows).items():
        xs = sorted(by)
        ys = [by[n]["peak_bytes"] / MB for n in xs]
        if opt == INFERENCE:
            ax.plot(xs, ys, "k--", marker="o", label="inference (no-grad forward)")
            continue
        color = colors.setdefault(opt, f"C{len(colors)}")
        ax.plot(xs, ys, linestyle=styles.get(scheme, "-"), color=color, marker="o", label=f"{opt} ({scheme})")
    lengths = sorted({r["length"] for r in rows})
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [str(n) for n in lengths])
    ax.set_xlabel("sequence length (tokens)")
    ax.set_ylabel("peak memory (MB)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

