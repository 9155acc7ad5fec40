"""The pipelines every model endpoint runs: pick the model, decode the request's images, preprocess,
run a graph through the model's batcher (or, for generation, its shared decoding steps),
postprocess. A task writes each stage once, as an `ImagePipeline` or a `StreamPipeline`; the /v1
routes, the /v2 image views and the attention routes only adapt requests to it and its answer to
their format. Nothing here knows HTTP."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from service.budget import Claim, ImageLimits
from service.context import timed
from service.imaging import Decoded, Opened, decode_all, open_all, preprocess_batch
from service.manifest import Manifest
from service.registry import ModelRegistry
from service.repository import ServedModel
from service.settings import Settings


class ModelOptions(BaseModel):
    """Options of an image pipeline, from /v1's query string and body or /v2's parameters."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="model name (default: the first ready model for this task)")
    version: int | None = Field(None, ge=1, description="model version (default: its highest served)")


Opts = TypeVar("Opts", bound=ModelOptions)  # a pipeline's options
A = TypeVar("A", bound=BaseModel)  # its answer


@dataclass(slots=True)
class Job(Generic[Opts]):
    """One request on its way through the stages: its model, options, images and outputs."""

    model: ServedModel
    manifest: Manifest
    options: Opts
    graph: str
    images: list[Decoded] = field(default_factory=list)
    outputs: list[np.ndarray] = field(default_factory=list)
    extra: Any = None  # what a pipeline's `before` stage found (zero-shot: its labels' text embeddings)


def model_inputs(batch: Job[Any]) -> dict[str, np.ndarray]:
    """The default preprocessing: the manifest's recipe, stacked as the graph's one image input."""
    spec = batch.manifest.graphs[batch.graph].inputs[0]
    return {spec.name: preprocess_batch(batch.images, batch.manifest.preprocessing)}


# A preprocess gives the graph's inputs for the whole request, or one set per image where the images'
# inputs differ in size (a detector that keeps each image's aspect): each then runs on its own, and
# may share a batch with other requests' images of its size.
Feeds = dict[str, np.ndarray] | list[dict[str, np.ndarray]]


def ragged(parts: list[np.ndarray]) -> np.ndarray:
    """Per-image outputs (batch axis 1 each) -> one array: stacked where their shapes agree, else an
    object array of the per-image arrays (indexing either by image gives that image's output)."""
    if all(part.shape == parts[0].shape for part in parts):
        return np.concatenate(parts)
    joined = np.empty(len(parts), dtype=object)
    for i, part in enumerate(parts):
        joined[i] = part[0]
    return joined


def _float32(output: np.ndarray) -> np.ndarray:
    return output.astype(np.float32) if output.dtype == np.float16 else output


# Images this small decode faster on the event loop than a hop to a worker thread costs: a body up to
# INLINE_BYTES has its headers read there, and decodes there when they promise at most INLINE_PIXELS
# (decoding work follows the pixels, whatever the compressed size: a 50 KB PNG can hold 40 Mpx).
INLINE_BYTES = 64 * 1024
INLINE_PIXELS = 256 * 256


@dataclass(frozen=True)
class ImagePipeline(Generic[Opts, A]):
    """A task's stages over one graph of its models: images in, an answer `A` out."""

    task: str  # the manifest's task this pipeline serves
    options: type[Opts]
    postprocess: Callable[[Job[Opts]], A]  # the graph's outputs -> the answer
    graph: str = "main"
    preprocess: Callable[[Job[Opts]], Feeds] = model_inputs  # decoded images -> the graph's inputs
    render: Callable[[Job[Opts], A], Image.Image] | None = None  # the answer drawn over the image, for PNG answers
    # async work before the images are decoded, into `job.extra` (zero-shot: its labels' text embeddings)
    before: Callable[[Job[Opts], Settings], Awaitable[None]] | None = None

    async def __call__(
        self, registry: ModelRegistry, images: list[bytes], options: Opts, limits: ImageLimits, full_size: bool = False,
        model: ServedModel | None = None,
    ) -> tuple[Job[Opts], A]:  # fmt: skip
        """Runs every stage. `full_size`: decode at the original size (for pictures drawn over the
        image), not at the reduced scale the model input allows. `model`: the one the request holds
        already. The request's pixels count against the process's budget until it has its answer."""
        job = start_job(registry, self.task, self.graph, options, model)
        if self.before is not None:
            await self.before(job, registry.settings)
        with limits.claim() as claim:
            feeds = await decoded(job, images, limits, claim, full_size, self.preprocess)
            job.outputs = await self._run(job.model, feeds)
            with timed("postprocess"):
                return job, self.postprocess(job)

    def prepare(self, job: Job[Opts], images: list[bytes], limits: ImageLimits) -> Feeds:
        """The stages before the run (decode, preprocess) in the calling thread, outside the process's
        budget: for an offline run that forms its own batches (`vitserve predict`)."""
        return _prepare(job, open_all(images, limits, _model_mode(job, False)), None, None, False, self.preprocess)

    def finish(self, job: Job[Opts], outputs: list[np.ndarray]) -> A:
        """The stage after the run: the job's outputs (in any precision) -> its answer."""
        job.outputs = [_float32(output) for output in outputs]
        return self.postprocess(job)

    async def _run(self, model: ServedModel, feeds: Feeds) -> list[np.ndarray]:
        """The graph's outputs, in float32 whatever precision the graph ran in (the stages after it
        compute in float32); per-image feeds run each on its own, sharing batches with images of its size."""
        if isinstance(feeds, dict):
            return [_float32(o) for o in await model.run(feeds, graph=self.graph)]
        runs = await asyncio.gather(*(model.run(feed, graph=self.graph) for feed in feeds))
        return [ragged([_float32(run[k]) for run in runs]) for k in range(len(runs[0]))]


