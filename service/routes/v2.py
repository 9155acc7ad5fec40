"""The Open Inference Protocol (KServe v2, as Triton speaks it), with Triton's binary tensor extension.

Each model shows two views: `<name>`, its raw ONNX graph (tensors in, tensors out, as its manifest
says), and, for classification and detection, `<name>_image`, which takes encoded images as BYTES and
answers with the same labels, scores and boxes as /v1. Both run through the model's batcher.
Errors are `{"error": "..."}` with Triton's statuses: 400 invalid, 404 unknown model, 503 unavailable.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Annotated, Any, Literal, TypeVar

import numpy as np
from fastapi import APIRouter, Depends, Header, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from service import __version__
from service.budget import ImageLimits
from service.codec import (
    FROM_MANIFEST,
    HEADER_LENGTH,
    CodecError,
    InferRequest,
    encode_response,
    model_inputs,
    parse_request,
    requested,
)
from service.deps import RegistryDep, SettingsDep
from service.errors import ServiceError
from service.manifest import Manifest
from service.pipeline import INLINE_BYTES
from service.registry import ModelRegistry
from service.repository import ServedModel, mark_served
from service.routes.options import parse_options
from service.settings import Settings
from service.tasks.base import ImageView, Task
from service.text import clipped, quoted

T = TypeVar("T")
IMAGE_SUFFIX = "_image"


class V2Route(APIRoute):
    """Answers errors in the protocol's shape, `{"error": "..."}`."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def protocol_errors(request: Request) -> Response:
            try:
                return await handler(request)
            except ServiceError as exc:
                status = exc.status if exc.status in (404, 503) else 400
                return JSONResponse({"error": clipped(exc.message)}, status_code=status, headers=exc.headers)
            except RequestValidationError as exc:
                return JSONResponse({"error": _invalid(exc)}, status_code=400)
            except CodecError as exc:
                return JSONResponse({"error": clipped(exc)}, status_code=400)

        return protocol_errors


async def _tasks(request: Request) -> dict[str, Task]:
    tasks: dict[str, Task] = request.app.state.tasks
    return tasks


TasksDep = Annotated[dict[str, Task], Depends(_tasks)]


def _invalid(exc: RequestValidationError, most: int = 3) -> str:
    """`parameter 'top_k': Input should be greater than or equal to 1; ...`: the first few errors, their
    names cut short (a client's parameter names are its own text)."""
    errors = [(".".join(str(p) for p in e.get("loc", ())[1:]), e.get("msg", "")) for e in exc.errors()]
    shown = [f"parameter {quoted(where)}: {clipped(msg, 256)}" if where else clipped(msg, 256)
             for where, msg in errors[:most]]  # fmt: skip
    return "; ".join(shown) + ("; ..." if len(errors) > most else "")


router = APIRouter(prefix="/v2", tags=["open inference protocol (v2)"], route_class=V2Route)


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
    task = tasks.get(model.manifest.task) if model.manifest else None
    return task.view if task else None


def protocol_model(
    registry: ModelRegistry, tasks: dict[str, Task], name: str, version: str | None = None
) -> ProtocolModel:
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


# server and model endpoints -------------------------------------------------------------------------


@router.get("")
async def server_metadata(registry: RegistryDep, tasks: TasksDep) -> dict[str, Any]:
    """Server name, version, extensions, and the models it serves (both views)."""
    return {
        "name": "vitserve",
        "version": __version__,
        "extensions": ["binary_tensor_data", "model_repository"],
        "models": [v.name for v in protocol_models(registry, tasks)],
    }


# Health answers KServe's bodies (its client reads them) with the statuses Triton's client reads.
class ServerLive(BaseModel):
    live: bool


class ServerReady(BaseModel):
    ready: bool


class ModelReady(BaseModel):
    name: str
    ready: bool


class ProtocolError(BaseModel):
    error: str


MODEL_READY_ERRORS: dict[int | str, dict[str, Any]] = {
    404: {"model": ProtocolError, "description": "unknown model or version"},
    503: {"model": ProtocolError, "description": "the model is not ready"},
}


@router.get("/health/live")
async def live() -> ServerLive:
    """`{"live": true}` while the process answers."""
    return ServerLive(live=True)


@router.get("/health/ready", responses={503: {"model": ServerReady, "description": "not ready, or draining"}})
async def ready(request: Request, registry: RegistryDep, response: Response) -> ServerReady:
    """`{"ready": true}` once every model is loaded and warmed up; else 503 and `{"ready": false}`."""
    is_ready = bool(registry.ready and not request.app.state.draining)
    if not is_ready:
        response.status_code = 503
    return ServerReady(ready=is_ready)


@router.get("/models/{name}")
@router.get("/models/{name}/versions/{version}")
async def model_metadata(
    registry: RegistryDep, tasks: TasksDep, name: str, version: str | None = None
) -> dict[str, Any]:
    return protocol_model(registry, tasks, name, version).metadata()


