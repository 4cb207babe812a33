"""The package's floors: a module imports only from its own floor or lower ones, and no files import each other.

Every `import` statement counts, also those inside functions (a lazy import is still a dependency). The floors
are documented in docs/ARCHITECTURE.md; this test is their definition.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "edgedeploy"

# Low -> high. A top-level module is named by its file, a room by its folder.
FLOORS: tuple[tuple[str, ...], ...] = (
    ("errors", "io", "options", "version"),
    ("data",),
    ("models",),
    ("runtime",),
    ("eval",),
    ("train",),
    ("engines",),
    ("export",),
    ("benchmarks",),
    ("__init__", "cli", "demo", "doctor"),
)
FLOOR_OF = {name: i for i, names in enumerate(FLOORS) for name in names}


def _modules(package: Path) -> dict[str, Path]:
    mods = {}
    for path in package.rglob("*.py"):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


def _owner(name: str, mods: dict[str, Path]) -> str:
    """The module `name` is found in (a name imported from a module resolves to that module)."""
    while name not in mods:
        name = name.rpartition(".")[0]
    return name


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """module -> the package's modules it imports (anywhere in the file)."""
    mods = _modules(package)
    graph: dict[str, set[str]] = {}
    for mod, path in mods.items():
        is_pkg = path.name == "__init__.py"
        here = mod.split(".") if is_pkg else mod.split(".")[:-1]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(here[: len(here) - node.level + 1] + ([base] if base else []))
                names = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            else:
                continue
            targets |= {_owner(n, mods) for n in names if n.split(".")[0] == package.name}
        targets.discard(mod)
        graph[mod] = targets
    return graph


def floor(mod: str) -> int:
    parts = mod.split(".")
    key = parts[1] if len(parts) > 1 else "__init__"
    if key not in FLOOR_OF:
        raise AssertionError(f"{mod}: its room or file {key!r} has no floor; add it to FLOORS and docs/ARCHITECTURE.md")
    return FLOOR_OF[key]


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{m} (floor {floor(m)}) imports {t} (floor {floor(t)})"
                  for m, ts in graph.items() for t in ts if floor(t) > floor(m))


def import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                circles.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return circles


def test_every_module_has_a_floor():
    for mod in import_graph():
        floor(mod)


def test_no_module_imports_from_a_higher_floor():
    assert upward_imports(import_graph()) == []


def test_no_import_circles():
    assert import_circles(import_graph()) == []


@pytest.mark.parametrize("planted, expect", [
    ({"a.py": "", "data/__init__.py": "", "data/x.py": "from pkgx.export.y import f\n",
      "export/__init__.py": "", "export/y.py": "def f(): pass\n"}, "upward"),
    ({"a.py": "", "data/__init__.py": "", "data/x.py": "def g():\n    from pkgx.data import y\n",
      "data/y.py": "from pkgx.data.x import g\n"}, "circle"),
])
def test_the_checks_catch_planted_violations(tmp_path, planted, expect):
    pkg = tmp_path / "pkgx"
    for rel, text in {"__init__.py": "", **planted}.items():
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text(text)
    graph = import_graph(pkg)
    graph.pop("pkgx.a")
    if expect == "upward":
        assert upward_imports(graph) == ["pkgx.data.x (floor 1) imports pkgx.export.y (floor 7)"]
        assert import_circles(graph) == []
    else:
        assert import_circles(graph) == [["pkgx.data.x", "pkgx.data.y"]]
        assert upward_imports(graph) == []
