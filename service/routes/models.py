"""`GET /v1/models`: what is served, on which execution providers, and how good it is."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter
from pydantic import BaseModel, Field

from service.deps import RegistryDep
from service.repository import ServedModel
from service.schemas import Pair

router = APIRouter(tags=["models"])


class ModelInfo(BaseModel):
    name: str
    state: Literal["ready", "failed"]
    reason: str | None = None
    version: int | None = None
    default: bool = Field(False, description="the version a request that names none gets (the highest serving)")
    task: str | None = None
    tasks: list[str] = Field([], description="every task it serves: `task`, then any besides (CLIP: embedding)")
    architecture: str | None = None
    precision: str | None = Field(None, description="of the main graph: float32, float16 or int8")
    providers: list[str] = Field(description="ONNX Runtime execution providers actually in use, best first")
    labels: list[str] = []
    input_size: Pair | None = Field(None, description="(height, width) images are resized to")
    quality: dict[str, float] = {}
    data: dict[str, Any] = {}
    load_seconds: float
    resident_bytes: int | None = Field(
        None, description="what the process's resident memory grew by while loading it (sessions, weights, warm-up)"
    )
    failed_graphs: dict[str, str] = Field({}, description="optional graphs (attention) that did not load, and why")
    batch_sizes: dict[str, dict[int, int]] = Field(
        {}, description="per batched graph: images per run -> runs so far (what the dynamic batcher formed)"
    )
    max_batch_size: dict[str, int] = Field({}, description="per batched graph: the most images one run takes")
    batch_rates: dict[str, dict[int, float]] = Field(
        {}, description="where measured at start (a heavy graph on the CPU): images/s by batch size, which chose "
        "max_batch_size (the size past which doubling gains under 10%)",
    )  # fmt: skip


class ModelList(BaseModel):
    models: list[ModelInfo]


def describe(model: ServedModel) -> ModelInfo:
    info = ModelInfo(
        name=model.name,
        state=model.state,
        reason=model.reason,
        providers=model.providers,
        load_seconds=round(model.load_seconds, 3),
        resident_bytes=model.resident_bytes,
        failed_graphs=model.failed_graphs,
        batch_sizes={graph: dict(sorted(b.batch_sizes.items())) for graph, b in model.batchers.items()},
        max_batch_size={graph: b.policy.max_batch_size for graph, b in model.batchers.items()},
        batch_rates={graph: {size: round(rate, 2) for size, rate in rates.items()}
                     for graph, rates in model.batch_rates.items()},
    )  # fmt: skip
    if m := model.manifest:
        info = info.model_copy(
            update={
                "version": m.version,
                "task": m.task,
                "tasks": m.tasks,
                "architecture": m.architecture,
                "precision": m.precision,
                "labels": m.labels,
                "input_size": list(m.preprocessing.size),
                "quality": m.quality,
                "data": m.data,
            }
        )
    return info


@router.get("/v1/models")
async def list_models(registry: RegistryDep) -> ModelList:
    """Every version of every model in the repository, serving or not (with the reason)."""
    defaults = {id(m) for m in registry.models.values() if m.state == "ready"}
    return ModelList(models=[describe(m).model_copy(update={"default": id(m) in defaults}) for m in registry.served()])
