"""zotune's own imports stay a layered graph, read from the source with ``ast`` (nothing is imported).

(a) The zotune-internal imports a module makes when it is imported (module-level statements,
    those under ``if``/``try``/``with`` and class bodies included; function bodies and
    ``if TYPE_CHECKING:`` blocks not) form no cycle. An edge goes to each module an import names:
    ``import a.b.c`` to ``a.b.c``; ``from a.b import c`` to ``a.b.c`` when that is a module,
    else to ``a.b`` (``c`` is then a name its ``__init__`` defines). Importing ``a.b.c`` runs the
    ``__init__`` of ``a`` and ``a.b`` first, so those are edges too, except the packages that
    contain the importing module: they are already being imported when its body runs (but
    ``from . import name``, a name of the package's ``__init__``, does need that ``__init__``).
(b) No module imports a private name (one leading underscore, not a dunder) from another
    zotune module.
(c) No function body imports a zotune module (such an import hides a cycle), except in
    ``cli.py``, whose subcommands import their module when run, to keep ``zotune --help`` fast.
    Third-party imports in functions are fine (transformers, peft, matplotlib: seconds each).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "zotune"
TOP = PACKAGE.name
LAZY_IMPORTS_ALLOWED = {f"{TOP}.cli"}  # one import per subcommand, for the CLI's start-up time


@dataclass(frozen=True)
class Module:
    name: str  # dotted: zotune.bench.runner
    where: str  # for messages: src/zotune/bench/runner.py
    is_package: bool  # an __init__.py
    tree: ast.Module


Modules = dict[str, Module]
Graph = dict[str, dict[str, int]]  # module -> {imported module: line of the first import making the edge}


def package_modules(package: Path = PACKAGE) -> Modules:
    """Every ``.py`` file under ``package``, parsed, by dotted module name."""
    modules = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        name = ".".join(parts[:-1] if is_package else parts)
        where = str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)
        modules[name] = Module(name, where, is_package, ast.parse(path.read_text(encoding="utf-8"), str(path)))
    return modules


MODULES = package_modules()


def _internal(name: str | None) -> bool:
    return name is not None and (name == TOP or name.startswith(TOP + "."))


def _source(module: Module, node: ast.ImportFrom) -> str | None:
    """The absolute dotted module an ``ImportFrom`` reads from, relative imports resolved."""
    if not node.level:
        return node.module
    package = module.name.split(".") if module.is_package else module.name.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def import_targets(module: Module, node: ast.Import | ast.ImportFrom, modules: Modules) -> list[tuple[str, bool]]:
    """``(module, named)`` for each module of ``modules`` an import statement imports: ``named`` when the
    statement names it or reads a name from it, not when it is only a package on the way to one."""
    if isinstance(node, ast.Import):
        named = [alias.name for alias in node.names]
        passed = [ancestor for name in named for ancestor in _ancestors(name)]
    else:
        source = _source(module, node)
        subs = [f"{source}.{alias.name}" for alias in node.names]
        named = [sub for sub in subs if sub in modules]
        if len(named) < len(subs):  # a name the package's __init__ (or the module) defines, or "*"
            named.insert(0, source)
        passed = _ancestors(source) + ([] if source in named else [source])
    return [(name, False) for name in passed if name in modules] + [(name, True) for name in named if name in modules]


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def import_time_imports(body: list[ast.stmt]):
    """The import statements that run when the module is imported (not in functions or TYPE_CHECKING)."""
    for stmt in body:
        if isinstance(stmt, (ast.Import, ast.ImportFrom)):
            yield stmt
        elif isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        elif isinstance(stmt, ast.If) and _is_type_checking(stmt.test):
            yield from import_time_imports(stmt.orelse)
        elif isinstance(stmt, ast.ClassDef):
            yield from import_time_imports(stmt.body)
        else:  # if / for / while / with / try / match: their blocks run at import time
            yield from import_time_imports(getattr(stmt, "body", []))
            for clause in getattr(stmt, "handlers", []) + getattr(stmt, "cases", []):  # except / case
                yield from import_time_imports(clause.body)
            yield from import_time_imports(getattr(stmt, "orelse", []))
            yield from import_time_imports(getattr(stmt, "finalbody", []))


def import_graph(modules: Modules) -> Graph:
    """The edges of (a) between ``modules``."""
    graph: Graph = {}
    for module in modules.values():
        edges = graph.setdefault(module.name, {})
        importing = set(_ancestors(module.name)) | {module.name}  # started before this module's body runs
        for node in import_time_imports(module.tree.body):
            for target, named in import_targets(module, node, modules):
                if target != module.name and (named or target not in importing):
                    edges.setdefault(target, node.lineno)
    return graph


def find_cycle(graph: Graph) -> list[str] | None:
    """A cycle ``[a, b, ..., a]`` of the graph, or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in sorted(graph):
        if start in state:
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif nxt not in state:
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph.get(nxt, {}))))
    return None


