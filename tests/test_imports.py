"""The import graph of `dfj`, read from the source (every import statement, at module level or inside a
function): no cycles between modules nor between the product's parts (its subpackages), and the core
never imports the tiny judges (`dfj.tiny`) nor the benchmarks."""

from __future__ import annotations

import ast
from pathlib import Path

import dfj

PACKAGE = Path(dfj.__file__).parent
# `dfj demo` (and the command line that runs it): the only modules outside dfj.tiny that use it.
TINY_USERS = {"dfj.demo", "dfj.cli"}


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


def part_of(module: str) -> str:
    """The product part a module belongs to: its subpackage (dfj.export, dfj.runtime, …), or the module
    itself for a top-level one (dfj.judge, dfj.manifest, …)."""
    parts = module.split(".")
    return ".".join(parts[:2])


def part_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    parts: dict[str, set[str]] = {}
    for name, edges in graph.items():
        parts.setdefault(part_of(name), set()).update(part_of(e) for e in edges)
    return {part: edges - {part} for part, edges in parts.items()}


def test_the_products_parts_have_no_import_cycle():
    """Export, quant, runtime, bench, serve, …: each part imports parts below it, never one that imports
    it back (dfj.pipeline composes export and quant; dfj.artifact is what both share)."""
    parts = part_graph(import_graph())
    assert cycles(parts) == []
    assert "dfj.quant" not in parts["dfj.export"] and "dfj.export" not in parts["dfj.quant"]
    assert not parts["dfj.artifact"] & {"dfj.export", "dfj.quant", "dfj.pipeline"}


def test_a_package_level_cycle_is_found_through_modules_that_do_not_cycle():
    graph = {"dfj.export": {"dfj.quant.gguf"}, "dfj.export.gguf": set(), "dfj.quant.gguf": {"dfj.export.gguf"}}
    assert cycles(graph) == [] and cycles(part_graph(graph)) == [["dfj.export", "dfj.quant"]]


def test_the_package_never_imports_the_benchmarks():
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        names = [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
        names += [node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module]
        assert not [n for n in names if n.split(".")[0] == "benchmarks"], path


def test_the_core_never_imports_the_tiny_judges():
    graph = import_graph()
    users = {name for name, edges in graph.items()
             if not name.startswith("dfj.tiny") and any(e == "dfj.tiny" or e.startswith("dfj.tiny.") for e in edges)}
    assert users <= TINY_USERS, users - TINY_USERS
    tiny_needs = {e for name, edges in graph.items() if name.startswith("dfj.tiny") for e in edges}
    assert not tiny_needs & TINY_USERS, "dfj.tiny depends on a module that uses it"


def test_the_design_docs_module_table_names_every_module_and_only_real_ones():
    import re

    design = (PACKAGE.parent / "docs" / "design.md").read_text(encoding="utf-8")
    table = design[design.index("## Where things are"):design.index("## The judging path")]
    named = set(re.findall(r"`(dfj/[^`]*)`", table)) | {f"dfj/{folder}{name}" for folder, names in re.findall(
        r"`dfj/([a-z_/]+/)` \(([^)]*)\)", table) for name in re.findall(r"`([a-z_]+\.py)`", names)}
    assert named and all((PACKAGE.parent / path).exists() for path in named), [p for p in named if not (PACKAGE.parent / p).exists()]
    folders = [path for path in named if path.endswith("/")]
    modules = [path.relative_to(PACKAGE.parent).as_posix() for path in PACKAGE.rglob("*.py") if path.name != "__init__.py"]
    unlisted = [m for m in modules if m not in named and not any(m.startswith(folder) for folder in folders)]
    assert not unlisted, unlisted
