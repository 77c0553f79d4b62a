"""The import graph of `dfj`, read from the source (every import statement, at module level or inside a
function): no cycles, and the core never imports the tiny judges (`dfj.tiny`)."""

from __future__ import annotations

import ast
from pathlib import Path

import dfj

PACKAGE = Path(dfj.__file__).parent
# `dfj demo`, and the benchmarks that build their own judges: the only modules outside dfj.tiny that use it.
TINY_USERS = {"dfj.demo", "dfj.bench.speed", "dfj.bench.memory", "dfj.bench.serve", "dfj.bench.distributed"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """{module: the dfj modules it imports}. `from a import b` names module a.b where b is one, else a."""
    modules = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                edges.update(alias.name for alias in node.names if alias.name.split(".")[0] == "dfj")
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "dfj" and not node.level:
                for alias in node.names:
                    edges.add(f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module)
        unknown = edges - set(modules)
        assert not unknown, f"{name} imports modules that do not exist: {unknown}"
        graph[name] = edges - {name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_dfj_has_no_import_cycles():
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_core_never_imports_the_tiny_judges():
    graph = import_graph()
    users = {name for name, edges in graph.items()
             if not name.startswith("dfj.tiny") and any(e == "dfj.tiny" or e.startswith("dfj.tiny.") for e in edges)}
    assert users <= TINY_USERS, users - TINY_USERS
    tiny_needs = {e for name, edges in graph.items() if name.startswith("dfj.tiny") for e in edges}
    assert not tiny_needs & TINY_USERS, "dfj.tiny depends on a module that uses it"


def test_the_readme_module_table_names_every_module_and_only_real_ones():
    import re

    readme = (PACKAGE.parent / "README.md").read_text(encoding="utf-8")
    table = readme[readme.index("## What is here"):readme.index("## Python API")]
    named = set(re.findall(r"`(dfj/[^`]*)`", table))
    assert named and all((PACKAGE.parent / path).exists() for path in named), [p for p in named if not (PACKAGE.parent / p).exists()]
    folders = [path for path in named if path.endswith("/")]
    modules = [path.relative_to(PACKAGE.parent).as_posix() for path in PACKAGE.rglob("*.py") if path.name != "__init__.py"]
    unlisted = [m for m in modules if m not in named and not any(m.startswith(folder) for folder in folders)]
    assert not unlisted, unlisted
