"""Image classification: `POST /v1/classify` -> top-k labels with softmax scores per image;
`POST /v1/classify/attention` -> where the ViT looked; the `<model>_image` view on /v2."""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from service.attention import HeadFusion, enlarged, fuse_heads, overlay, pick, rollout
from service.imaging import resized_size
from service.manifest import CLASSIFICATION, Preprocessing, check_classification
from service.outputs import softmax
from service.pipeline import ImagePipeline, Job, ModelOptions
from service.schemas import Pair
from service.tasks.base import ImageView, Route, Task

NAME = CLASSIFICATION


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


def top_k(logits: np.ndarray, labels: list[str], k: int) -> list[list[Prediction]]:
    """logits `[batch, classes]` -> per image the k best labels with their probabilities."""
    probs = softmax(logits.astype(np.float64))
    k = min(k, probs.shape[-1])
    order = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
    scores = np.take_along_axis(probs, order, axis=-1).tolist()
    ranked = [
        [{"label": labels[i], "score": s} for i, s in zip(row, top, strict=True)]
        for row, top in zip(order.tolist(), scores, strict=True)
    ]
    return _RANKED.validate_python(ranked)  # one call into pydantic's core, not one per prediction


_RANKED = TypeAdapter(list[list[Prediction]])


def classify(job: Job[ClassifyOptions]) -> ClassifyResponse:
    (logits,) = job.outputs
    results = top_k(logits, job.manifest.labels, job.options.top_k)
    return ClassifyResponse(model=job.model.name, results=results)


CLASSIFY = ImagePipeline(NAME, ClassifyOptions, classify)


def as_tensors(answer: ClassifyResponse) -> dict[str, np.ndarray]:
    """/v2: `label` and `score`, `[images, k]`."""
    labels = np.array([[p.label.encode() for p in row] for row in answer.results], dtype=object)
    scores = np.array([[p.score for p in row] for row in answer.results], dtype=np.float32)
    return {"label": labels, "score": scores}


VIEW = ImageView(
    CLASSIFY,
    outputs=[{"name": "label", "datatype": "BYTES", "shape": [-1, -1]},
             {"name": "score", "datatype": "FP32", "shape": [-1, -1]}],
    tensors=as_tensors,
)  # fmt: skip


# attention ------------------------------------------------------------------------------------------


class ClassifyAttentionOptions(ModelOptions):
    method: Literal["rollout", "raw"] = Field("rollout", description="attention rollout, or one layer's raw attention")
    layer: int | None = Field(None, ge=0, description="raw: the layer (default: the last)")
    head: int | None = Field(None, ge=0, description="one head; default: heads fused by `fusion`")
    fusion: HeadFusion = Field("mean", description="how heads are fused: mean, max or min")
    discard_ratio: float = Field(0.0, ge=0.0, lt=1.0, description="rollout: drop this lowest fraction of weights")
    render: bool = Field(False, description="answer with the heatmap over the image as PNG")
    scale: int = Field(1, ge=1, le=64, description="PNG enlargement (the PNG is the input's size times this)")


class ClassAttention(BaseModel):
    label: str = Field(description="the top-1 label")
    score: float
    map: list[list[float]] = Field(description="[grid rows][grid cols]: the CLS token's attention to each patch")


class ClassifyAttentionResponse(BaseModel):
    model: str
    method: str
    grid: Pair = Field(description="patches per column and per row; each covers an equal part of the image")
    results: list[ClassAttention]


def cls_map(attention: np.ndarray, options: ClassifyAttentionOptions, prefix: int = 1) -> np.ndarray:
    """`[layers, heads, tokens, tokens]` (token 0 = CLS, then `prefix - 1` more tokens before the patches,
    such as DeiT's distillation token) -> the CLS row over the patch grid `[g, g]`. Rollout runs over
    every token, the prefix ones included."""
    if options.head is not None:
        pick(attention[0], options.head, "head")  # range check
        attention = attention[:, options.head : options.head + 1]
    if options.method == "rollout":
        row = rollout(attention, options.fusion, options.discard_ratio)
    else:
        row = fuse_heads(pick(attention, options.layer, "layer"), options.fusion)
    grid = math.isqrt(attention.shape[-1] - prefix)
    patches: np.ndarray = row[0, prefix:].reshape(grid, grid)
    return patches


def attention(job: Job[ClassifyAttentionOptions]) -> ClassifyAttentionResponse:
    logits, maps = job.outputs
    grids = [cls_map(a, job.options, job.manifest.prefix_tokens) for a in maps]
    best = [top[0] for top in top_k(logits, job.manifest.labels, 1)]
    results = [ClassAttention(label=b.label, score=b.score, map=m.tolist()) for b, m in zip(best, grids, strict=True)]
    return ClassifyAttentionResponse(model=job.model.name, method=job.options.method, grid=grids[0].shape,
                                     results=results)  # fmt: skip


def seen(image: Image.Image, spec: Preprocessing) -> Image.Image:
    """The part of the image the model saw: all of it, or what its centre crop kept."""
    if spec.crop is None:
        return image
    (width, height), (crop_h, crop_w) = resized_size(*image.size, spec), spec.crop
    left, top = (width - crop_w) // 2, (height - crop_h) // 2
    x, y = image.width / width, image.height / height
    return image.crop((round(max(left, 0) * x), round(max(top, 0) * y),
                       round(min(left + crop_w, width) * x), round(min(top + crop_h, height) * y)))  # fmt: skip


def draw_attention(job: Job[ClassifyAttentionOptions], answer: ClassifyAttentionResponse) -> Image.Image:
    """The first image's map as a heatmap over the part of it the model saw."""
    image = seen(job.images[0].image, job.manifest.preprocessing)
    return overlay(enlarged(image, job.options.scale), np.asarray(answer.results[0].map))


ATTENTION = ImagePipeline(NAME, ClassifyAttentionOptions, attention, graph="attention", render=draw_attention)

ROUTES = (
    Route("/v1/classify", CLASSIFY, ClassifyResponse,
          "Classify one or more images. Options go in the query string, or as form fields / JSON keys."),
    Route("/v1/classify/attention", ATTENTION, ClassifyAttentionResponse,
          "Where the ViT looked: attention rollout (Abnar & Zuidema 2020) or a layer's raw attention, from the "
          "CLS token to every patch. `render` (or `Accept: image/png`, one image) answers with the heatmap."),
)  # fmt: skip
TASK = Task(NAME, check_classification, ROUTES, VIEW)
