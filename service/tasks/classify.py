"""Image classification: `POST /v1/classify` -> top-k labels with softmax scores per image."""

from __future__ import annotations

from typing import Annotated

import numpy as np
from fastapi import APIRouter, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from service.deps import RegistryDep, SettingsDep
from service.inputs import IMAGE_REQUEST_BODY
from service.manifest import Manifest
from service.tasks.base import Task
from service.tasks.images import ModelOptions, run_on_images
from service.timing import json_response, timed

NAME = "classification"


class ClassifyOptions(ModelOptions):
    top_k: int = Field(5, ge=1, le=1000, description="labels per image, best first (capped at the label count)")


class Prediction(BaseModel):
    label: str
    score: float = Field(description="softmax probability")


class ClassifyResponse(BaseModel):
    model: str
    results: list[list[Prediction]] = Field(description="one list per image, in request order")

    model_config = ConfigDict(
        json_schema_extra={
            "example": {"model": "vit", "results": [[{"label": "7", "score": 0.98}, {"label": "1", "score": 0.01}]]}
        }
    )


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    probs: np.ndarray = shifted / shifted.sum(axis=-1, keepdims=True)
    return probs


def top_k(logits: np.ndarray, labels: list[str], k: int) -> list[list[Prediction]]:
    """logits `[batch, classes]` -> per image the k best labels with their probabilities."""
    probs = softmax(logits.astype(np.float64))
    k = min(k, probs.shape[-1])
    order = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
    return [[Prediction(label=labels[i], score=float(p[i])) for i in row] for p, row in zip(probs, order, strict=True)]


def check_manifest(manifest: Manifest) -> None:
    main = manifest.main
    if len(main.inputs) != 1 or len(main.inputs[0].shape) != 4:
        raise ValueError("a classification graph takes one image batch [batch, channels, height, width]")
    if main.outputs[0].shape[-1] != len(manifest.labels):
        raise ValueError(
            f"the graph gives {main.outputs[0].shape[-1]} logits but there are {len(manifest.labels)} labels"
        )


router = APIRouter(tags=["classification"])


@router.post(
    "/v1/classify",
    response_model=ClassifyResponse,
    openapi_extra=IMAGE_REQUEST_BODY,
    responses={413: {"description": "body, image or image count over a limit"}, 415: {"description": "not an image"}},
)
async def classify(
    request: Request, query: Annotated[ClassifyOptions, Query()], registry: RegistryDep, settings: SettingsDep
) -> Response:
    """Classify one or more images. Options go in the query string, or as form fields / JSON keys."""
    run = await run_on_images(request, query, registry, settings, NAME)
    (logits,) = run.outputs
    with timed("postprocess"):
        results = top_k(logits, run.manifest.labels, run.options.top_k)
    return json_response(ClassifyResponse(model=run.model.name, results=results))


TASK = Task(name=NAME, router=router, check_manifest=check_manifest)