def describe_cycle(cycle: list[str], graph: Graph, modules: Modules) -> str:
    steps = [f"  {a} -> {b}  ({modules[a].where}:{graph[a][b]})" for a, b in zip(cycle, cycle[1:])]
    return "import cycle among zotune's modules:\n" + "\n".join(steps)


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_imports(modules: Modules) -> list[str]:
    """(b): ``file:line: statement`` of each import of a private name from a zotune module."""
    offenders = []
    for module in modules.values():
        for node in ast.walk(module.tree):
            if isinstance(node, ast.ImportFrom) and _internal(_source(module, node)):
                offenders += [f"{module.where}:{node.lineno}: from {_source(module, node)} import {alias.name}"
                              for alias in node.names if _private(alias.name)]
            elif isinstance(node, ast.Import):
                offenders += [f"{module.where}:{node.lineno}: import {alias.name}" for alias in node.names
                              if _internal(alias.name) and any(_private(part) for part in alias.name.split("."))]
    return offenders


def function_imports(modules: Modules, allowed: set[str] = LAZY_IMPORTS_ALLOWED) -> list[str]:
    """(c): ``file:line: statement`` of each zotune import inside a function (nested ones included)."""
    offenders = set()
    for module in modules.values():
        if module.name in allowed:
            continue
        for fn in ast.walk(module.tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.Import) and any(_internal(alias.name) for alias in node.names) or (
                        isinstance(node, ast.ImportFrom) and _internal(_source(module, node))):
                    offenders.add((module.where, node.lineno, ast.unparse(node)))
    return [f"{where}:{line}: {text}" for where, line, text in sorted(offenders)]


# -- the package ---------------------------------------------------------------------------
def test_modules_found():
    assert {f"{TOP}", f"{TOP}.cli", f"{TOP}.bench.runner", f"{TOP}.optim.base"} <= set(MODULES), sorted(MODULES)


def test_import_graph_has_no_cycle():
    graph = import_graph(MODULES)
    cycle = find_cycle(graph)
    assert cycle is None, describe_cycle(cycle, graph, MODULES)


def test_no_private_names_imported_across_modules():
    offenders = private_imports(MODULES)
    assert not offenders, "private names imported from another zotune module:\n" + "\n".join(offenders)


def test_no_zotune_imports_inside_functions():
    offenders = function_imports(MODULES)
    assert not offenders, ("zotune modules imported inside functions (import them at the top; a cycle that "
                           "makes is broken by moving code down):\n" + "\n".join(offenders))


# -- the checks themselves, on made-up modules -----------------------------------------------
def _made_up(files: dict[str, str]) -> Modules:
    """Modules from ``{"pkg/sub.py": source}`` (names relative to a package ``zotune``)."""
    modules = {}
    for rel, text in files.items():
        parts = [TOP, *Path(rel).with_suffix("").parts]
        is_package = parts[-1] == "__init__"
        name = ".".join(parts[:-1] if is_package else parts)
        modules[name] = Module(name, rel, is_package, ast.parse(text))
    return modules


def _edges(modules: Modules) -> set[tuple[str, str]]:
    strip = len(TOP) + 1
    return {(a[strip:] or TOP, b[strip:] or TOP) for a, targets in import_graph(modules).items() for b in targets}


