"""Image generation with the Image Transformer or an imported ImageGPT: `POST /v1/generate` samples
images (optionally completing a primed image), row by row over Server-Sent Events if asked;
`POST /v1/score` gives the bits per dimension of uploaded images under the model;
`POST /v1/generate/attention` shows what a pixel attended to.

One pipeline for both: the manifest's GenerationConfig says what a token is (a grey level, or a
colour of the model's palette) and whether the graphs take a class label."""

from __future__ import annotations

import base64
import math
import secrets

import numpy as np
from PIL import Image, ImageDraw
from pydantic import BaseModel, ConfigDict, Field

from service.attention import enlarged, heads, overlay, pick
from service.budget import ImageLimits
from service.errors import ServiceError
from service.imaging import encode_png
from service.manifest import GENERATION, GenerationConfig, Manifest, check_generation
from service.outputs import image_to_tokens, token_values, tokens_to_image
from service.pipeline import ImagePipeline, Job, ModelOptions, Stream, StreamPipeline
from service.sampling import sample_rows, with_labels
from service.schemas import Pair
from service.tasks.base import Route, Task
from service.text import quoted

NAME = GENERATION


class GenerateRequest(ModelOptions):
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
    top_k: int | None = Field(None, ge=1, description="sample among the k likeliest tokens only (1: greedy)")
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


def png_base64(image: Image.Image) -> str:
    return base64.b64encode(encode_png(image)).decode()


def label_index(manifest: Manifest, cfg: GenerationConfig, label: str | None) -> int:
    if label is None:
        return cfg.num_classes
    if not cfg.conditional:
        raise ServiceError(422, "unknown_label", f"model {quoted(manifest.name)} is unconditional: it takes no label")
    if label not in manifest.labels:
        raise ServiceError(422, "unknown_label", f"label {quoted(label)} is not one of {manifest.labels}")
    return manifest.labels.index(label)


def prime_rows(job: Job[GenerateRequest]) -> np.ndarray | None:
    """The decoded prime's top rows as tokens, one copy per image `[images, rows, width]`; or None."""
    request, manifest = job.options, job.manifest
    cfg = GenerationConfig.model_validate(manifest.config)
    if not job.images:
        if request.prime_rows:
            raise ServiceError(422, "invalid_request", "prime_rows needs a prime image")
        return None
    rows = cfg.height // 2 if request.prime_rows is None else request.prime_rows
    if rows > cfg.height:
        raise ServiceError(422, "invalid_request", f"prime_rows is at most {cfg.height}")
    tokens = image_to_tokens(job.images[0], manifest.preprocessing, cfg)
    return np.broadcast_to(tokens[:rows], (request.num_images, rows, cfg.width)).copy()


def start_sampling(
    job: Job[GenerateRequest], prime: np.ndarray | None, limits: ImageLimits
) -> Stream[GenerateResponse]:
    """The generation's rows through the model's shared decoding: it takes queue room and cache
    slots now (503 before any answer where there are none), until the stream's `release`."""
    request, model = job.options, job.model
    if request.num_images > limits.max_images:
        raise ServiceError(413, "too_many_images", f"num_images is at most {limits.max_images}")
    cfg = GenerationConfig.model_validate(job.manifest.config)
    labels = np.full(request.num_images, label_index(job.manifest, cfg, request.label), dtype=np.int64)
    seed = secrets.randbits(63) if request.seed is None else request.seed
    sampler = model.sampler(cfg, request.num_images)
    rng = np.random.default_rng(seed)
    rows = sample_rows(sampler.step, cfg, labels, rng, request.temperature, request.top_k, prime)

    def answer(images: np.ndarray) -> GenerateResponse:
        pngs = [png_base64(tokens_to_image(image, cfg, request.scale)) for image in images]
        size = (cfg.height * request.scale, cfg.width * request.scale)
        return GenerateResponse(model=model.name, label=request.label, seed=seed, size=size, images=pngs)

    def picture(images: np.ndarray) -> Image.Image:
        return tokens_to_image(images[0], cfg, request.scale)

    def values(tokens: np.ndarray) -> np.ndarray:  # grey values, or RGB triples with a palette
        return token_values(tokens, cfg).astype(int)

    return Stream(request.num_images, rows, answer, picture, values, sampler.release)


GENERATE = StreamPipeline(NAME, GenerateRequest, prime_rows, start_sampling)


