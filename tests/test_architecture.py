"""The package's shape: imports go one way, modules stay readable, library internals stay in adapters."""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

PACKAGE = Path(__file__).resolve().parents[1] / "autocompress"
MAX_LINES = 450
# Modules that exist to hold the workarounds for a library's missing public API (named in each).
ADAPTERS = {"autocompress.search._optuna_storage", "autocompress.search._ray_session",
            "autocompress.compress._tp_ops"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imported(name: str, path: Path, known: set[str]) -> set[str]:
    """Every autocompress module ``name`` imports, at module level or inside functions."""
    out: set[str] = set()
    is_pkg = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text())):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = name.split(".") if is_pkg else name.split(".")[:-1]
                pkg = pkg[: len(pkg) - node.level + 1]
                base = ".".join(pkg + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def import_graph() -> nx.DiGraph:
    mods = modules()
    g = nx.DiGraph()
    g.add_nodes_from(mods)
    for name, path in mods.items():
        for target in imported(name, path, set(mods)):
            g.add_edge(name, target)
    return g


def test_no_import_cycles_counting_imports_inside_functions() -> None:
    cycles = list(nx.simple_cycles(import_graph()))
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c + c[:1]) for c in cycles[:10])


def test_no_module_is_past_the_size_limit() -> None:
    long = {n: len(p.read_text().splitlines()) for n, p in modules().items()}
    assert not {n: k for n, k in long.items() if k > MAX_LINES}, sorted(long.items(), key=lambda kv: -kv[1])[:5]


def our_private_names() -> set[str]:
    """Private names our own code defines: functions, classes, ``self._x`` attributes and ``_x:`` fields."""
    names: set[str] = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) and \
                    isinstance(node.value, ast.Name) and node.value.id == "self":
                names.add(node.attr)
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                names.add(node.target.id)
    return {n for n in names if n.startswith("_")}


def private_reaches(path: Path, ours: set[str]) -> list[str]:
    """``x._name`` that our code does not define, and ``from lib._private import``: another library's internals.
    A subclass's ``self._name`` is its base class's protected API and is allowed."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            base = node.value
            if node.attr not in ours and not (isinstance(base, ast.Name) and base.id in ("self", "cls")):
                found.append(f"{path.name}:{node.lineno} .{node.attr}")
        elif isinstance(node, ast.ImportFrom) and node.module and not node.module.startswith("autocompress"):
            if any(p.startswith("_") and not p.startswith("__") for p in node.module.split(".")) or \
                    any(a.name.startswith("_") for a in node.names):
                found.append(f"{path.name}:{node.lineno} from {node.module}")
    return found


def test_library_internals_are_reached_only_from_adapter_modules() -> None:
    ours = our_private_names() | {p.stem for p in PACKAGE.rglob("_*.py")}  # and our private modules
    bad = []
    for name, path in modules().items():
        if name not in ADAPTERS:
            bad += private_reaches(path, ours)
    assert not bad, bad
