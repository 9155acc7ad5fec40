"""Image generation with the Image Transformer: `POST /v1/generate` samples images (optionally
completing a primed image), row by row over Server-Sent Events if asked; `POST /v1/score` gives the
bits per dimension of uploaded images under the model; `POST /v1/generate/attention` shows what a
pixel attended to."""

from __future__ import annotations

import base64
import json
import logging
import math
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import StreamingResponse
from PIL import Image, ImageDraw
from pydantic import BaseModel, ConfigDict, Field
from starlette.background import BackgroundTask

from service.attention import enlarged, heads, overlay, pick
from service.budget import ImageLimits
from service.deps import RegistryDep, SettingsDep
from service.errors import ServiceError
from service.imaging import Decoded, decode, encode_png, to_unit_array
from service.inputs import decode_base64, json_body, json_request_body, wants_png
from service.manifest import GENERATION, GenerationConfig, Manifest, Preprocessing, check_generation
from service.outputs import levels_to_image
from service.pipeline import Batch, ImagePipeline, ModelOptions
from service.routes.v1 import image_route, json_response
from service.sampling import finished, sample_rows
from service.schemas import Pair
from service.tasks.base import Task
from service.text import quoted

NAME = GENERATION
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no cache, no proxy buffering
log = logging.getLogger("service")


class GenerateRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"label": "7", "num_images": 4, "seed": 1}, {"prime": "<base64 PNG>", "prime_rows": 4}]
        },
    )

    model: str | None = Field(None, description="model name (default: the first ready generation model)")
    label: str | None = Field(
        None, description="class to condition on (one of the model's labels); none: unconditional"
    )
    num_images: int = Field(
        1, ge=1, le=256, description="images decoded together as one batch (see max_images_per_request)"
    )
    temperature: float = Field(1.0, ge=0.05, le=5.0, description="softmax temperature; lower is more conservative")
    top_k: int | None = Field(None, ge=1, description="sample among the k likeliest levels only")
    seed: int | None = Field(None, ge=0, lt=2**63, description="same request and seed, same images, bit for bit")
    prime: str | None = Field(None, description="base64 image to complete; it is resized to the model's size")
    prime_rows: int | None = Field(None, ge=0, description="rows of the prime kept (default: half the image)")
    scale: int = Field(16, ge=1, le=64, description="each pixel becomes scale x scale in the PNGs; 1: native size")
    stream: bool = Field(False, description="Server-Sent Events: one 'row' event per decoded row, then 'done'")


class GenerateResponse(BaseModel):
    model: str
    label: str | None
    seed: int
    size: Pair = Field(description="(height, width) of the PNGs")
    images: list[str] = Field(description="base64 PNGs")


class ScoreOptions(ModelOptions):
    label: str | None = Field(None, description="score under this class; none: unconditional")


class Score(BaseModel):
    bits_per_dim: float
    log_likelihood: float = Field(description="natural log of the image's probability, as quantised")


class ScoreResponse(BaseModel):
    model: str
    results: list[Score]


def image_to_levels(decoded: Decoded, spec: Preprocessing, count: int) -> np.ndarray:
    """A decoded image -> `[height, width]` levels, resized as the manifest says."""
    unit = to_unit_array(decoded.image, spec, decoded.size, decoded.box)
    levels: np.ndarray = np.round(unit[0] * (count - 1)).astype(np.int64)
    return levels


def png_base64(image: Image.Image) -> str:
    return base64.b64encode(encode_png(image)).decode()


def label_index(manifest: Manifest, cfg: GenerationConfig, label: str | None) -> int:
    if label is None:
        return cfg.num_classes
    if label not in manifest.labels:
        raise ServiceError(422, "unknown_label", f"label {quoted(label)} is not one of {manifest.labels}")
    return manifest.labels.index(label)


def _prime(
    request: GenerateRequest, manifest: Manifest, cfg: GenerationConfig, limits: ImageLimits
) -> np.ndarray | None:
    """The primed rows `[batch, rows, width]`, or None."""
    if request.prime is None:
        if request.prime_rows:
            raise ServiceError(422, "invalid_request", "prime_rows needs a prime image")
        return None
    rows = cfg.height // 2 if request.prime_rows is None else request.prime_rows
    if rows > cfg.height:
        raise ServiceError(422, "invalid_request", f"prime_rows is at most {cfg.height}")
    data = decode_base64(request.prime, "prime")
    spec = manifest.preprocessing
    levels = image_to_levels(decode(data, limits, spec), spec, cfg.levels)
    return np.broadcast_to(levels[:rows], (request.num_images, rows, cfg.width)).copy()


