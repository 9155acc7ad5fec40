"""What a task contributes to the service: its routes and its own checks on a manifest."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from fastapi import APIRouter

from service.manifest import Manifest


@dataclass(frozen=True)
class Task:
    name: str  # the manifest's `task`
    router: APIRouter
    # raises ValueError when a manifest (already valid in general) does not suit this task
    check_manifest: Callable[[Manifest], None]
