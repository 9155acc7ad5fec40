"""Object detection: `POST /v1/detect` -> labelled boxes in the original image's pixels;
`POST /v1/detect/attention` -> where each detection's query looked; the `<model>_image` view on /v2.

Image-size policy: the graph takes a fixed square input; each image is letterboxed into it (scaled
to fit with its aspect kept, at the top left, padded). A fixed shape lets requests of any size share
a batch and keeps ONNX Runtime's kernels static; boxes are mapped back through the same scale.
Thresholding and top-k happen here, outside the graph.

An imported detector (DETR, Conditional DETR, YOLOS: export/hf.py) resizes as its image processor does
instead (`shortest_edge`): each image keeps its aspect and its own input size, runs unpadded (pixel_mask
all ones, exactly what transformers' pipeline computes for one image), and shares a batch only with
images of its size. Scores follow the manifest's `score_activation` (softmax with "no object", or sigmoid).
"""

from __future__ import annotations

import json
import math
import zlib
from typing import Any, NamedTuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydantic import BaseModel, Field

from service.attention import MAX_PICTURE_PIXELS, check_picture, enlarged, heads, overlay, pick
from service.errors import ServiceError
from service.imaging import preprocess_batch, resized_size
from service.manifest import DETECTION, Manifest, check_detection
from service.outputs import Found, detections, input_scale
from service.pipeline import Feeds, ImagePipeline, Job, ModelOptions, model_inputs
from service.schemas import FloatPair, Pair
from service.tasks.base import ImageView, Route, Task

NAME = DETECTION


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


def as_response(found: Found, names: list[str]) -> list[Detection]:
    return [
        Detection(label=names[int(label)], score=float(score), box=Box(xmin=b[0], ymin=b[1], xmax=b[2], ymax=b[3]))
        for b, score, label in zip(found.boxes.tolist(), found.scores, found.labels, strict=True)
    ]


def found_in(job: Job[Any], i: int) -> Found:
    """Image `i`'s detections, scored as the manifest says (softmax or sigmoid)."""
    manifest, options, (logits, boxes) = job.manifest, job.options, job.outputs[:2]
    return detections(logits[i], boxes[i], job.images[i].size, manifest.preprocessing, options.threshold,
                      options.max_detections, manifest.score_activation)  # fmt: skip


def detect(job: Job[DetectOptions]) -> DetectResponse:
    results = [as_response(found_in(job, i), job.manifest.labels) for i in range(len(job.images))]
    return DetectResponse(model=job.model.name, results=results)


PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212)]  # fmt: skip


