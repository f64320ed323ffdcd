"""``zotune bench``: a YAML grid of ``zotune train`` cells, run one process per cell, reported as
ZO-Bench-style tables (results.csv, report.md) and PNG plots."""

from .grid import Cell, Grid, load_grid
from .runner import run_bench

__all__ = ["Cell", "Grid", "load_grid", "run_bench"]
