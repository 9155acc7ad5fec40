"""The service's layering, checked on its source with `ast` (nothing is imported): no import cycles,
a leaf request context, no torch, adapters that know no task by name, metrics in one module."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SERVICE = Path(__file__).resolve().parents[2] / "service"
ROOT = SERVICE.parent
Graph = dict[str, set[str]]


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(package: Path = SERVICE) -> dict[str, Path]:
    return {module_name(path, package.parent): path for path in sorted(package.rglob("*.py"))}


def imported(source: str, name: str, known: set[str], is_package: bool = False) -> set[str]:
    """Every module `source` (module `name`) imports, wherever the import stands (top level, under
    `if TYPE_CHECKING:`, inside functions). `from a.b import c` is a.b.c when that is a known module,
    else a.b; relative imports are resolved against `name`."""
    found: set[str] = set()
    package = name if is_package else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                origin = ".".join([*base, node.module] if node.module else base)
            else:
                origin = node.module or ""
            for alias in node.names:
                found.add(f"{origin}.{alias.name}" if f"{origin}.{alias.name}" in known else origin)
    return found


def import_graph(package: Path = SERVICE) -> Graph:
    """module -> the modules of the same package it imports."""
    files = modules(package)
    known = set(files)
    return {
        name: {m for m in imported(path.read_text(), name, known, path.name == "__init__.py") if m in known}
        for name, path in files.items()
    }


def find_cycle(graph: Graph) -> list[str] | None:
    """One cycle as a path [a, b, ..., a], or None when the graph has none (depth-first search)."""
    state: dict[str, str] = {}  # "open" while on the stack, "done" after
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for child in sorted(graph.get(node, ())):
            if state.get(child) == "open":
                return [*stack[stack.index(child) :], child]
            if child not in state and (cycle := visit(child)):
                return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def imports_of(name: str) -> set[str]:
    """Every module (of any package) the service module `name` imports."""
    files = modules()
    path = files[name]
    return imported(path.read_text(), name, set(files), path.name == "__init__.py")


# the checkers, checked -----------------------------------------------------------------------------


def test_cycle_finder_finds_and_reports_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"a"}}) == ["a", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set(), "d": {"a"}}) is None


def test_import_resolution_counts_every_kind_of_import() -> None:
    known = {"service", "service.x", "service.x.y", "service.context", "service.routes", "service.routes.v1"}
    source = """
from __future__ import annotations
from typing import TYPE_CHECKING
import numpy as np
from service.x import y, helper
from service import context
from . import v1
if TYPE_CHECKING:
    from service.routes.v1 import image_route
def later():
    import torch.nn
"""
    found = imported(source, "service.routes.v2", known)
    assert found >= {"service.x.y", "service.x", "service.context", "service.routes.v1", "torch.nn", "numpy"}
    assert "service.x.helper" not in found and "service" not in found  # names, not modules


def test_the_graph_sees_the_service() -> None:
    graph = import_graph()
    assert {"service.app", "service.context", "service.pipeline", "service.tasks.classify"} <= set(graph)
    assert "service.pipeline" in graph["service.tasks.classify"]
    assert "service.context" in graph["service.pipeline"]


# the rules -----------------------------------------------------------------------------------------


def test_no_import_cycles() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_context_is_a_leaf() -> None:
    own = {m for m in imports_of("service.context") if m == "service" or m.startswith("service.")}
    assert own == set(), f"service/context.py imports {sorted(own)}"


@pytest.mark.parametrize("name", sorted(modules()))
def test_no_torch_or_transformers(name: str) -> None:
    heavy = {m for m in imports_of(name) if m.split(".")[0] in ("torch", "transformers")}
    assert heavy == set(), f"{name} imports {sorted(heavy)}"


def task_modules() -> set[str]:
    return {name for name in modules() if name.startswith("service.tasks.") and name != "service.tasks.base"}


@pytest.mark.parametrize("adapter", ["service.routes.v1", "service.routes.v2"])
def test_adapters_know_no_task_by_name(adapter: str) -> None:
    assert {"service.tasks.classify", "service.tasks.detect", "service.tasks.generate"} <= task_modules()
    known = imports_of(adapter) & task_modules()
    assert known == set(), f"{adapter} imports task modules {sorted(known)}: adapters see tasks via base and TASKS"


def test_only_the_metrics_module_and_the_app_know_prometheus() -> None:
    allowed = {SERVICE / "metrics.py", SERVICE / "app.py"}
    mentions = sorted(
        str(path.relative_to(ROOT)) for path in SERVICE.rglob("*.py")
        if path not in allowed and "prometheus_client" in path.read_text()
    )  # fmt: skip
    assert mentions == [], f"prometheus_client outside service/metrics.py and service/app.py: {mentions}"


# The layers (../shared/architecture.json draws them): the core and its leaves know no web framework;
# a task is declarations over the core and never imports an adapter (export: test_architecture_export.py).
WEB_FRAMEWORKS = ("fastapi", "starlette", "uvicorn")
ADAPTERS = ("service.app", "service.routes", "service.inputs", "service.deps", "service.error_responses",
            "service.http_limits", "service.connections", "service.observe", "service.auth", "service.codec",
            "service.server", "service.workers", "service.__main__")  # fmt: skip
CORE = ("service.manifest", "service.imaging", "service.runtime", "service.repository", "service.batching",
        "service.sampling", "service.attention", "service.budget", "service.pipeline", "service.outputs",
        "service.context", "service.settings", "service.errors", "service.text", "service.memory",
        "service.metrics", "service.logs", "service.schemas", "service.ratelimit")  # fmt: skip


def web_imports(found: set[str]) -> list[str]:
    return sorted(m for m in found if m.split(".")[0] in WEB_FRAMEWORKS or m.startswith(ADAPTERS))


@pytest.mark.parametrize("name", CORE)
def test_the_core_knows_no_web_framework(name: str) -> None:
    assert web_imports(imports_of(name)) == [], f"{name} imports {web_imports(imports_of(name))}"


@pytest.mark.parametrize("name", sorted(n for n in modules() if n.startswith("service.tasks")))
def test_a_task_imports_no_adapter_and_no_web_framework(name: str) -> None:
    assert web_imports(imports_of(name)) == [], f"{name} imports {web_imports(imports_of(name))}"


def test_the_rules_catch_a_task_that_imports_a_route() -> None:
    source = "from service.routes.v1 import task_router\nfrom fastapi import APIRouter\n"
    assert web_imports(imported(source, "service.tasks.x", set(modules()))) == ["fastapi", "service.routes.v1"]
