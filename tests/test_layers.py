"""The layers of ARCHITECTURE.md, checked on the source: who may import whom, and no import cycle.

Imports are read with `ast` from every module of the product packages, function-level imports
included (an import hidden in a function is still a dependency)."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

from tasks.stages import STAGES
from tests.support.paths import REPO

PACKAGES = ("flows", "tasks", "models", "parallel", "data_schemas", "configs")
STAGE_PACKAGES = {spec.class_path.split(":")[0].rsplit(".", 1)[0] for spec in STAGES}
LIBRARIES = ("tasks.media", "tasks.grading", "tasks.training", "tasks.report", "tasks.samples", "tasks.publish")


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((REPO / pkg).rglob("*.py"))}


def imports_of(path: Path, name: str, modules: dict[str, Path]) -> set[str]:
    """Project modules `path` imports: `from a.b import c` counts as `a.b.c` when that is a module, else `a.b`."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        found.update(t for t in targets if t.split(".")[0] in PACKAGES or t.split(".")[0] == "prefect")
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imports_of(path, name, modules) for name, path in modules.items()}


def within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def violations(graph: dict[str, set[str]], importer: str, forbidden) -> list[str]:
    return sorted(f"{src} imports {dst}" for src, dsts in graph.items() if within(src, importer) for dst in dsts if forbidden(dst))


def test_engine_imports_nothing_of_tasks_outside_itself(graph):
    assert not violations(graph, "tasks.engine", lambda m: within(m, "tasks") and not within(m, "tasks.engine") or within(m, "flows"))


def test_stage_packages_never_import_each_other(graph):
    assert len(STAGE_PACKAGES) == len(STAGES)
    bad = []
    for package in STAGE_PACKAGES:
        bad += violations(graph, package, lambda m, own=package: any(within(m, p) for p in STAGE_PACKAGES - {own}))
    assert not bad


def test_libraries_and_the_stage_list_import_no_stage(graph):
    bad = []
    for library in (*LIBRARIES, "tasks.stages", "tasks.config"):
        bad += violations(graph, library, lambda m: any(within(m, p) for p in STAGE_PACKAGES))
    assert not bad


@pytest.mark.parametrize("package", ["models", "parallel", "data_schemas"])
def test_lower_layers_import_neither_tasks_nor_flows(graph, package):
    assert not violations(graph, package, lambda m: within(m, "tasks") or within(m, "flows"))


def test_prefect_only_in_flows(graph):
    bad = [f"{src} imports {dst}" for src, dsts in graph.items() if not within(src, "flows") for dst in dsts if within(dst, "prefect")]
    assert not bad


def cycles_in(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components of more than one module (or a module importing itself)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in graph:
                continue
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph.get(node, ()):
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def test_no_import_cycle(graph):
    assert not cycles_in(graph)


def test_cycle_finder_finds_cycles():
    assert cycles_in({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles_in({"a": {"a"}}) == [["a"]]
    assert cycles_in({"a": {"b"}, "b": set()}) == []


def test_the_checks_see_real_edges(graph):
    """The parser finds imports (absolute, relative, function-level), so the checks above can fail."""
    assert "tasks.engine.store" in graph["tasks.engine.run"]
    assert "tasks.engine.stage" in graph["tasks.clip.stage"]
    assert "prefect" in graph["flows.pipeline"]
    assert "models.tiny" in graph["flows.cli"]  # imported inside a function


@pytest.mark.parametrize("package", PACKAGES)
def test_packages_resolve_to_this_checkout(package):
    """The card's top-level names are generic (`models`, `tasks`): an installed package of the same
    name elsewhere must never shadow ours."""
    module = importlib.import_module(package)
    assert Path(module.__file__).resolve().parent == REPO / package
