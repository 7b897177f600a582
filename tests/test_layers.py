"""The engine's layers, enforced: every import (function-local ones included) goes downward.

    core ← arch ← measure ← prune ← formats ← api ← dev ← cli      (app/ and pages/: api and core only)

A module may import its own layer and the layers below it, never one above, and the import graph has
no cycle. A function-local import of an engine module hides the graph from a reader, so each one says
why it is local on its line (``# lazy: …``: an optional extra, or a measured start-up cost).
"""
from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

LAYERS = ["core", "arch", "measure", "prune", "formats", "api", "dev", "cli"]
#: What the studio may import from the engine: the use cases and the types they take and return.
UI_ALLOWED = ("shedder.api", "shedder.core")
UI_MAX_MODULES = 5

def _modules() -> dict[str, Path]:
    mods = {}
    for top in ("shedder", "app", "pages"):
        for path in sorted((REPO_ROOT / top).rglob("*.py")):
            name = ".".join(path.relative_to(REPO_ROOT).with_suffix("").parts)
            mods[name.removesuffix(".__init__")] = path
    return mods


MODULES = _modules()


def _target(module: str, node: ast.ImportFrom | ast.Import) -> list[str]:
    """The engine modules an import statement names (``from shedder.x import y`` names
    ``shedder.x.y`` when that is a module, else ``shedder.x``)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:
            package = module.split(".")
            if not MODULES[module].name == "__init__.py":
                package = package[:-1]
            base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
        names = [f"{base}.{a.name}" for a in node.names] or [base]
        names = [n if n in MODULES else base for n in names]
    found = []
    for name in names:
        while name and name not in MODULES:
            name = name.rpartition(".")[0]
        if name and name != module:
            found.append(name)
    return found


def _imports() -> list[tuple[str, str, bool, str]]:
    """(importer, imported, function-local?, source line) for every engine import."""
    rows = []
    for module, path in MODULES.items():
        source = path.read_text(encoding="utf-8")
        lines = source.splitlines()
        tree = ast.parse(source)
        top = {id(n) for n in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                local = id(node) not in top and not _in_type_checking(tree, node)
                for target in _target(module, node):
                    rows.append((module, target, local, lines[node.lineno - 1]))
    return rows


def _in_type_checking(tree: ast.Module, node) -> bool:
    for block in tree.body:
        if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test):
            if any(n is node for n in ast.walk(block)):
                return True
    return False


def layer(module: str) -> int | None:
    parts = module.split(".")
    if parts[0] != "shedder":
        return None
    if len(parts) == 1 or parts[1] == "__main__":
        return LAYERS.index("cli") if len(parts) > 1 else 0
    return LAYERS.index(parts[1]) if parts[1] in LAYERS else None


IMPORTS = _imports()


def test_every_engine_module_is_in_a_layer():
    assert [m for m in MODULES if m.startswith("shedder") and layer(m) is None] == []


def test_imports_go_downward():
    upward = {(a, b) for a, b, _, _ in IMPORTS
              if layer(a) is not None and layer(b) is not None and layer(b) > layer(a)}
    assert upward == set()


def test_no_import_cycle():
    edges = defaultdict(set)
    for a, b, _, _ in IMPORTS:
        edges[a].add(b)
    cycles = _cycles(edges)
    assert cycles == []


def test_function_local_imports_say_why():
    unmarked = {(a, b) for a, b, local, line in IMPORTS
                if local and b.startswith("shedder") and "# lazy:" not in line}
    assert unmarked == set()


def test_the_studio_imports_only_the_use_cases_and_core_types():
    used = {b for a, b, _, _ in IMPORTS if a.split(".")[0] in ("app", "pages") and b.startswith("shedder")}
    assert {m for m in used if not m.startswith(UI_ALLOWED)} == set()
    assert len(used) <= UI_MAX_MODULES, sorted(used)


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_no_engine_module_is_over_500_lines():
    long = {m: n for m, path in MODULES.items() if m.startswith("shedder")
            and (n := len(path.read_text(encoding="utf-8").splitlines())) > 500}
    assert long == {}