router = APIRouter(tags=["generation"])


@router.post(
    "/v1/generate",
    response_model=GenerateResponse,
    responses={
        200: {
            "content": {"image/png": {}, "text/event-stream": {}},
            "description": "images, one PNG, or an event stream",
        }
    },
    openapi_extra=json_request_body(GenerateRequest),
)
async def generate(
    request: Request,
    body: Annotated[GenerateRequest, Depends(json_body(GenerateRequest))],
    registry: RegistryDep,
    settings: SettingsDep,
) -> GenerateResponse | Response:
    """Sample images, class-conditional or not, or complete the top rows of a prime image.
    JSON answer with base64 PNGs; `Accept: image/png` for one raw PNG; `stream` (or
    `Accept: text/event-stream`) for each row as it is decoded."""
    if body.num_images > settings.max_images_per_request:
        raise ServiceError(413, "too_many_images", f"num_images is at most {settings.max_images_per_request}")
    want_png = wants_png(request, False, body.num_images)
    model = registry.resolve(body.model, NAME)
    assert model.manifest is not None
    cfg = GenerationConfig.model_validate(model.manifest.config)
    labels = np.full(body.num_images, label_index(model.manifest, cfg, body.label), dtype=np.int64)
    limits: ImageLimits = request.app.state.image_limits
    prime = await limits.run(_prime, body, model.manifest, cfg, limits)
    seed = secrets.randbits(63) if body.seed is None else body.seed
    decoding = model.decoding(cfg, body.num_images)  # 503 here, before the 200, if there is no room
    rows = sample_rows(decoding.step, cfg, labels, np.random.default_rng(seed), body.temperature, body.top_k, prime)

    def finish(images: np.ndarray) -> GenerateResponse:
        pngs = [png_base64(levels_to_image(img, cfg.levels, body.scale)) for img in images]
        size = (cfg.height * body.scale, cfg.width * body.scale)
        return GenerateResponse(model=model.name, label=body.label, seed=seed, size=size, images=pngs)

    release = decoding.release

    async def release_on_loop() -> None:  # a plain function would run in a worker thread
        release()

    if body.stream or "text/event-stream" in request.headers.get("accept", ""):
        events = _events(rows, cfg, partial(limits.run, finish), release)
        # the background task releases the room too, should the stream never start
        return StreamingResponse(
            events, media_type="text/event-stream", headers=SSE_HEADERS, background=BackgroundTask(release_on_loop)
        )
    try:
        images = await finished(rows)
    finally:
        release()
    if want_png:
        png = await limits.run(lambda: encode_png(levels_to_image(images[0], cfg.levels, body.scale)))
        return Response(png, media_type="image/png")
    return json_response(await limits.run(finish, images))  # 64 PNGs of 512 x 512: not on the loop


async def _events(
    rows: AsyncIterator[tuple[int, np.ndarray]],
    cfg: GenerationConfig,
    finish: Callable[[np.ndarray], Awaitable[GenerateResponse]],
    release: Callable[[], None],
) -> AsyncIterator[str]:
    """`event: row` with the grey values (0-255) of that row of every image, then `event: done`; or,
    where the stream cannot finish (a failed step), `event: error` saying why: the 200 went out with
    the first row, so the end of the stream is where a client learns it. The queue room is released
    when the rows are done, or the client has left."""
    images: np.ndarray | None = None
    try:
        async for row, images in rows:
            grey = np.round(images[:, row] * (255 / (cfg.levels - 1))).astype(int).tolist()
            yield f"event: row\ndata: {json.dumps({'row': row, 'pixels': grey})}\n\n"
    except Exception as exc:
        error = {"code": exc.code, "message": exc.message} if isinstance(exc, ServiceError) else None
        if error is None:
            log.exception("a generation stream failed")
            error = {"code": "internal_error", "message": "generation failed; the server's log has the details"}
        yield f"event: error\ndata: {json.dumps(error)}\n\n"
        return
    finally:
        release()
    assert images is not None
    yield f"event: done\ndata: {(await finish(images)).model_dump_json()}\n\n"


def score_inputs(batch: Batch[ScoreOptions]) -> dict[str, np.ndarray]:
    """Each image as the model's grey levels, and the label to score it under."""
    cfg = GenerationConfig.model_validate(batch.manifest.config)
    label = label_index(batch.manifest, cfg, batch.options.label)
    spec = batch.manifest.preprocessing
    pixels = np.stack([image_to_levels(d, spec, cfg.levels).ravel() for d in batch.images])
    return {"pixels": pixels, "labels": np.full(len(batch.images), label, dtype=np.int64)}


