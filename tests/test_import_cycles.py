"""No import cycles inside the packages (docs/architecture.md, Layers), lazy imports included.

The graph is read from the source with ``ast``: an edge for every ``import`` of a module
of the same package, at any depth of the file (an import inside a function still ties
the two modules together). ``from pkg import name`` counts as importing ``pkg.name`` when
that is a module, else ``pkg`` itself.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("mpo_core", "server")


def module_files() -> dict[str, Path]:
    modules: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def imports_of(module: str, path: Path, known: set[str]) -> set[str]:
    is_package = path.name == "__init__.py"
    package = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
            # ``from pkg import module`` names the module; else the import is of ``pkg``.
            named = [t for t in targets[:-1] if t in known]
            targets = named if len(named) == len(node.names) else [*named, base]
        else:
            continue
        for target in targets:
            while target and target not in known:  # ``import a.b.c``: the longest known
                target = target.rpartition(".")[0]
            if target and target != module:
                found.add(target)
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path ``[a, b, ..., a]``, or None (depth-first search, three colours)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def package_graph() -> dict[str, set[str]]:
    files = module_files()
    known = set(files)
    return {name: imports_of(name, path, known) for name, path in files.items()}


def test_the_cycle_finder_finds_cycles() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_the_graph_sees_relative_and_lazy_imports() -> None:
    graph = package_graph()
    assert "server.store.base" in graph["server.store.sqlite"]  # from .base import ...
    assert "server.store.postgres" in graph["server.store"]  # lazy, inside open_store
    assert "mpo_core.decoding.mixing" in graph["server.protocol.common"]


def test_no_import_cycles() -> None:
    assert find_cycle(package_graph()) is None


def absolute_imports(path: Path) -> set[str]:
    """The top-level names of every absolute import in a file (at any depth)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name.partition(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            found.add(node.module.partition(".")[0])
    return found


def test_the_core_never_imports_the_web_layer() -> None:
    """Arrows run one way: ``server`` uses ``mpo_core``, never the reverse (nor the web
    framework), so the engine runs in scripts and tests without a web stack."""
    web = {"server", "fastapi", "starlette", "uvicorn"}
    offenders = {
        str(path.relative_to(REPO)): sorted(absolute_imports(path) & web)
        for name, path in module_files().items()
        if name.startswith("mpo_core") and absolute_imports(path) & web
    }
    assert offenders == {}
    server_app = absolute_imports(REPO / "server" / "app.py")
    assert {"fastapi", "mpo_core"} <= server_app  # the collector sees absolute imports
