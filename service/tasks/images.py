"""The path every image endpoint shares: read the images and options, pick the model, decode and
preprocess, run a graph (through the model's batcher)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np
from fastapi import Request
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from service.imaging import preprocess_request
from service.inputs import merge_options, read_images, wants_png
from service.manifest import Manifest
from service.repository import ModelRegistry, ServedModel
from service.settings import Settings


class ModelOptions(BaseModel):
    """Options of an image endpoint; subclasses add their own."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="model name (default: the first ready model for this task)")


Options = TypeVar("Options", bound=ModelOptions)


@dataclass
class ImageRun(Generic[Options]):
    options: Options
    model: ServedModel
    manifest: Manifest
    decoded: list[Image.Image]  # upright, at their original size
    outputs: list[np.ndarray]
    png: bool  # answer with one PNG (`render` or `Accept: image/png`)


async def run_on_images(
    request: Request, query: Options, registry: ModelRegistry, settings: Settings, task: str, graph: str = "main"
) -> ImageRun[Options]:
    images, body_options = await read_images(request, settings.max_images_per_request)
    options = merge_options(type(query), query, body_options)
    # only endpoints with a `render` option answer in PNG
    png = hasattr(options, "render") and wants_png(request, bool(options.render), len(images))
    model = registry.resolve(options.model, task, graph)
    manifest = model.manifest
    assert manifest is not None  # resolve returns ready models only
    decoded, batch = await preprocess_request(images, manifest.preprocessing, settings.max_image_pixels)
    outputs = await model.run({manifest.main.inputs[0].name: batch}, graph=graph)
    return ImageRun(options, model, manifest, decoded, outputs, png)