@router.get("/models/{name}/ready", responses=MODEL_READY_ERRORS)
@router.get("/models/{name}/versions/{version}/ready", responses=MODEL_READY_ERRORS)
async def model_ready(registry: RegistryDep, tasks: TasksDep, name: str, version: str | None = None) -> ModelReady:
    """`{"name": ..., "ready": true}`; 404 for an unknown model or version, 503 for one not loaded."""
    return ModelReady(name=protocol_model(registry, tasks, name, version).name, ready=True)


# inference ----------------------------------------------------------------------------------------


class RequestInput(BaseModel):
    name: str
    shape: list[Annotated[int, Field(ge=0)]]
    datatype: Literal["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
                      "FP16", "FP32", "FP64", "BYTES"]  # fmt: skip
    parameters: dict[str, Any] | None = Field(None, description="`binary_data_size`: its bytes after the header")
    data: list[Any] | None = Field(None, description="flat, or nested as the shape")


class RequestOutput(BaseModel):
    name: str
    parameters: dict[str, Any] | None = Field(None, description="`binary_data`: true for binary after the JSON")


class InferenceRequest(BaseModel):
    """The protocol's inference request (the schema only: `service.codec` parses it, strictly)."""

    id: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="image views: the task's options; `binary_data_output`")
    inputs: list[RequestInput] = Field(min_length=1)
    outputs: list[RequestOutput] | None = None


def _inlined(schema: dict[str, Any]) -> dict[str, Any]:
    """A JSON schema with its `$defs` put in place (a request body's schema cannot point into itself)."""
    defs = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            return inline(defs[ref.rsplit("/", 1)[-1]]) if ref else {k: inline(v) for k, v in node.items()}
        return [inline(v) for v in node] if isinstance(node, list) else node

    result: dict[str, Any] = inline(schema)
    return result


INFER_OPENAPI: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": _inlined(InferenceRequest.model_json_schema())},
            "application/octet-stream": {
                "schema": {"type": "string", "format": "binary"},
                "description": f"the JSON header ({HEADER_LENGTH} bytes), then the binary tensors",
            },
        },
    }
}
INFER_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "the outputs: JSON, or with binary outputs a JSON head then their bytes",
        "content": {"application/json": {}, "application/octet-stream": {}},
    },
    400: {"model": ProtocolError, "description": "a malformed request, or one the model cannot take"},
    **MODEL_READY_ERRORS,
}


@router.post("/models/{name}/infer", openapi_extra=INFER_OPENAPI, responses=INFER_RESPONSES)
@router.post("/models/{name}/versions/{version}/infer", openapi_extra=INFER_OPENAPI, responses=INFER_RESPONSES)
async def infer(
    request: Request,
    registry: RegistryDep,
    tasks: TasksDep,
    settings: SettingsDep,
    name: str,
    version: str | None = None,
    header_length: Annotated[str | None, Header(alias=HEADER_LENGTH)] = None,
) -> Response:
    """Inference with JSON tensors, or Triton's binary tensor data extension (the JSON header's
    length in `Inference-Header-Content-Length`, raw tensors after it)."""
    view = protocol_model(registry, tasks, name, version)
    body = await request.body()
    # big tensors parse, check and encode off the event loop (a long JSON tensor takes a second)
    parsed = await _off_loop(len(body) > INLINE_BYTES, parse_request, body, header_length)
    requested(parsed, view.output_names())  # an unknown output is refused before the model runs
    if view.image:
        limits = request.app.state.image_limits
        outputs = await infer_images(registry, view, view.image, parsed, settings, limits)
    else:
        specs = view.manifest.main.inputs
        feeds = await _off_loop(len(body) > INLINE_BYTES, model_inputs, parsed.inputs, specs)
        check_free_axes(feeds, view.manifest)
        results = await view.model.run(feeds)
        outputs = {spec.name: array for spec, array in zip(view.manifest.main.outputs, results, strict=True)}
    big = sum(array.nbytes for array in outputs.values()) > INLINE_BYTES
    head, blobs = await _off_loop(big, encode_response, view.name, str(view.manifest.version), parsed, outputs)
    if not blobs:
        return Response(head, media_type="application/json")
    return Response(
        head + b"".join(blobs), media_type="application/octet-stream", headers={HEADER_LENGTH: str(len(head))}
    )


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


async def _off_loop(big: bool, work: Callable[..., T], *args: Any) -> T:
    """`work(*args)`, in a worker thread where it is big enough to hold up other requests."""
    return await run_in_threadpool(work, *args) if big else work(*args)


# image views ----------------------------------------------------------------------------------------


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
    parsed_options = parse_options(image.pipeline.options, {}, {**options, **own})
    _, answer = await image.pipeline(registry, images, parsed_options, limits, model=view.model)
    return image.tensors(answer)
