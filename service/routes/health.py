"""Liveness and readiness, for load balancers and orchestrators."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, Field

from service.deps import RegistryDep
from service.metrics import EXPOSITION_TYPE

router = APIRouter(tags=["health"])


class ModelStatus(BaseModel):
    state: Literal["ready", "failed"]
    reason: str | None = None
    versions: list[int] = Field([], description="the versions serving, highest (the default) first")
    failed_versions: dict[int, str] = Field(
        {}, description="versions whose last load failed, and why (those serving before serve on)"
    )
    failed_graphs: dict[str, str] = Field({}, description="optional graphs that did not load, and why")


class Readiness(BaseModel):
    ready: bool
    draining: bool = False
    reason: str | None = Field(None, description="why no model can serve (no repository, or an empty one)")
    models: dict[str, ModelStatus]


@router.get("/metrics", response_class=Response, responses={200: {"content": {EXPOSITION_TYPE: {}}}})
async def metrics(request: Request) -> Response:
    """Prometheus metrics: requests by route, model and status; stage latencies by model and provider;
    batch sizes; queue depth; model load time and readiness; rejections by reason."""
    body, content_type = request.app.state.metrics.exposition()
    return Response(body, media_type=content_type)


@router.get("/health/live")
async def live() -> dict[str, str]:
    """The process answers. Says nothing about the models."""
    return {"status": "live"}


@router.get("/health/ready", responses={503: {"model": Readiness, "description": "some model is not ready"}})
async def ready(request: Request, registry: RegistryDep, response: Response) -> Readiness:
    """200 when every model in the repository is loaded and warmed up; else 503 with each model's
    state (a model added after start that fails to load is listed, but leaves readiness alone: see
    docs/lifecycle.md). 503 too from the moment a SIGTERM asks the server to drain."""
    models = {
        name: ModelStatus(state=m.state, reason=m.reason or entry.reason, failed_graphs=m.failed_graphs,
                          versions=sorted(entry.versions, reverse=True),
                          failed_versions={v: f.reason or "" for v, f in entry.failures.items()})
        for name, entry in registry.entries.items() if (m := entry.shown())
    }  # fmt: skip
    draining = bool(request.app.state.draining)
    ready = registry.ready and not draining
    if not ready:
        response.status_code = 503
    return Readiness(ready=ready, draining=draining, reason=registry.reason, models=models)
