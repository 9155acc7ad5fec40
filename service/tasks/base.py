"""What a task contributes to the service: its manifest check, its routes (built by the adapters
in service/routes over its pipelines), and optionally a /v2 image view."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic

import numpy as np
from fastapi import APIRouter

from service.manifest import Manifest
from service.pipeline import A, ImagePipeline


@dataclass(frozen=True)
class TensorView(Generic[A]):
    """A task's /v2 image view: encoded images in (a BYTES input `image`), its pipeline's answer
    out as named tensors."""

    pipeline: ImagePipeline[Any, A]
    outputs: list[dict[str, Any]]  # the protocol's metadata of each output: name, datatype, shape
    tensors: Callable[[A], dict[str, np.ndarray]]


@dataclass(frozen=True)
class Task:
    name: str  # the manifest's `task`
    # raises ValueError when a manifest (already valid in general) does not suit this task
    check_manifest: Callable[[Manifest], None]
    router: APIRouter
    view: TensorView[Any] | None = None
