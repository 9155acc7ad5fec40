"""The one pipeline every image endpoint runs: pick the model, decode, preprocess, run a graph
through the model's batcher, postprocess. A task writes each stage once, as an `ImagePipeline`;
the /v1 routes, the /v2 image views and the attention routes only adapt requests to it and its
answer to their format. Nothing here knows HTTP."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from service.budget import Claim, ImageLimits
from service.context import timed
from service.imaging import Decoded, Opened, decode_all, open_all, preprocess_batch
from service.manifest import Manifest
from service.repository import ModelRegistry, ServedModel


class ModelOptions(BaseModel):
    """Options of an image pipeline, from /v1's query string and body or /v2's parameters."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="model name (default: the first ready model for this task)")


Opts = TypeVar("Opts", bound=ModelOptions)  # a pipeline's options
A = TypeVar("A", bound=BaseModel)  # its answer


@dataclass(slots=True)
class Batch(Generic[Opts]):
    """One request's images on their way through the stages."""

    model: ServedModel
    manifest: Manifest
    options: Opts
    graph: str
    images: list[Decoded] = field(default_factory=list)
    outputs: list[np.ndarray] = field(default_factory=list)


def model_inputs(batch: Batch[Any]) -> dict[str, np.ndarray]:
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
    postprocess: Callable[[Batch[Opts]], A]  # the graph's outputs -> the answer
    graph: str = "main"
    preprocess: Callable[[Batch[Opts]], Feeds] = model_inputs  # decoded images -> the graph's inputs
    render: Callable[[Batch[Opts], A], Image.Image] | None = None  # the answer drawn over the image, for PNG answers

    async def __call__(
        self, registry: ModelRegistry, images: list[bytes], options: Opts, limits: ImageLimits, full_size: bool = False
    ) -> tuple[Batch[Opts], A]:
        """Runs every stage. `full_size`: decode at the original size (for pictures drawn over the
        image), not at the reduced scale the model input allows. The request's pixels count against
        the process's budget until it has its answer."""
        model = registry.resolve(options.model, self.task, self.graph)
        assert model.manifest is not None  # resolve returns ready models only
        batch = Batch(model, model.manifest, options, self.graph)
        with limits.claim() as claim:
            if sum(len(data) for data in images) > INLINE_BYTES:  # big decodes never block the event loop
                feeds = await limits.run(self._open_and_prepare, batch, images, limits, claim, full_size)
            else:
                opened = open_all(images, limits)
                if sum(image.pixels for image in opened) > INLINE_PIXELS:
                    feeds = await limits.run(self._prepare, batch, opened, limits, claim, full_size)
                else:  # a few thousand pixels: not worth the budget's lock
                    feeds = self._prepare(batch, opened, None, None, full_size)
            batch.outputs = await self._run(model, feeds)
            with timed("postprocess"):
                return batch, self.postprocess(batch)

    async def _run(self, model: ServedModel, feeds: Feeds) -> list[np.ndarray]:
        """The graph's outputs, in float32 whatever precision the graph ran in (the stages after it
        compute in float32); per-image feeds run each on its own, sharing batches with images of its size."""
        if isinstance(feeds, dict):
            return [_float32(o) for o in await model.run(feeds, graph=self.graph)]
        runs = await asyncio.gather(*(model.run(feed, graph=self.graph) for feed in feeds))
        return [ragged([_float32(run[k]) for run in runs]) for k in range(len(runs[0]))]

    def _open_and_prepare(
        self, batch: Batch[Opts], images: list[bytes], limits: ImageLimits, claim: Claim, full_size: bool
    ) -> Feeds:
        return self._prepare(batch, open_all(images, limits), limits, claim, full_size)

    def _prepare(
        self,
        batch: Batch[Opts],
        images: list[Opened],
        limits: ImageLimits | None,
        claim: Claim | None,
        full_size: bool,
    ) -> Feeds:
        if limits is not None and claim is not None:  # waits here, in a worker thread, for room
            limits.budget.take(sum(image.pixels for image in images), claim)
        batch.images = decode_all(images, None if full_size else batch.manifest.preprocessing, claim)
        with timed("preprocess"):
            return self.preprocess(batch)
