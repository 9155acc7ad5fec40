"""Object detection: `POST /v1/detect` -> labelled boxes in the original image's pixels.

Image-size policy: the graph takes a fixed square input; each image is letterboxed into it (scaled
to fit with its aspect kept, at the top left, padded). A fixed shape lets requests of any size share
a batch and keeps ONNX Runtime's kernels static; boxes are mapped back through the same scale.
Thresholding and top-k happen here, outside the graph.
"""

from __future__ import annotations

import zlib
from typing import Annotated, NamedTuple

import numpy as np
from fastapi import APIRouter, Query, Request, Response
from PIL import Image, ImageDraw, ImageFont
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from service.deps import RegistryDep, SettingsDep
from service.imaging import encode_png, letterbox_size
from service.inputs import IMAGE_REQUEST_BODY
from service.manifest import Manifest, Preprocessing
from service.tasks.base import Task
from service.tasks.classify import softmax
from service.tasks.images import ModelOptions, run_on_images
from service.timing import json_response, timed

NAME = "detection"


class DetectOptions(ModelOptions):
    threshold: float = Field(0.5, ge=0.0, le=1.0, description="lowest score returned")
    max_detections: int = Field(100, ge=1, le=1000, description="most boxes per image, best first")
    render: bool = Field(False, description="answer with the image and its boxes drawn (PNG); as Accept: image/png")


class Box(BaseModel):
    xmin: float
    ymin: float
    xmax: float
    ymax: float


class Detection(BaseModel):
    label: str
    score: float
    box: Box = Field(description="in pixels of the original (upright) image")


class DetectResponse(BaseModel):
    model: str
    results: list[list[Detection]] = Field(description="one list per image, in request order, best first")


class Found(NamedTuple):
    """One image's detections, best first."""

    boxes: np.ndarray  # [n, 4] x0 y0 x1 y1 in original pixels
    scores: np.ndarray  # [n]
    labels: np.ndarray  # [n] class indices
    queries: np.ndarray  # [n] the object queries they came from


def detections(
    logits: np.ndarray, boxes: np.ndarray, original: tuple[int, int], spec: Preprocessing, threshold: float, limit: int
) -> Found:
    """One image: logits `[queries, classes + 1]` (last = no object), boxes `[queries, 4]` (cx, cy, w, h
    relative to the input) -> the detections scoring at least `threshold`, at most `limit`."""
    probs = softmax(logits.astype(np.float64))[:, :-1]
    labels, scores = probs.argmax(-1), probs.max(-1)
    keep = np.flatnonzero(scores >= threshold)
    keep = keep[np.argsort(-scores[keep], kind="stable")][:limit]
    cx, cy, w, h = boxes[keep].astype(np.float64).T
    height, width = spec.size
    xyxy = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=-1) * [width, height, width, height]
    # input pixels -> original pixels, through the letterbox's per-axis scale
    scale_x, scale_y = input_scale(original, spec)
    xyxy = np.clip(xyxy / np.array([scale_x, scale_y] * 2), 0, [original[0], original[1]] * 2)
    return Found(xyxy, scores[keep], labels[keep], keep)


def input_scale(original: tuple[int, int], spec: Preprocessing) -> tuple[float, float]:
    """Model-input pixels per original pixel, along x and y."""
    height, width = spec.size
    inner_w, inner_h = letterbox_size(*original, spec) if spec.resize == "letterbox" else (width, height)
    return inner_w / original[0], inner_h / original[1]


def as_response(found: Found, names: list[str]) -> list[Detection]:
    return [
        Detection(label=names[int(label)], score=float(score), box=Box(xmin=b[0], ymin=b[1], xmax=b[2], ymax=b[3]))
        for b, score, label in zip(found.boxes.tolist(), found.scores, found.labels, strict=True)
    ]


PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212)]  # fmt: skip


def render(image: Image.Image, found: list[Detection]) -> bytes:
    """The image with each box outlined and labelled, as PNG; small images are enlarged to be seen."""
    scale = max(1, 256 // max(min(image.size), 1))
    canvas = image.convert("RGB").resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=max(10, canvas.height // 30))
    line = max(1, canvas.height // 200)
    for d in found:
        colour = PALETTE[zlib.crc32(d.label.encode()) % len(PALETTE)]
        x0, y0, x1, y1 = (v * scale for v in (d.box.xmin, d.box.ymin, d.box.xmax, d.box.ymax))
        draw.rectangle((x0, y0, x1, y1), outline=colour, width=line)
        text = f"{d.label} {d.score:.2f}"
        left, top, right, bottom = draw.textbbox((x0, y0), text, font=font)
        draw.rectangle((left, top - (bottom - top), right + 2, top), fill=colour)
        draw.text((x0 + 1, y0 - (bottom - top)), text, fill=(0, 0, 0), font=font)
    return encode_png(canvas)


def check_manifest(manifest: Manifest) -> None:
    main = manifest.main
    names = [t.name for t in main.outputs]
    if len(main.inputs) != 1 or names != ["logits", "boxes"]:
        raise ValueError("a detection graph takes one image batch and gives 'logits' and 'boxes'")
    if main.outputs[0].shape[-1] != len(manifest.labels) + 1:
        raise ValueError(
            f"the graph gives {main.outputs[0].shape[-1]} classes; {len(manifest.labels)} labels + no object"
        )


router = APIRouter(tags=["detection"])


@router.post(
    "/v1/detect",
    openapi_extra=IMAGE_REQUEST_BODY,
    response_model=DetectResponse,
    responses={
        200: {"content": {"image/png": {}}, "description": "detections, or the image with boxes drawn"},
        413: {"description": "body, image or image count over a limit"},
        415: {"description": "not an image"},
    },
)
async def detect(
    request: Request, query: Annotated[DetectOptions, Query()], registry: RegistryDep, settings: SettingsDep
) -> Response:
    """Detect objects in one or more images. With `render` or `Accept: image/png`, one image comes
    back with its boxes drawn."""
    run = await run_on_images(request, query, registry, settings, NAME)
    logits, boxes = run.outputs
    options, manifest, decoded = run.options, run.manifest, run.decoded
    with timed("postprocess"):
        results = [
            as_response(
                detections(
                    logits[i], boxes[i], image.size, manifest.preprocessing, options.threshold, options.max_detections
                ),
                manifest.labels,
            )
            for i, image in enumerate(decoded)
        ]
    if run.png:
        return Response(await run_in_threadpool(render, decoded[0], results[0]), media_type="image/png")
    return json_response(DetectResponse(model=run.model.name, results=results))


TASK = Task(name=NAME, router=router, check_manifest=check_manifest)