def score_inputs(job: Job[ScoreOptions]) -> dict[str, np.ndarray]:
    """Each image as the model's tokens, and the label to score it under (a conditional model's)."""
    cfg = GenerationConfig.model_validate(job.manifest.config)
    label = label_index(job.manifest, cfg, job.options.label)
    spec = job.manifest.preprocessing
    pixels = np.stack([image_to_tokens(d, spec, cfg).ravel() for d in job.images])
    return with_labels(cfg, {"pixels": pixels}, np.full(len(job.images), label, dtype=np.int64))


def score(job: Job[ScoreOptions]) -> ScoreResponse:
    _, log_likelihood = job.outputs
    length = GenerationConfig.model_validate(job.manifest.config).length
    results = [
        Score(bits_per_dim=float(-ll / (length * math.log(2))), log_likelihood=float(ll)) for ll in log_likelihood
    ]
    return ScoreResponse(model=job.model.name, results=results)


SCORE = ImagePipeline(NAME, ScoreOptions, score, preprocess=score_inputs)


# attention ------------------------------------------------------------------------------------------


class GenerateAttentionRequest(ModelOptions):
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


def pixel_inputs(job: Job[GenerateAttentionRequest]) -> dict[str, np.ndarray]:
    """The image as the model's tokens, and the label it was conditioned on (a conditional model's)."""
    request, manifest = job.options, job.manifest
    cfg = GenerationConfig.model_validate(manifest.config)
    if request.row >= cfg.height or request.col >= cfg.width:
        raise ServiceError(422, "invalid_request", f"row and col must be below {cfg.height} and {cfg.width}")
    tokens = image_to_tokens(job.images[0], manifest.preprocessing, cfg)
    label = label_index(manifest, cfg, request.label)
    return with_labels(cfg, {"pixels": tokens.reshape(1, -1)}, np.array([label], dtype=np.int64))


def pixel_attention(job: Job[GenerateAttentionRequest]) -> GenerateAttentionResponse:
    """The chosen pixel's attention over the positions before it, as a map over the image."""
    request = job.options
    cfg = GenerationConfig.model_validate(job.manifest.config)
    _, attention = job.outputs
    t = request.row * cfg.width + request.col
    weights = heads(pick(attention[0], request.layer, "layer"), request.head)[t]  # over positions 0..t
    # position s reads pixel s - 1; position 0 reads the start token
    flat = np.zeros(cfg.length)
    flat[: cfg.length - 1] = weights[1:]
    return GenerateAttentionResponse(
        model=job.model.name, pixel=(request.row, request.col), start=float(weights[0]),
        map=flat.reshape(cfg.height, cfg.width).tolist(), context=min(t, cfg.memory),
    )  # fmt: skip


def draw_pixel_attention(job: Job[GenerateAttentionRequest], answer: GenerateAttentionResponse) -> Image.Image:
    """The map over the image as the model saw it, the chosen pixel outlined."""
    request = job.options
    cfg = GenerationConfig.model_validate(job.manifest.config)
    tokens = image_to_tokens(job.images[0], job.manifest.preprocessing, cfg)
    picture = overlay(enlarged(tokens_to_image(tokens, cfg), request.scale), np.asarray(answer.map), alpha=0.6)
    s, row, col = request.scale, request.row, request.col
    ImageDraw.Draw(picture).rectangle((col * s, row * s, (col + 1) * s - 1, (row + 1) * s - 1),
                                      outline=(255, 64, 64), width=max(1, s // 8))  # fmt: skip
    return picture


PIXEL_ATTENTION = ImagePipeline(NAME, GenerateAttentionRequest, pixel_attention, graph="attention",
                                preprocess=pixel_inputs, render=draw_pixel_attention)  # fmt: skip

ROUTES = (
    Route("/v1/generate", GENERATE, GenerateResponse,
          "Sample images, class-conditional or not, or complete the top rows of a prime image. JSON answer with "
          "base64 PNGs; `Accept: image/png` for one raw PNG; `stream` (or `Accept: text/event-stream`) for each "
          "row as it is decoded.", image_field="prime"),
    Route("/v1/score", SCORE, ScoreResponse,
          "Bits per dimension of each uploaded image under the model: resized to its size and quantised to its "
          "tokens (the Image Transformer's grey levels, light digits on a dark ground like its training data; "
          "ImageGPT's palette, each pixel its nearest colour)."),
    Route("/v1/generate/attention", PIXEL_ATTENTION, GenerateAttentionResponse,
          "For one pixel of an image, the model's attention over the context it could see when predicting "
          "that pixel.", image_field="image"),
)  # fmt: skip
TASK = Task(NAME, check_generation, ROUTES)
