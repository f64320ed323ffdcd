"""Tasks as data: YAML specs (template, verbalizer, source, metric), loaders, splits.

``task_spec(cfg)`` turns the config's ``task:`` mapping into a :class:`TaskSpec`;
``load_task(spec, seed)`` reads its data and returns deterministic train / dev / test splits.
"""

from .data import load_task
from .fetch import fetch_polarity
from .registry import builtin_tasks, list_tasks, task_spec
from .spec import Example, TaskData, TaskSpec, make_spec

__all__ = [
    "Example", "TaskData", "TaskSpec", "builtin_tasks", "fetch_polarity", "list_tasks",
    "load_task", "make_spec", "task_spec",
]
