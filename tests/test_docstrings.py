"""Every public definition in src/zotune says what it is; every citation of the contract points to a file.

Public: a module-level or class-level function, method or class whose name does not start with
``_``. A method that overrides a documented method of the same name in one of its class's base
classes defined in zotune (bases resolved by name through the module's own classes and its
``from ... import`` lines, followed transitively) inherits that docstring's meaning and needs
none of its own.
"""

from __future__ import annotations

import ast
import io
import re
import tokenize
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "zotune"
CONTRACT_CITATION = re.compile(r"(?<![\w./-])([\w./-]*contract\.md)", re.IGNORECASE)


@dataclass
class Module:
    path: Path
    name: str  # dotted: zotune.optim.base
    tree: ast.Module
    classes: dict[str, ast.ClassDef] = field(default_factory=dict)  # top-level classes by name
    imported: dict[str, tuple[str, str]] = field(default_factory=dict)  # local name -> (module, name)


def _module_name(path: Path, package: Path) -> str:
    parts = list(path.relative_to(package.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _absolute(module: Module, node: ast.ImportFrom) -> str:
    """The dotted module an ``ImportFrom`` reads from, relative imports resolved."""
    if not node.level:
        return node.module or ""
    package = module.name.split(".")
    if module.path.name != "__init__.py":
        package = package[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def load_modules(package: Path) -> dict[str, Module]:
    """Every module of ``package`` with its classes and the names it imports from elsewhere."""
    modules = {}
    for path in sorted(package.rglob("*.py")):
        module = Module(path, _module_name(path, package), ast.parse(path.read_text(encoding="utf-8")))
        module.classes = {n.name: n for n in module.tree.body if isinstance(n, ast.ClassDef)}
        modules[module.name] = module
    for module in modules.values():
        for node in ast.walk(module.tree):
            if isinstance(node, ast.ImportFrom):
                source = _absolute(module, node)
                for alias in node.names:
                    module.imported[alias.asname or alias.name] = (source, alias.name)
    return modules


class Classes:
    """Resolves a class's base classes to the ClassDefs zotune defines (others are left out)."""

    def __init__(self, modules: dict[str, Module]):
        self.modules = modules
        self.by_name: dict[str, list[tuple[Module, ast.ClassDef]]] = {}
        for module in modules.values():
            for name, cls in module.classes.items():
                self.by_name.setdefault(name, []).append((module, cls))

    def find(self, module: Module, name: str, seen: frozenset = frozenset()) -> tuple[Module, ast.ClassDef] | None:
        """The class ``name`` means in ``module``: its own, an imported one (re-exports followed), or the
        only zotune class of that name."""
        if name in module.classes:
            return module, module.classes[name]
        if name in module.imported and (module.name, name) not in seen:
            source, original = module.imported[name]
            if source in self.modules:
                return self.find(self.modules[source], original, seen | {(module.name, name)})
            return None  # torch, transformers, peft...
        candidates = self.by_name.get(name, [])
        return candidates[0] if len(candidates) == 1 else None

    def bases(self, module: Module, cls: ast.ClassDef) -> list[tuple[Module, ast.ClassDef]]:
        """Every zotune base class of ``cls``, transitively, nearest first."""
        out: list[tuple[Module, ast.ClassDef]] = []
        todo = [(module, cls)]
        while todo:
            mod, current = todo.pop(0)
            for base in current.bases:
                if not isinstance(base, ast.Name):
                    continue  # torch.optim.Optimizer and the like: not zotune's
                found = self.find(mod, base.id)
                if found is not None and all(found[1] is not c for _, c in out):
                    out.append(found)
                    todo.append(found)
        return out

    def inherits_docstring(self, module: Module, cls: ast.ClassDef, method: str) -> bool:
        """Whether a zotune base class of ``cls`` documents a method called ``method``."""
        for _, base in self.bases(module, cls):
            for node in base.body:
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == method:
                    if ast.get_docstring(node):
                        return True
        return False


def undocumented(package: Path = PACKAGE) -> list[str]:
    """``path:line name`` of every public definition of ``package`` without a docstring."""
    modules = load_modules(package)
    classes = Classes(modules)
    missing = []

    def visit(module: Module, node: ast.AST, owner: ast.ClassDef | None, prefix: str) -> None:
        for n in ast.iter_child_nodes(node):
            if not isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) or n.name.startswith("_"):
                continue
            if not ast.get_docstring(n):
                is_method = owner is not None and not isinstance(n, ast.ClassDef)
                if not (is_method and classes.inherits_docstring(module, owner, n.name)):
                    missing.append(f"{module.path.relative_to(package.parents[1])}:{n.lineno} {prefix}{n.name}")
            if isinstance(n, ast.ClassDef):
                visit(module, n, n, f"{prefix}{n.name}.")

    for module in modules.values():
        visit(module, module.tree, None, "")
    return missing


def test_every_public_definition_has_a_docstring():
    missing = undocumented()
    assert not missing, f"{len(missing)} public definitions without a docstring:\n" + "\n".join(missing)


def test_an_override_inherits_its_base_docstring(tmp_path):
    """The checker itself: an override of a documented base method (imported, across modules, two
    levels up) passes; an undocumented override, a new method and a class without docstring do not."""
    pkg = tmp_path / "zotune"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text('"""Package."""\n')
    (pkg / "sub" / "__init__.py").write_text('"""Sub."""\n')
    (pkg / "base.py").write_text(
        'class Base:\n    """Base."""\n\n    def step(self):\n        """Documented."""\n\n'
        "    def bare(self):\n        pass\n"
    )
    (pkg / "sub" / "mid.py").write_text(
        'from ..base import Base\n\n\nclass Mid(Base):\n    """Mid."""\n'
    )
    (pkg / "sub" / "leaf.py").write_text(
        "from .mid import Mid as M\n\n\nclass Leaf(M):\n    def step(self):\n        pass\n\n"
        "    def bare(self):\n        pass\n\n    def new(self):\n        pass\n\n"
        "    def _private(self):\n        pass\n"
    )
    found = {line.split(" ", 1)[1] for line in undocumented(pkg)}
    assert found == {"Base.bare", "Leaf", "Leaf.bare", "Leaf.new"}


def _citations(path: Path) -> list[tuple[int, str]]:
    """``(line, cited path)`` of every mention of contract.md in the file's comments and strings
    (docstrings included)."""
    out = []
    for tok in tokenize.generate_tokens(io.StringIO(path.read_text(encoding="utf-8")).readline):
        if tok.type in (tokenize.COMMENT, tokenize.STRING):
            for match in CONTRACT_CITATION.finditer(tok.string):
                out.append((tok.start[0] + tok.string[: match.start()].count("\n"), match.group(1)))
    return out


def test_contract_citations_point_to_a_file():
    cited = [(path, line, target) for path in sorted(PACKAGE.rglob("*.py")) for line, target in _citations(path)]
    assert cited, "no docstring or comment cites docs/contract.md any more: drop this test or the pattern"
    broken = [f"{path.relative_to(ROOT)}:{line} cites {target}, which does not exist (the contract: docs/contract.md)"
              for path, line, target in cited if not (ROOT / target).is_file()]
    assert not broken, "\n".join(broken)
