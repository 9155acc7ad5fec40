"""What a task declares: the manifests it serves, its routes (each a pipeline and its answer), and
optionally a /v2 image view. The adapters build every HTTP route from these declarations
(service/routes/v1.py, service/routes/v2.py); a task imports no web framework and no adapter."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic

import numpy as np
from pydantic import BaseModel

from service.manifest import Manifest
from service.pipeline import A, ImagePipeline, StreamPipeline


@dataclass(frozen=True)
class ImageView(Generic[A]):
    """A task's /v2 image view: encoded images in (a BYTES input `image`), its pipeline's answer
    out as named tensors."""

    pipeline: ImagePipeline[Any, A]
    outputs: list[dict[str, Any]]  # the protocol's metadata of each output: name, datatype, shape
    tensors: Callable[[A], dict[str, np.ndarray]]


@dataclass(frozen=True)
class Route:
    """`POST path` on /v1, running `pipeline`. Its images come as uploads (multipart `file` fields,
    a raw image body, or JSON `{"images": [...]}`, options in the query string or the body), or,
    where `image_field` is set, as base64 in that field of a JSON body that holds the options."""

    path: str
    pipeline: ImagePipeline[Any, Any] | StreamPipeline[Any, Any, Any]
    answer: type[BaseModel]
    description: str
    image_field: str | None = None
    # the answer as raw bytes and the headers that describe them, for `Accept: application/octet-stream`
    binary: Callable[[Any], tuple[bytes, dict[str, str]]] | None = None


@dataclass(frozen=True)
class Task:
    name: str  # the manifest's `task`
    # raises ValueError when a manifest (already valid in general) does not suit this task
    check_manifest: Callable[[Manifest], None]
    routes: tuple[Route, ...]
    view: ImageView[Any] | None = None
