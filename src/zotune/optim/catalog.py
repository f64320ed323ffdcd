"""``zotune optimizers``: every optimizer with its forward passes per step and its default lr / eps per scheme,
as a config version resolves them (what a run that sets neither gets)."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import CONFIG_VERSION, VERSIONS, OptimizerConfig
from ..errors import ConfigError
from .factory import forwards_per_step, own_default, own_table, resolved_hparams
from .registry import optimizer_names, zo_class

ROWS = ("full", "lora-fa", "lora", "top", "prefix", "prompt")  # rows of the defaults tables (factory.defaults_row)
FIRST_ORDER_SUMMARY = {
    "SGD": "first-order baseline: torch.optim.SGD with backpropagation",
    "AdamW": "first-order baseline: torch.optim.AdamW with backpropagation",
}


@dataclass(frozen=True)
class Entry:
    """One optimizer of the catalog."""

    name: str
    zeroth_order: bool
    forwards: int  # forward passes per step at the default options (first order: 1, its backward aside)
    defaults: dict[str, tuple[float, float | None]]  # row -> (lr, eps); eps None for first order
    summary: str
    own_lr: frozenset[str] = frozenset()  # the rows whose lr is the optimizer's own (its class's default_lr)


def catalog(version: int = CONFIG_VERSION) -> list[Entry]:
    """Every registered optimizer, zeroth-order first, with its defaults at config ``version``."""
    if version not in VERSIONS:
        raise ConfigError(f"--version must be one of {', '.join(map(str, VERSIONS))}, got {version}")
    entries = []
    for name in optimizer_names():
        cls, cfg = zo_class(name), OptimizerConfig(name=name)
        own = own_table(cls, "default_lr") if cls is not None else {}
        entries.append(Entry(
            name, cls is not None, forwards_per_step(cfg, version=version),
            {row: resolved_hparams(cfg, row, version) for row in ROWS},
            cls.summary if cls is not None else FIRST_ORDER_SUMMARY.get(name, ""),
            frozenset(row for row in ROWS if own_default(own, row, version) is not None),
        ))
    return entries


def _number(x: float) -> str:
    """``1e-4`` rather than ``0.0001`` or ``1e-04``."""
    return f"{x:.0e}".replace("e-0", "e-").replace("e+00", "")


def render(entries: list[Entry], version: int = CONFIG_VERSION) -> str:
    """The table (lr / eps per scheme row), then one line per optimizer."""
    header = ("optimizer", "kind", "fwd/step", *ROWS)
    rows = [header]
    for e in entries:
        cells = [(f"{_number(lr)}{'*' * (row in e.own_lr)} / {_number(eps)}" if eps is not None else _number(lr))
                 for row, (lr, eps) in e.defaults.items()]
        rows.append((e.name, "ZO" if e.zeroth_order else "FO", str(e.forwards), *cells))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines += ["", f"lr / eps by scheme: the defaults of config version {version}"
              + (" (new runs)." if version == CONFIG_VERSION else " (runs recorded under it keep them).")
              + "\nlora-fa is LoRA with A frozen, ZO's LoRA since version 3. fwd/step: forward passes of a step at"
              + "\nthe default options (first order: 1, its backward aside). Override with optimizer.lr= / optimizer.eps=;"
              + "\nthe sweeps behind the values are in docs/sweeps.md. A ZO lr with * is the optimizer's own (its class's"
              + "\ndefault_lr: its sweeps', or its paper's); the others are the family's, from ZOSGD's sweeps (prefix and"
              + "\nprompt: MeZO's).", ""]
    width = max(len(e.name) for e in entries)
    lines += [f"{e.name.ljust(width)}  {e.summary}" for e in entries]
    return "\n".join(lines)
