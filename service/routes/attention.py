"""Attention maps: what each model looked at.

Each endpoint runs the model's separate `attention` graph, so the plain classify / detect / generate
paths never compute or copy attention. Maps come back as numbers (JSON) or as PNG overlays on the
input (`render=true` or `Accept: image/png`, one image), in a perceptually uniform colormap.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

import numpy as np
from fastapi import APIRouter, Query, Request, Response
from PIL import Image, ImageDraw
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from service.attention import HeadFusion, fuse_heads, overlay, rollout
from service.deps import RegistryDep, SettingsDep
from service.errors import ServiceError
from service.imaging import decode_image, encode_png, letterbox_size
from service.inputs import IMAGE_REQUEST_BODY, decode_base64, wants_png
from service.manifest import Preprocessing
from service.sampling import GenerationConfig
from service.schemas import FloatPair, Pair
from service.tasks import classify, detect, generate
from service.tasks.images import ModelOptions, run_on_images

router = APIRouter(tags=["attention"])


def _pick(attention: np.ndarray, index: int | None, what: str) -> np.ndarray:
    """attention[index] along axis 0 (default: the last), with a clear 422 when out of range."""
    count = attention.shape[0]
    if index is not None and index >= count:
        raise ServiceError(422, "invalid_request", f"{what} must be below {count}")
    picked: np.ndarray = attention[count - 1 if index is None else index]
    return picked


def _heads(attention: np.ndarray, head: int | None, fusion: HeadFusion = "mean") -> np.ndarray:
    """`[heads, ...]` -> one head, or all heads fused."""
    return fuse_heads(attention[None], fusion)[0] if head is None else _pick(attention, head, "head")


def _enlarged(image: Image.Image, scale: int) -> Image.Image:
    return image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST) if scale > 1 else image


# ViT ----------------------------------------------------------------------------------------------


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


def cls_map(attention: np.ndarray, options: ClassifyAttentionOptions) -> np.ndarray:
    """`[layers, heads, tokens, tokens]` (token 0 = CLS) -> the CLS row over the patch grid `[g, g]`."""
    if options.head is not None:
        _pick(attention[0], options.head, "head")  # range check
        attention = attention[:, options.head : options.head + 1]
    if options.method == "rollout":
        row = rollout(attention, options.fusion, options.discard_ratio)
    else:
        row = fuse_heads(_pick(attention, options.layer, "layer"), options.fusion)
    grid = math.isqrt(attention.shape[-1] - 1)
    patches: np.ndarray = row[0, 1:].reshape(grid, grid)
    return patches


@router.post("/v1/classify/attention", openapi_extra=IMAGE_REQUEST_BODY, response_model=ClassifyAttentionResponse,
             responses={200: {"content": {"image/png": {}}}})  # fmt: skip
async def classify_attention(
    request: Request,
    query: Annotated[ClassifyAttentionOptions, Query()],
    registry: RegistryDep,
    settings: SettingsDep,
) -> ClassifyAttentionResponse | Response:
    """Where the ViT looked: attention rollout (Abnar & Zuidema 2020) or a layer's raw attention,
    from the CLS token to every patch."""
    run = await run_on_images(request, query, registry, settings, classify.NAME, graph="attention")
    logits, attention = run.outputs
    options, model = run.options, run.model
    maps = [cls_map(a, options) for a in attention]
    if run.png:
        return Response(encode_png(overlay(_enlarged(run.decoded[0], options.scale), maps[0])), media_type="image/png")
    best = [top[0] for top in classify.top_k(logits, run.manifest.labels, 1)]
    results = [ClassAttention(label=b.label, score=b.score, map=m.tolist()) for b, m in zip(best, maps, strict=True)]
    return ClassifyAttentionResponse(model=model.name, method=options.method, grid=maps[0].shape, results=results)


# DETR ---------------------------------------------------------------------------------------------


class DetectAttentionOptions(ModelOptions):
    threshold: float = Field(0.5, ge=0.0, le=1.0)
    max_detections: int = Field(100, ge=1, le=1000)
    layer: int | None = Field(None, ge=0, description="decoder layer (default: the last)")
    head: int | None = Field(None, ge=0, description="one head; default: the mean of the heads")
    point: str | None = Field(None, pattern=r"^\d+(\.\d+)?,\d+(\.\d+)?$", description="x,y in image pixels: also "
                              "the encoder self-attention of the feature cell there")  # fmt: skip
    encoder_layer: int | None = Field(None, ge=0, description="encoder layer for `point` (default: the last)")
    render: bool = Field(False, description="answer with one panel per detection (its map and box) as PNG")
    scale: int = Field(1, ge=1, le=64, description="PNG enlargement of each panel")


class DetectionAttention(detect.Detection):
    attention: list[list[float]] = Field(description="[rows][cols] of feature cells: this detection's query's "
                                         "cross-attention over the image")  # fmt: skip


class EncoderAttention(BaseModel):
    point: FloatPair
    cell: Pair = Field(description="(row, col) of the feature cell holding the point")
    map: list[list[float]]


class ImageAttention(BaseModel):
    detections: list[DetectionAttention]
    encoder: EncoderAttention | None = None


class DetectAttentionResponse(BaseModel):
    model: str
    grid: Pair = Field(description="feature cells (rows, cols) covering each image")
    cell: FloatPair = Field(description="a cell's (width, height) in pixels of the first image")
    results: list[ImageAttention]


def _cells(spec: Preprocessing, cells: int, original: tuple[int, int]) -> tuple[int, int, int, float, float]:
    """The feature grid side, the rows and cols covering the image (the rest is letterbox padding),
    and a cell's width and height in original pixels."""
    side = math.isqrt(cells)
    scale_x, scale_y = detect.input_scale(original, spec)
    cell_w, cell_h = spec.size[1] / side / scale_x, spec.size[0] / side / scale_y
    return side, min(side, math.ceil(original[1] / cell_h)), min(side, math.ceil(original[0] / cell_w)), cell_w, cell_h