def score(batch: Batch[ScoreOptions]) -> ScoreResponse:
    _, log_likelihood = batch.outputs
    length = GenerationConfig.model_validate(batch.manifest.config).length
    results = [
        Score(bits_per_dim=float(-ll / (length * math.log(2))), log_likelihood=float(ll)) for ll in log_likelihood
    ]
    return ScoreResponse(model=batch.model.name, results=results)


SCORE = ImagePipeline(NAME, ScoreOptions, score, preprocess=score_inputs)
image_route(router, "/v1/score", SCORE, ScoreResponse,
            "Bits per dimension of each uploaded image under the model (quantised to its grey levels and resized "
            "to its size, light digits on a dark ground like the training data).")  # fmt: skip


# attention ------------------------------------------------------------------------------------------


class GenerateAttentionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="generation model (default: the first ready one)")
    image: str = Field(description="base64 image (e.g. one /v1/generate made); resized to the model's size")
    label: str | None = Field(None, description="the class it was conditioned on; none: unconditional")
    row: int = Field(ge=0, description="the pixel whose attention to show")
    col: int = Field(ge=0)
    layer: int | None = Field(None, ge=0, description="default: the last")
    head: int | None = Field(None, ge=0, description="default: the mean of the heads")
    scale: int = Field(16, ge=1, le=64, description="PNG enlargement")
    render: bool = Field(False, description="answer with the map over the image as PNG")


class GenerateAttentionResponse(BaseModel):
    model: str
    pixel: Pair
    start: float = Field(description="attention on the start token (the position before the first pixel)")
    map: list[list[float]] = Field(description="[rows][cols]: attention on each earlier pixel; 0 outside the context")
    context: int = Field(description="how many earlier pixels the model could see (its local memory)")


@router.post(
    "/v1/generate/attention",
    response_model=GenerateAttentionResponse,
    responses={200: {"content": {"image/png": {}}}},
    openapi_extra=json_request_body(GenerateAttentionRequest),
)
async def generate_attention(
    request: Request,
    body: Annotated[GenerateAttentionRequest, Depends(json_body(GenerateAttentionRequest))],
    registry: RegistryDep,
    settings: SettingsDep,
) -> GenerateAttentionResponse | Response:
    """For one pixel of an image, the Image Transformer's attention over the context it could see
    when predicting that pixel."""
    model = registry.resolve(body.model, NAME, graph="attention")
    manifest = model.manifest
    assert manifest is not None
    cfg = GenerationConfig.model_validate(manifest.config)
    if body.row >= cfg.height or body.col >= cfg.width:
        raise ServiceError(422, "invalid_request", f"row and col must be below {cfg.height} and {cfg.width}")
    data = decode_base64(body.image, "image")
    spec = manifest.preprocessing
    limits: ImageLimits = request.app.state.image_limits
    decoded = await limits.run(decode, data, limits, spec)
    levels = image_to_levels(decoded, spec, cfg.levels)
    label = label_index(manifest, cfg, body.label)
    feeds = {"pixels": levels.reshape(1, -1), "labels": np.array([label], dtype=np.int64)}
    _, attention = await model.run(feeds, graph="attention")
    t = body.row * cfg.width + body.col
    weights = heads(pick(attention[0], body.layer, "layer"), body.head)[t]  # over positions 0..t
    # position s reads pixel s - 1; position 0 reads the start token
    flat = np.zeros(cfg.length)
    flat[: cfg.length - 1] = weights[1:]
    pixel_map = flat.reshape(cfg.height, cfg.width)
    if wants_png(request, body.render, 1):
        png = await limits.run(_draw_pixel_attention, levels, cfg, pixel_map, body)
        return Response(png, media_type="image/png")
    return GenerateAttentionResponse(
        model=model.name, pixel=(body.row, body.col), start=float(weights[0]), map=pixel_map.tolist(),
        context=min(t, cfg.memory),
    )  # fmt: skip


def _draw_pixel_attention(
    levels: np.ndarray, cfg: GenerationConfig, pixel_map: np.ndarray, body: GenerateAttentionRequest
) -> bytes:
    picture = overlay(enlarged(levels_to_image(levels, cfg.levels), body.scale), pixel_map, alpha=0.6)
    s = body.scale
    ImageDraw.Draw(picture).rectangle((body.col * s, body.row * s, (body.col + 1) * s - 1, (body.row + 1) * s - 1),
                                      outline=(255, 64, 64), width=max(1, s // 8))  # fmt: skip
    return encode_png(picture)


TASK = Task(name=NAME, check_manifest=check_generation, router=router)