def start_job(
    registry: ModelRegistry, task: str, graph: str, options: Opts, model: ServedModel | None = None
) -> Job[Opts]:
    """The request's model: `model` where it holds one already (/v2's image view, which picked it
    before reading the body: a version replaced since finishes what it holds), else the one it
    names, or the first ready one of the task (404 or 503 else)."""
    model = model or registry.resolve(options.model, task, graph, options.version)
    assert model.manifest is not None  # resolve returns ready models only
    return Job(model, model.manifest, options, graph)


P = TypeVar("P")  # what a preprocess makes of a job's decoded images


async def decoded(
    job: Job[Opts], images: list[bytes], limits: ImageLimits, claim: Claim, full_size: bool,
    preprocess: Callable[[Job[Opts]], P],
) -> P:  # fmt: skip
    """The one image path: each image's header checked, its pixels taken from the process's budget,
    decoded (at the reduced scale the model's input allows, unless `full_size`) into `job.images`,
    then `preprocess(job)`. Off the event loop where the images are big."""
    if sum(len(data) for data in images) > INLINE_BYTES:  # big decodes never block the event loop
        return await limits.run(_open_and_prepare, job, images, limits, claim, full_size, preprocess)
    opened = open_all(images, limits, _model_mode(job, full_size))
    if sum(image.pixels for image in opened) > INLINE_PIXELS:
        return await limits.run(_prepare, job, opened, limits, claim, full_size, preprocess)
    return _prepare(job, opened, None, None, full_size, preprocess)  # a few thousand pixels: not worth the lock


def _open_and_prepare(
    job: Job[Opts], images: list[bytes], limits: ImageLimits, claim: Claim, full_size: bool,
    preprocess: Callable[[Job[Opts]], P],
) -> P:  # fmt: skip
    return _prepare(job, open_all(images, limits, _model_mode(job, full_size)), limits, claim, full_size, preprocess)


def _model_mode(job: Job[Any], full_size: bool) -> str | None:
    """The colour mode the request's images are converted to at full size (None: kept as decoded)."""
    return None if full_size else job.manifest.preprocessing.color_mode


def _prepare(
    job: Job[Opts], images: list[Opened], limits: ImageLimits | None, claim: Claim | None, full_size: bool,
    preprocess: Callable[[Job[Opts]], P],
) -> P:  # fmt: skip
    if limits is not None and claim is not None:  # waits here, in a worker thread, for room
        limits.budget.take(sum(image.held(_model_mode(job, full_size)) for image in images), claim)
    job.images = decode_all(images, None if full_size else job.manifest.preprocessing, claim)
    with timed("preprocess"):
        return preprocess(job)


@dataclass
class Stream(Generic[A]):
    """A generation under way: its rows as they are decoded, then its answer. It holds the model's
    queue room and cache slots until `release` (idempotent), however it ends."""

    count: int  # images generated together
    rows: AsyncIterator[tuple[int, np.ndarray]]  # (row just decoded, every image's levels so far)
    answer: Callable[[np.ndarray], A]  # every image's levels -> the answer (PNG encoding: heavy)
    picture: Callable[[np.ndarray], Image.Image]  # the first image, for a PNG answer
    # tokens -> grey values 0-255 (or RGB triples, a palette model's), for rows shown as they come
    grey: Callable[[np.ndarray], np.ndarray]
    release: Callable[[], None]


@dataclass(frozen=True)
class StreamPipeline(Generic[Opts, P, A]):
    """A task's stages for a generation: pick the model, decode the request's images (a prime to
    complete, say) by the one image path, preprocess them, then `start` its steps through the
    model's shared decoding."""

    task: str
    options: type[Opts]
    preprocess: Callable[[Job[Opts]], P]  # decoded images -> what `start` takes
    start: Callable[[Job[Opts], P, ImageLimits], Stream[A]]

    async def __call__(
        self, registry: ModelRegistry, images: list[bytes], options: Opts, limits: ImageLimits
    ) -> Stream[A]:
        job = start_job(registry, self.task, "main", options)
        with limits.claim() as claim:
            prepared = await decoded(job, images, limits, claim, False, self.preprocess)
        return self.start(job, prepared, limits)
