"""Export's layering, checked on its source with `ast` (nothing is imported): export/ uses the service's
core only (it names a task through the manifest), never its tasks, routes, app or web framework."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.unit.test_architecture import ROOT, SERVICE, imported, modules

EXPORT = ROOT / "export"
# the web side of the service: what export must never import
FORBIDDEN = ("service.tasks", "service.routes", "service.app", "fastapi", "starlette")
# the service's core: the model side, which imports no web framework
CORE = {
    f"service.{name}"
    for name in (
        "manifest", "imaging", "runtime", "repository", "sampling", "outputs", "settings", "budget", "context",
        "attention", "batching", "pipeline", "text", "memory", "metrics", "logs", "errors", "schemas", "text_tower",
    )
}  # fmt: skip


def export_imports(name: str, path: Path) -> set[str]:
    """Every module the export module `name` imports, resolved against the service's and export's modules."""
    known = set(modules(SERVICE)) | set(modules(EXPORT))
    return imported(path.read_text(), name, known, path.name == "__init__.py")


def forbidden(found: set[str]) -> set[str]:
    return {m for m in found if any(m == f or m.startswith(f"{f}.") for f in FORBIDDEN)}


def test_the_checker_sees_every_kind_of_forbidden_import() -> None:
    source = """
from service import tasks
from service.manifest import CLASSIFICATION
import starlette.responses
def later():
    from fastapi import FastAPI
    from service.routes.v1 import image_route
"""
    known = {"service", "service.tasks", "service.manifest", "service.routes", "service.routes.v1"}
    found = imported(source, "export.example", known)
    assert forbidden(found) == {"service.tasks", "starlette.responses", "fastapi", "service.routes.v1"}
    assert "service.manifest" not in forbidden(found)


def test_the_checker_reads_every_export_module() -> None:
    assert {"export.vit", "export.detr", "export.image_transformer", "export.families", "export.hf"} <= set(
        modules(EXPORT)
    )


@pytest.mark.parametrize("name", sorted(modules(EXPORT)))
def test_export_never_imports_the_web_side(name: str) -> None:
    found = forbidden(export_imports(name, modules(EXPORT)[name]))
    assert found == set(), f"{name} imports {sorted(found)}: export names a task through service.manifest"


@pytest.mark.parametrize("name", sorted(modules(EXPORT)))
def test_export_uses_only_the_service_core(name: str) -> None:
    service = {m for m in export_imports(name, modules(EXPORT)[name]) if m == "service" or m.startswith("service.")}
    assert service <= CORE, f"{name} imports {sorted(service - CORE)}, outside the service's core"