def test_find_cycle():
    assert find_cycle({"a": {"b": 1}, "b": {"c": 1}, "c": {}}) is None
    assert find_cycle({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b": 1, "c": 1}, "b": {}, "c": {"c2": 1}, "c2": {"c": 1}}) == ["c", "c2", "c"]


def test_import_time_imports_skip_functions_and_type_checking():
    tree = ast.parse(
        "import a\n"
        "if TYPE_CHECKING:\n    import b\nelse:\n    import c\n"
        "try:\n    import d\nexcept ImportError:\n    import e\nfinally:\n    import f\n"
        "def g():\n    import h\n"
        "class K:\n    import i\n    def m(self):\n        import j\n"
        "if typing.TYPE_CHECKING:\n    import k\n"
        "with x:\n    import l\n")
    assert [alias.name for node in import_time_imports(tree.body) for alias in node.names] == \
        ["a", "c", "d", "e", "f", "i", "l"]


def test_edges_of_relative_and_package_imports():
    modules = _made_up({
        "__init__.py": "from . import p\nfrom .q import thing\n",
        "p/__init__.py": "from .a import A\n",
        "p/a.py": "from . import b\nfrom .b import B\nfrom .. import q\nimport zotune.r.s\n",
        "p/b.py": "B = 1\n",
        "q.py": "from .r import s\n",
        "r/__init__.py": "",
        "r/s.py": "if TYPE_CHECKING:\n    from ..q import x\ndef f():\n    from ..q import y\n",
    })
    assert _edges(modules) == {
        ("zotune", "p"), ("zotune", "q"),
        ("p", "p.a"),
        ("p.a", "p.b"), ("p.a", "q"), ("p.a", "r"), ("p.a", "r.s"),  # not ("p.a", "p"): p is importing it
        ("q", "r"), ("q", "r.s"),
    }
    assert find_cycle(import_graph(modules)) is None


def test_a_name_from_the_package_being_imported_is_a_cycle():
    """``from . import name`` in a submodule its package's ``__init__`` imports first: ImportError at run time."""
    modules = _made_up({
        "t/__init__.py": "from .schemes import SCHEMES\n\ndef tuned_top():\n    pass\n",
        "t/schemes.py": "from . import tuned_top\nSCHEMES = {}\n",
    })
    assert find_cycle(import_graph(modules)) == ["zotune.t", "zotune.t.schemes", "zotune.t"]


def test_a_cycle_is_reported_with_its_lines():
    modules = _made_up({
        "b/runner.py": "import json\nfrom .report import write_report\n",
        "b/report.py": "from .plots import write_plots\n",
        "b/plots.py": "from zotune.b.runner import Outcome\n",
    })
    graph = import_graph(modules)
    assert describe_cycle(find_cycle(graph), graph, modules).splitlines()[1:] == [
        "  zotune.b.plots -> zotune.b.runner  (b/plots.py:1)",
        "  zotune.b.runner -> zotune.b.report  (b/runner.py:2)",
        "  zotune.b.report -> zotune.b.plots  (b/report.py:1)",
    ]


@pytest.mark.parametrize("source, private", [
    ("from .base import ZOOptimizer, _check\n", ["x/m.py:1: from zotune.x.base import _check"]),
    ("from zotune.x.base import __version__, check as _check\n", []),  # a dunder; a public name under a private alias
    ("from . import _impl\n", ["x/m.py:1: from zotune.x import _impl"]),
    ("import zotune.x._impl\n", ["x/m.py:1: import zotune.x._impl"]),
    ("from collections import _chain\n", []),  # not zotune's
])
def test_private_imports(source, private):
    assert private_imports(_made_up({"x/m.py": source})) == private


def test_function_imports():
    modules = _made_up({
        "x/m.py": "import zotune.y\n\ndef f():\n    import json\n    from .n import g\n\n"
                  "class C:\n    def m(self):\n        import zotune.y\n        from transformers import A\n",
        "cli.py": "def main():\n    from .x.m import f\n",
    })
    assert function_imports(modules) == ["x/m.py:5: from .n import g", "x/m.py:9: import zotune.y"]