def draw_boxes(job: Job[DetectOptions], answer: DetectResponse) -> Image.Image:
    """The first image with each box outlined and labelled; small images are enlarged to be seen."""
    image, found = job.images[0].image, answer.results[0]
    fits = math.isqrt(MAX_PICTURE_PIXELS // (image.width * image.height))  # a thin image is not enlarged past it
    scale = max(1, min(256 // max(min(image.size), 1), fits))
    check_picture(image.width * scale, image.height * scale)
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
    return canvas


def detect_inputs(job: Job[Any]) -> Feeds:
    """The manifest's recipe; images kept at their own size (shortest_edge) each get their own input."""
    spec = job.manifest.preprocessing
    if spec.fixed_size:
        return model_inputs(job)
    name = job.manifest.graphs[job.graph].inputs[0].name
    return [{name: preprocess_batch([image], spec)} for image in job.images]


DETECT = ImagePipeline(NAME, DetectOptions, detect, render=draw_boxes, preprocess=detect_inputs)


def as_tensors(answer: DetectResponse) -> dict[str, np.ndarray]:
    """/v2: `detections` `[images]`, per image the JSON list /v1/detect returns."""
    encoded = [json.dumps([d.model_dump() for d in image]).encode() for image in answer.results]
    return {"detections": np.array(encoded, dtype=object)}


VIEW = ImageView(DETECT, outputs=[{"name": "detections", "datatype": "BYTES", "shape": [-1]}], tensors=as_tensors)


# attention ------------------------------------------------------------------------------------------


class DetectAttentionOptions(DetectOptions):
    layer: int | None = Field(None, ge=0, description="decoder layer (default: the last)")
    head: int | None = Field(None, ge=0, description="one head; default: the mean of the heads")
    point: str | None = Field(None, pattern=r"^\d+(\.\d+)?,\d+(\.\d+)?$", description="x,y in image pixels: also "
                              "the encoder self-attention of the feature cell there")  # fmt: skip
    encoder_layer: int | None = Field(None, ge=0, description="encoder layer for `point` (default: the last)")
    render: bool = Field(False, description="answer with one panel per detection (its map and box) as PNG")
    scale: int = Field(1, ge=1, le=64, description="PNG enlargement of each panel")


class DetectionAttention(Detection):
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


class Cells(NamedTuple):
    """How the feature grid covers one image: the grid's rows and cols, those covering the image (the
    rest is letterbox padding), and a cell's width and height in original pixels."""

    grid_rows: int
    grid_cols: int
    rows: int
    cols: int
    width: float
    height: float


def cells(manifest: Manifest, count: int, original: tuple[int, int]) -> Cells:
    """A square grid of `count` cells over the square input, or (with a feature stride) one cell per
    stride x stride input pixels over this image's own input."""
    spec, stride = manifest.preprocessing, manifest.feature_stride
    scale_x, scale_y = input_scale(original, spec)
    if stride is None:
        rows = cols = math.isqrt(count)
        cell_w, cell_h = spec.size[1] / cols / scale_x, spec.size[0] / rows / scale_y
    else:
        width, height = resized_size(*original, spec)
        rows, cols = math.ceil(height / stride), math.ceil(width / stride)
        cell_w, cell_h = stride / scale_x, stride / scale_y
    return Cells(rows, cols, min(rows, math.ceil(original[1] / cell_h)), min(cols, math.ceil(original[0] / cell_w)),
                 cell_w, cell_h)  # fmt: skip


Panel = tuple[np.ndarray, Box | None, str]  # a map over the whole feature grid, a box to draw, a title


def image_attention(job: Job[DetectAttentionOptions], i: int) -> tuple[ImageAttention, list[Panel]]:
    """One image's detections with their queries' cross-attention, and the encoder's at `point`."""
    _, _, encoder, decoder = job.outputs
    options, size = job.options, job.images[i].size
    grid = cells(job.manifest, decoder[i].shape[-1], size)
    found = found_in(job, i)
    cross = heads(pick(decoder[i], options.layer, "layer"), options.head)  # [queries, cells]
    items, panels = [], list[Panel]()
    for d, q in zip(as_response(found, job.manifest.labels), found.queries, strict=True):
        grid_map = cross[q].reshape(grid.grid_rows, grid.grid_cols)
        items.append(DetectionAttention(**d.model_dump(), attention=grid_map[: grid.rows, : grid.cols].tolist()))
        panels.append((grid_map, d.box, f"{d.label} {d.score:.2f}"))
    point = None
    if options.point is not None:
        x, y = (float(v) for v in options.point.split(","))
        if not (0 <= x < size[0] and 0 <= y < size[1]):
            raise ServiceError(422, "invalid_request", f"point {x},{y} is outside the {size[0]}x{size[1]} image")
        row, col = int(y // grid.height), int(x // grid.width)
        encoder_map = heads(pick(encoder[i], options.encoder_layer, "encoder_layer"), options.head)
        cell_map = encoder_map[row * grid.grid_cols + col]
        grid_map = cell_map.reshape(grid.grid_rows, grid.grid_cols)
        point = EncoderAttention(point=(x, y), cell=(row, col), map=grid_map[: grid.rows, : grid.cols].tolist())
        panels.append((grid_map, None, f"encoder @ {x:g},{y:g}"))
    return ImageAttention(detections=items, encoder=point), panels


def detect_attention(job: Job[DetectAttentionOptions]) -> DetectAttentionResponse:
    results = [image_attention(job, i)[0] for i in range(len(job.images))]
    first = cells(job.manifest, job.outputs[3][0].shape[-1], job.images[0].size)
    return DetectAttentionResponse(model=job.model.name, grid=(first.rows, first.cols),
                                   cell=(first.width, first.height), results=results)  # fmt: skip


def image_map(grid_map: np.ndarray, manifest: Manifest, original: tuple[int, int]) -> np.ndarray:
    """A map over the whole (letterboxed) feature grid -> the same map over the original image."""
    spec, stride = manifest.preprocessing, manifest.feature_stride
    rows, cols = grid_map.shape
    covered = spec.size[::-1] if stride is None else (cols * stride, rows * stride)  # input pixels under the grid
    full = Image.fromarray(grid_map.astype(np.float32), mode="F").resize(covered, Image.Resampling.BILINEAR)
    return np.asarray(full.crop((0, 0, *resized_size(*original, spec))).resize(original, Image.Resampling.BILINEAR))


def draw_attention(job: Job[DetectAttentionOptions], _: DetectAttentionResponse) -> Image.Image:
    """One panel per detection (and for `point`), side by side: the map over the image, the box."""
    image, scale = job.images[0].image, job.options.scale
    wanted = image_attention(job, 0)[1]
    check_picture((image.width * scale + 4) * max(len(wanted), 1), image.height * scale)
    panels = []
    for grid_map, box, title in wanted:
        panel = overlay(enlarged(image, scale), image_map(grid_map, job.manifest, image.size))
        draw = ImageDraw.Draw(panel)
        if box is not None:
            corners = [v * scale for v in (box.xmin, box.ymin, box.xmax, box.ymax)]
            draw.rectangle(corners, outline=(255, 64, 64), width=max(1, scale // 2))
        draw.text((2, 2), title, fill=(255, 255, 255))
        panels.append(panel)
    if not panels:
        return enlarged(image.convert("RGB"), scale)
    strip = Image.new("RGB", (sum(p.width for p in panels) + 4 * (len(panels) - 1), panels[0].height), (255,) * 3)
    for index, panel in enumerate(panels):
        strip.paste(panel, (index * (panel.width + 4), 0))
    return strip


ATTENTION = ImagePipeline(NAME, DetectAttentionOptions, detect_attention, graph="attention", render=draw_attention,
                          preprocess=detect_inputs)  # fmt: skip

ROUTES = (
    Route("/v1/detect", DETECT, DetectResponse,
          "Detect objects in one or more images. With `render` or `Accept: image/png`, one image comes back with "
          "its boxes drawn."),
    Route("/v1/detect/attention", ATTENTION, DetectAttentionResponse,
          "For every detection, where its object query looked (decoder cross-attention, as in the DETR paper's "
          "figures); with `point`, the encoder self-attention of the feature cell at that point."),
)  # fmt: skip
TASK = Task(NAME, check_detection, ROUTES, VIEW)