def _image_map(grid_map: np.ndarray, spec: Preprocessing, original: tuple[int, int]) -> np.ndarray:
    """A map over the whole (letterboxed) feature grid -> the same map over the original image."""
    full = Image.fromarray(grid_map.astype(np.float32), mode="F").resize(spec.size[::-1], Image.Resampling.BILINEAR)
    inner = letterbox_size(*original, spec) if spec.resize == "letterbox" else spec.size[::-1]
    return np.asarray(full.crop((0, 0, *inner)).resize(original, Image.Resampling.BILINEAR))


def _panel(image: Image.Image, values: np.ndarray, scale: int, box: detect.Box | None, title: str) -> Image.Image:
    panel = overlay(_enlarged(image, scale), values)
    draw = ImageDraw.Draw(panel)
    if box is not None:
        draw.rectangle(
            [v * scale for v in (box.xmin, box.ymin, box.xmax, box.ymax)],
            outline=(255, 64, 64),
            width=max(1, scale // 2),
        )
    draw.text((2, 2), title, fill=(255, 255, 255))
    return panel


def _side_by_side(panels: list[Image.Image]) -> Image.Image:
    strip = Image.new("RGB", (sum(p.width for p in panels) + 4 * (len(panels) - 1), panels[0].height), (255, 255, 255))
    x = 0
    for panel in panels:
        strip.paste(panel, (x, 0))
        x += panel.width + 4
    return strip


@router.post("/v1/detect/attention", openapi_extra=IMAGE_REQUEST_BODY, response_model=DetectAttentionResponse,
             responses={200: {"content": {"image/png": {}}}})  # fmt: skip
async def detect_attention(
    request: Request, query: Annotated[DetectAttentionOptions, Query()], registry: RegistryDep, settings: SettingsDep
) -> DetectAttentionResponse | Response:
    """For every detection, where its object query looked (decoder cross-attention, as in the DETR
    paper's figures); with `point`, the encoder self-attention of the feature cell at that point."""
    run = await run_on_images(request, query, registry, settings, detect.NAME, graph="attention")
    logits, boxes, encoder, decoder = run.outputs
    options, model, manifest, decoded, want_png = run.options, run.model, run.manifest, run.decoded, run.png
    spec = manifest.preprocessing
    results, panels = [], []
    for i, image in enumerate(decoded):
        side, rows, cols, cell_w, cell_h = _cells(spec, decoder.shape[-1], image.size)
        found = detect.detections(logits[i], boxes[i], image.size, spec, options.threshold, options.max_detections)
        cross = _heads(_pick(decoder[i], options.layer, "layer"), options.head)  # [queries, cells]
        items = []
        for d, q in zip(detect.as_response(found, manifest.labels), found.queries, strict=True):
            grid_map = cross[q].reshape(side, side)
            items.append(DetectionAttention(**d.model_dump(), attention=grid_map[:rows, :cols].tolist()))
            if want_png:
                panels.append(
                    _panel(
                        image, _image_map(grid_map, spec, image.size), options.scale, d.box, f"{d.label} {d.score:.2f}"
                    )
                )
        encoder_attention = None
        if options.point is not None:
            x, y = (float(v) for v in options.point.split(","))
            if not (0 <= x < image.width and 0 <= y < image.height):
                raise ServiceError(
                    422, "invalid_request", f"point {x},{y} is outside the {image.width}x{image.height} image"
                )
            row, col = int(y // cell_h), int(x // cell_w)
            grid_map = _heads(_pick(encoder[i], options.encoder_layer, "encoder_layer"), options.head)[row * side + col]
            grid_map = grid_map.reshape(side, side)
            encoder_attention = EncoderAttention(point=(x, y), cell=(row, col), map=grid_map[:rows, :cols].tolist())
            if want_png:
                panels.append(
                    _panel(image, _image_map(grid_map, spec, image.size), options.scale, None, f"encoder @ {x:g},{y:g}")
                )
        results.append(ImageAttention(detections=items, encoder=encoder_attention))
    if want_png:
        picture = _side_by_side(panels) if panels else _enlarged(decoded[0].convert("RGB"), options.scale)
        return Response(encode_png(picture), media_type="image/png")
    first = _cells(spec, decoder.shape[-1], decoded[0].size)
    return DetectAttentionResponse(
        model=model.name, grid=(first[1], first[2]), cell=(first[3], first[4]), results=results
    )


# Image Transformer --------------------------------------------------------------------------------


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
    "/v1/generate/attention", response_model=GenerateAttentionResponse, responses={200: {"content": {"image/png": {}}}}
)
async def generate_attention(
    request: Request, body: GenerateAttentionRequest, registry: RegistryDep, settings: SettingsDep
) -> GenerateAttentionResponse | Response:
    """For one pixel of an image, the Image Transformer's attention over the context it could see
    when predicting that pixel."""
    model = registry.resolve(body.model, generate.NAME, graph="attention")
    manifest = model.manifest
    assert manifest is not None
    cfg = GenerationConfig.model_validate(manifest.config)
    if body.row >= cfg.height or body.col >= cfg.width:
        raise ServiceError(422, "invalid_request", f"row and col must be below {cfg.height} and {cfg.width}")
    data = decode_base64(body.image, "image")
    image = await run_in_threadpool(decode_image, data, settings.max_image_pixels)
    levels = generate.image_to_levels(image, manifest.preprocessing, cfg.levels)
    label = generate.label_index(manifest, cfg, body.label)
    feeds = {"pixels": levels.reshape(1, -1), "labels": np.array([label], dtype=np.int64)}
    _, attention = await model.run(feeds, graph="attention")
    t = body.row * cfg.width + body.col
    weights = _heads(_pick(attention[0], body.layer, "layer"), body.head)[t]  # over positions 0..t
    # position s reads pixel s - 1; position 0 reads the start token
    flat = np.zeros(cfg.length)
    flat[: cfg.length - 1] = weights[1:]
    pixel_map = flat.reshape(cfg.height, cfg.width)
    if wants_png(request, body.render, 1):
        picture = overlay(_enlarged(generate.levels_to_image(levels, cfg.levels), body.scale), pixel_map, alpha=0.6)
        s = body.scale
        ImageDraw.Draw(picture).rectangle((body.col * s, body.row * s, (body.col + 1) * s - 1, (body.row + 1) * s - 1),
                                          outline=(255, 64, 64), width=max(1, s // 8))  # fmt: skip
        return Response(encode_png(picture), media_type="image/png")
    return GenerateAttentionResponse(
        model=model.name, pixel=(body.row, body.col), start=float(weights[0]), map=pixel_map.tolist(),
        context=min(t, cfg.memory),
    )  # fmt: skip
