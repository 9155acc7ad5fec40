"""The Open Inference Protocol's model side, shared by its two adapters: REST (`service/routes/v2.py`,
`service/routes/control.py`) and gRPC (`service/grpc_server.py`).

Each adapter only translates: its wire format to a `codec.InferRequest` and back, its errors to its
statuses. What a request means lives here, once: which model a name and version pick (`<name>`, the
raw ONNX graph, or `<name>_image`, the image view of a vision task), its metadata, readiness, the
run itself (the manifest's checks, the model's batcher, or the task's pipeline with its image
limits), and the repository calls (index, load, unload). Errors are `ServiceError` (its HTTP status
says what kind) or `codec.CodecError` (the client's malformed request)."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any, TypeVar

import anyio.to_thread
import numpy as np
from pydantic import ValidationError

from service import __version__
from service.budget import ImageLimits
from service.codec import FROM_MANIFEST, CodecError, InferRequest, model_inputs, requested
from service.errors import ServiceError
from service.manifest import Manifest, ModelConfig
from service.pipeline import INLINE_BYTES
from service.registry import ModelRegistry
from service.repository import ServedModel, mark_served
from service.routes.options import InvalidOptions, parse_options
from service.settings import Settings
from service.tasks.base import ImageView, Task
from service.text import clipped, quoted

T = TypeVar("T")
IMAGE_SUFFIX = "_image"
SERVER_NAME = "vitserve"
EXTENSIONS = ["binary_tensor_data", "model_repository"]


class ProtocolModel:
    """One model as the protocol sees it: a raw graph, or the image view of a vision model."""

    def __init__(
        self, model: ServedModel, image: ImageView[Any] | None = None, versions: list[int] | None = None
    ) -> None:
        self.model, self.image = model, image
        assert model.manifest is not None
        self.manifest = model.manifest
        self.name = model.name + (IMAGE_SUFFIX if image else "")
        self.versions = versions or [model.version]  # every version served

    def metadata(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "versions": [str(v) for v in self.versions],
            "platform": "vitserve_image" if self.image else "onnxruntime_onnx",
            "inputs": self._inputs(),
            "outputs": self._outputs(),
        }

    def _inputs(self) -> list[dict[str, Any]]:
        if self.image:
            return [{"name": "image", "datatype": "BYTES", "shape": [-1]}]
        return [_tensor_meta(t.name, t.dtype, t.shape) for t in self.manifest.main.inputs]

    def output_names(self) -> list[str]:
        return [output["name"] for output in self._outputs()]

    def _outputs(self) -> list[dict[str, Any]]:
        if self.image:
            return self.image.outputs
        return [_tensor_meta(t.name, t.dtype, t.shape) for t in self.manifest.main.outputs]


def _tensor_meta(name: str, dtype: str, shape: list[int | str]) -> dict[str, Any]:
    return {"name": name, "datatype": FROM_MANIFEST[dtype], "shape": [d if isinstance(d, int) else -1 for d in shape]}


def _image_view(tasks: dict[str, Task], model: ServedModel) -> ImageView[Any] | None:
    """The view of the first of its tasks that has one (CLIP: its embeddings; zero-shot has none)."""
    views = [task.view for name in (model.manifest.tasks if model.manifest else []) if (task := tasks.get(name))]
    return next((view for view in views if view is not None), None)


def protocol_model(
    registry: ModelRegistry, tasks: dict[str, Task], name: str, version: str | None = None
) -> ProtocolModel:
    """The model (either view) a request names, at that version or its highest: 404 where there is
    none, 503 where it is not ready (the registry's)."""
    image = name.endswith(IMAGE_SUFFIX) and name[: -len(IMAGE_SUFFIX)] in registry.models
    # digits, and few enough for int() (over 4300 it raises) and for Triton's int64
    if version is not None and not (version.isascii() and version.isdigit() and len(version) <= 18):
        raise ServiceError(404, "unknown_version", f"model {quoted(name)} has no version {quoted(version)}")
    base = name[: -len(IMAGE_SUFFIX)] if image else name
    model = registry.named(base, int(version) if version is not None else None)  # the registry's 404 and 503
    if image and _image_view(tasks, model) is None:
        raise ServiceError(404, "unknown_model", f"model {quoted(model.name)} has no image view")
    versions = sorted(registry.entries[base].versions, reverse=True)
    return ProtocolModel(mark_served(model), _image_view(tasks, model) if image else None, versions)


def protocol_models(registry: ModelRegistry, tasks: dict[str, Task]) -> list[ProtocolModel]:
    ready = [m for m in registry.models.values() if m.state == "ready" and m.manifest]
    images = [ProtocolModel(m, view) for m in ready if (view := _image_view(tasks, m))]
    return [ProtocolModel(m) for m in ready] + images


def server_metadata(registry: ModelRegistry, tasks: dict[str, Task]) -> dict[str, Any]:
    """Server name, version, extensions, and the models it serves (both views)."""
    return {"name": SERVER_NAME, "version": __version__, "extensions": EXTENSIONS,
            "models": [v.name for v in protocol_models(registry, tasks)]}  # fmt: skip


def server_ready(registry: ModelRegistry, draining: bool) -> bool:
    """Every model loaded and warmed up, and no SIGTERM yet."""
    return bool(registry.ready and not draining)


# inference ----------------------------------------------------------------------------------------


async def off_loop(big: bool, work: Callable[..., T], *args: Any) -> T:
    """`work(*args)`, in a worker thread where it is big enough to hold up other requests."""
    return await anyio.to_thread.run_sync(partial(work, *args)) if big else work(*args)


async def infer(
    registry: ModelRegistry,
    view: ProtocolModel,
    parsed: InferRequest,
    settings: Settings,
    limits: ImageLimits,
    big: bool = False,
) -> dict[str, np.ndarray]:
    """The request run on its model: the raw graph's outputs by name, or the image view's tensors.
    `big`: the request is big enough to check off the event loop."""
    requested(parsed, view.output_names())  # an unknown output is refused before the model runs
    if view.image:
        return await infer_images(registry, view, view.image, parsed, settings, limits)
    specs = view.manifest.main.inputs
    feeds = await off_loop(big, model_inputs, parsed.inputs, specs)
    check_free_axes(feeds, view.manifest)
    results = await view.model.run(feeds)
    return {spec.name: array for spec, array in zip(view.manifest.main.outputs, results, strict=True)}


def outputs_big(outputs: dict[str, np.ndarray]) -> bool:
    return sum(array.nbytes for array in outputs.values()) > INLINE_BYTES


def check_free_axes(feeds: dict[str, np.ndarray], manifest: Manifest) -> None:
    """Free axes past the batch (an image's own height and width, for a detector that keeps each
    image's size) hold at least the preprocessing's smallest side (1; YOLOS: 16) and at most what it
    makes (a long thin tensor costs an attention graph memory quadratic in its length)."""
    longest = max(manifest.preprocessing.size)  # either side of a kept-aspect input is at most this
    least = manifest.preprocessing.smallest_side
    bounds = {"height": longest, "width": longest}
    for spec in manifest.main.inputs:
        for axis, dim in enumerate(spec.shape[1:], start=1):
            if not isinstance(dim, str):
                continue
            size, most = feeds[spec.name].shape[axis], bounds.get(dim)
            if size < least or (most is not None and size > most):
                within = f"{least} to {most}" if most is not None else f"at least {least}"
                raise CodecError(f"input {quoted(spec.name)}: its {dim} axis is {size}; the model takes {within}")


def _images(parsed: InferRequest, max_images: int) -> list[bytes]:
    if set(parsed.inputs) != {"image"}:
        raise CodecError("an image view takes one input, 'image'")
    images = parsed.inputs["image"]
    if images.dtype != object or images.ndim != 1:
        raise CodecError("input 'image' must be BYTES of shape [n]: encoded images")
    if images.size == 0:
        raise CodecError("input 'image' holds no image")
    if images.size > max_images:
        raise ServiceError(400, "too_many_images", f"{images.size} images in one request; the limit is {max_images}")
    return [bytes(item) for item in images]


# Request parameters that belong to the protocol (Triton's and KServe's clients send them), not to a task.
PROTOCOL_PARAMETERS = {"binary_data_output", "priority", "timeout", "sequence_id", "sequence_start", "sequence_end"}


async def infer_images(
    registry: ModelRegistry,
    view: ProtocolModel,
    image: ImageView[Any],
    parsed: InferRequest,
    settings: Settings,
    limits: ImageLimits,
) -> dict[str, np.ndarray]:
    """The image view: BYTES images through the task's pipeline, its options from the request's
    parameters, validated by the same model as /v1's; its answer as the task's tensors."""
    images = _images(parsed, limits.max_images)
    options = {k: v for k, v in parsed.parameters.items() if k not in PROTOCOL_PARAMETERS}
    if options.get("render") or options.get("model", view.model.name) != view.model.name or "version" in options:
        raise CodecError("an image view answers tensors of its own model: no render, no model, no version")
    own = {"model": view.model.name, "version": view.model.version}
    try:
        parsed_options = parse_options(image.pipeline.options, {}, {**options, **own})
    except InvalidOptions as exc:
        raise CodecError(invalid_options(exc.errors())) from None
    _, answer = await image.pipeline(registry, images, parsed_options, limits, model=view.model)
    return image.tensors(answer)


def invalid_options(errors: Any, most: int = 3) -> str:
    """`parameter 'top_k': Input should be greater than or equal to 1; ...`: the first few errors, their
    names cut short (a client's parameter names are its own text)."""
    found = [(".".join(str(p) for p in e.get("loc", ())[1:]), e.get("msg", "")) for e in errors]
    shown = [f"parameter {quoted(where)}: {clipped(msg, 256)}" if where else clipped(msg, 256)
             for where, msg in found[:most]]  # fmt: skip
    return "; ".join(shown) + ("; ..." if len(found) > most else "")


# the model repository (Triton's extension) ---------------------------------------------------------


def repository_index(registry: ModelRegistry, ready_only: bool) -> list[dict[str, Any]]:
    """Every model folder of the repository, each version with its state (READY ones only: `ready_only`)."""
    return registry.index(ready_only=ready_only)


def _controlled(settings: Settings, action: str) -> None:
    if settings.model_control_mode != "explicit":
        mode = settings.model_control_mode
        raise ServiceError(400, "model_control_disabled", f"explicit model {action} is not allowed in model control "
                           f"mode {mode!r}; start with --model-control-mode explicit")  # fmt: skip


def load_config(parameters: dict[str, Any]) -> ModelConfig | None:
    """A load's `config` parameter (JSON, as Triton takes it): its version policy, in place of the
    model's config.json. Model files sent with the load are not taken: they belong in the repository."""
    if files := [name for name in parameters if name.startswith("file:")]:
        raise ServiceError(400, "invalid_request", f"model files in a load call ({clipped(files[0], 64)}) are not "
                           "taken: put the version folder in the repository, then load")  # fmt: skip
    config = parameters.get("config")
    if config is None:
        return None
    try:
        return ModelConfig.model_validate_json(config) if isinstance(config, str) else ModelConfig(**config)
    except (ValidationError, TypeError) as exc:
        raise ServiceError(400, "invalid_request", f"config: {clipped(str(exc), 300)} (this service reads a "
                           "model config's version_policy only)") from None  # fmt: skip


async def load(registry: ModelRegistry, settings: Settings, name: str, parameters: dict[str, Any]) -> None:
    """Loads the model, or brings it up to date: new or changed versions load and warm up beside
    those serving and replace them once ready; a version that fails changes nothing that serves,
    and the answer says why."""
    _controlled(settings, "load")
    await registry.load(name, load_config(parameters))


async def unload(registry: ModelRegistry, settings: Settings, name: str) -> None:
    """Takes the model out of service: new requests for it get 404 at once; returns once the requests
    it was serving are done and its memory is freed."""
    _controlled(settings, "unload")
    await registry.unload(name)
