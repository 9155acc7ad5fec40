"""The Open Inference Protocol (KServe v2, as Triton speaks it), with Triton's binary tensor extension.

Each model shows two views: `<name>`, its raw ONNX graph (tensors in, tensors out, as its manifest
says), and, for classification and detection, `<name>_image`, which takes encoded images as BYTES and
answers with the same labels, scores and boxes as /v1. Both run through the model's batcher.
Errors are `{"error": "..."}` with Triton's statuses: 400 invalid, 404 unknown model, 503 unavailable.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Coroutine
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Depends, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel
from pydantic_core import to_json

from service import __version__
from service.budget import ImageLimits
from service.deps import RegistryDep, SettingsDep
from service.errors import ServiceError, quoted
from service.manifest import TensorSpec
from service.repository import ModelRegistry, ServedModel, served
from service.routes.v1 import parse_options
from service.settings import Settings
from service.tasks.base import Task, TensorView

DATATYPES = {
    "BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
    "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
    "FP16": np.float16, "FP32": np.float32, "FP64": np.float64, "BYTES": np.object_,
}  # fmt: skip
FROM_MANIFEST = {
    "float32": "FP32",
    "float16": "FP16",
    "int64": "INT64",
    "int32": "INT32",
    "uint8": "UINT8",
    "bool": "BOOL",
}
IMAGE_SUFFIX = "_image"
HEADER_LENGTH = "Inference-Header-Content-Length"


class V2Route(APIRoute):
    """Answers errors in the protocol's shape, `{"error": "..."}`."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def protocol_errors(request: Request) -> Response:
            try:
                return await handler(request)
            except ServiceError as exc:
                status = exc.status if exc.status in (404, 503) else 400
                return JSONResponse({"error": exc.message}, status_code=status, headers=exc.headers)
            except RequestValidationError as exc:
                return JSONResponse({"error": _invalid(exc)}, status_code=400)

        return protocol_errors


async def _tasks(request: Request) -> dict[str, Task]:
    tasks: dict[str, Task] = request.app.state.tasks
    return tasks


TasksDep = Annotated[dict[str, Task], Depends(_tasks)]


def _invalid(exc: RequestValidationError) -> str:
    """`parameter top_k: Input should be greater than or equal to 1; ...`"""
    errors = [(".".join(str(p) for p in e.get("loc", ())[1:]), e.get("msg", "")) for e in exc.errors()]
    return "; ".join(f"parameter {where}: {msg}" if where else msg for where, msg in errors)


router = APIRouter(prefix="/v2", tags=["open inference protocol (v2)"], route_class=V2Route)


class View:
    """One model as the protocol sees it: a raw graph, or the image view of a vision model."""

    def __init__(self, model: ServedModel, image: TensorView[Any] | None = None) -> None:
        self.model, self.image = model, image
        assert model.manifest is not None
        self.manifest = model.manifest
        self.name = model.name + (IMAGE_SUFFIX if image else "")

    def metadata(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "versions": [str(self.manifest.version)],
            "platform": "vitserve_image" if self.image else "onnxruntime_onnx",
            "inputs": self._inputs(),
            "outputs": self._outputs(),
        }

    def _inputs(self) -> list[dict[str, Any]]:
        if self.image:
            return [{"name": "image", "datatype": "BYTES", "shape": [-1]}]
        return [_tensor_meta(t.name, t.dtype, t.shape) for t in self.manifest.main.inputs]

    def _outputs(self) -> list[dict[str, Any]]:
        if self.image:
            return self.image.outputs
        return [_tensor_meta(t.name, t.dtype, t.shape) for t in self.manifest.main.outputs]


def _tensor_meta(name: str, dtype: str, shape: list[int | str]) -> dict[str, Any]:
    return {"name": name, "datatype": FROM_MANIFEST[dtype], "shape": [d if isinstance(d, int) else -1 for d in shape]}


def _image_view(tasks: dict[str, Task], model: ServedModel) -> TensorView[Any] | None:
    task = tasks.get(model.manifest.task) if model.manifest else None
    return task.view if task else None


def find_view(registry: ModelRegistry, tasks: dict[str, Task], name: str, version: str | None = None) -> View:
    image = name.endswith(IMAGE_SUFFIX) and name[: -len(IMAGE_SUFFIX)] in registry.models
    model = registry.models.get(name[: -len(IMAGE_SUFFIX)] if image else name)
    if model is None or (image and model.manifest and _image_view(tasks, model) is None):
        raise ServiceError(404, "unknown_model", f"unknown model {quoted(name)}")
    if model.state != "ready" or model.manifest is None:
        raise ServiceError(503, "model_not_ready", f"model {name!r} is not ready: {model.reason}")
    if version is not None and version != str(model.manifest.version):
        raise ServiceError(404, "unknown_version", f"model {quoted(name)} has no version {quoted(version)}")
    return View(served(model), _image_view(tasks, model) if image else None)


def views(registry: ModelRegistry, tasks: dict[str, Task]) -> list[View]:
    ready = [m for m in registry.models.values() if m.state == "ready" and m.manifest]
    images = [View(m, view) for m in ready if (view := _image_view(tasks, m))]
    return [View(m) for m in ready] + images


# server and model endpoints -------------------------------------------------------------------------


@router.get("")
async def server_metadata(registry: RegistryDep, tasks: TasksDep) -> dict[str, Any]:
    """Server name, version, extensions, and the models it serves (both views)."""
    return {
        "name": "vitserve",
        "version": __version__,
        "extensions": ["binary_tensor_data"],
        "models": [v.name for v in views(registry, tasks)],
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
    return find_view(registry, tasks, name, version).metadata()


@router.get("/models/{name}/ready", responses=MODEL_READY_ERRORS)
@router.get("/models/{name}/versions/{version}/ready", responses=MODEL_READY_ERRORS)
async def model_ready(registry: RegistryDep, tasks: TasksDep, name: str, version: str | None = None) -> ModelReady:
    """`{"name": ..., "ready": true}`; 404 for an unknown model or version, 503 for one not loaded."""
    return ModelReady(name=find_view(registry, tasks, name, version).name, ready=True)


# inference ----------------------------------------------------------------------------------------


@router.post("/models/{name}/infer")
@router.post("/models/{name}/versions/{version}/infer")
async def infer(
    request: Request,
    registry: RegistryDep,
    tasks: TasksDep,
    settings: SettingsDep,
    name: str,
    version: str | None = None,
) -> Response:
    """Inference with JSON tensors, or Triton's binary tensor data extension (the JSON header's
    length in `Inference-Header-Content-Length`, raw tensors after it)."""
    view = find_view(registry, tasks, name, version)
    header, inputs = parse_request(await request.body(), request.headers.get(HEADER_LENGTH))
    if view.image:
        limits = request.app.state.image_limits
        outputs = await infer_images(registry, view, view.image, inputs, header, settings, limits)
    else:
        feeds = {spec.name: checked(_input(inputs, spec.name), spec) for spec in view.manifest.main.inputs}
        if len({len(array) for array in feeds.values()}) > 1:
            raise ServiceError(400, "invalid_request", "every input must have the same batch size")
        results = await view.model.run(feeds)
        outputs = {spec.name: array for spec, array in zip(view.manifest.main.outputs, results, strict=True)}
    return encode_response(view, header, outputs)


def checked(array: np.ndarray, spec: TensorSpec) -> np.ndarray:
    """The array as the graph's dtype, if its shape fits (fixed axes equal, same rank), its values
    survive the cast (no text, no fractions or out-of-range numbers into integers) and lie in the
    manifest's range: an input that would fail the graph never joins a batch."""
    shape, dtype = spec.shape, spec.dtype
    if len(array.shape) != len(shape) or any(
        isinstance(d, int) and d != a for d, a in zip(shape, array.shape, strict=True)
    ):
        wanted = [d if isinstance(d, int) else -1 for d in shape]
        raise ServiceError(400, "invalid_request", f"an input has shape {list(array.shape)}; the model takes {wanted}")
    if array.dtype == object:
        raise ServiceError(400, "invalid_request", f"an input is BYTES; the model takes {FROM_MANIFEST[dtype]}")
    with np.errstate(invalid="ignore"):  # NaN or 1e300 into an integer: refused just below
        cast = array.astype(dtype)
    if np.issubdtype(cast.dtype, np.integer) and not np.array_equal(cast, array):
        raise ServiceError(400, "invalid_request", f"an input holds values that are not {FROM_MANIFEST[dtype]}")
    if spec.range is not None and cast.size and not (spec.range[0] <= cast.min() and cast.max() <= spec.range[1]):
        low, high = spec.range
        message = f"input {quoted(spec.name)} holds values outside [{low:g}, {high:g}]"
        raise ServiceError(400, "invalid_request", message)
    return cast


def _input(inputs: dict[str, np.ndarray], name: str) -> np.ndarray:
    if name not in inputs:
        raise ServiceError(400, "invalid_request", f"input {quoted(name)} is missing; the model takes it")
    return inputs[name]


def parse_request(body: bytes, header_length: str | None) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The JSON header and every input as a numpy array (BYTES as an object array of bytes)."""
    try:
        split = int(header_length) if header_length is not None else len(body)
        if not 0 <= split <= len(body):
            raise ValueError(f"{HEADER_LENGTH} {split} is outside the body's {len(body)} bytes")
        header = json.loads(body[:split])
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # RecursionError: JSON nested too deep
        raise ServiceError(400, "invalid_request", f"the request header is not valid JSON: {exc}") from exc
    if not isinstance(header, dict) or not isinstance(header.get("inputs"), list):
        raise ServiceError(400, "invalid_request", 'the request needs "inputs": a list of tensors')
    outputs, parameters = header.get("outputs", []), header.get("parameters", {})
    if not isinstance(outputs, list) or not all(isinstance(o, dict) for o in outputs):
        raise ServiceError(400, "invalid_request", '"outputs" must be a list of objects')
    if not isinstance(parameters, dict | None):
        raise ServiceError(400, "invalid_request", '"parameters" must be an object')
    binary, offset, inputs = body[split:], 0, {}
    for tensor in header["inputs"]:
        try:
            name, shape, datatype = tensor["name"], tensor["shape"], tensor["datatype"]
            if not all(isinstance(d, int) and d >= 0 for d in shape):
                raise ValueError(f"dims must be whole numbers of at least 0, not {quoted(shape)}")
            size = (tensor.get("parameters") or {}).get("binary_data_size")
            if size is not None:
                if not isinstance(size, int) or not 0 <= size <= len(binary) - offset:
                    raise ValueError(f"binary_data_size {quoted(size)} is more than the body holds")
                inputs[name] = from_bytes(binary[offset : offset + size], datatype, shape)
                offset += size
            else:
                inputs[name] = from_json(tensor["data"], datatype, shape)
        except (KeyError, TypeError, ValueError, AttributeError, struct.error, RecursionError) as exc:
            raise ServiceError(400, "invalid_request", f"input tensor is malformed: {quoted(repr(exc), 200)}") from exc
    return header, inputs


def from_json(data: list[Any], datatype: str, shape: list[int]) -> np.ndarray:
    if datatype == "BYTES":
        items = np.asarray(data, dtype=object).ravel()
        if not all(isinstance(item, str) for item in items):  # bytes(10**13) would allocate 10 TB
            raise ValueError("BYTES data in JSON must be strings")
        return np.array([item.encode() for item in items], dtype=object).reshape(shape)
    return np.asarray(data, dtype=DATATYPES[datatype]).reshape(shape)


def from_bytes(raw: bytes, datatype: str, shape: list[int]) -> np.ndarray:
    if datatype != "BYTES":
        return np.frombuffer(raw, dtype=DATATYPES[datatype]).reshape(shape)
    items, at = [], 0
    while at < len(raw):  # each element: a 4-byte little-endian length, then the bytes
        (length,) = struct.unpack_from("<I", raw, at)
        if at + 4 + length > len(raw):
            raise ValueError(f"a BYTES element of {length} bytes runs past its tensor's {len(raw)}")
        items.append(raw[at + 4 : at + 4 + length])
        at += 4 + length
    return np.array(items, dtype=object).reshape(shape)


def to_bytes(array: np.ndarray) -> bytes:
    if array.dtype != object:
        return np.ascontiguousarray(array).tobytes()
    return b"".join(struct.pack("<I", len(item)) + item for item in array.ravel())


def datatype_of(array: np.ndarray) -> str:
    return next(name for name, dtype in DATATYPES.items() if np.dtype(dtype) == array.dtype)


def encode_response(view: View, header: dict[str, Any], outputs: dict[str, np.ndarray]) -> Response:
    """The chosen outputs (all by default), as JSON data or, where asked, binary after the JSON."""
    wanted = header.get("outputs") or [{"name": name} for name in outputs]
    all_binary = bool((header.get("parameters") or {}).get("binary_data_output", False))
    tensors, blobs = [], []
    for request in wanted:
        name, parameters = request.get("name"), request.get("parameters") or {}
        if not isinstance(name, str) or name not in outputs:
            raise ServiceError(400, "invalid_request", f"output {quoted(name)} is not one of {list(outputs)}")
        if not isinstance(parameters, dict):
            raise ServiceError(400, "invalid_request", f"output {quoted(name)}: its parameters must be an object")
        array = outputs[name]
        tensor: dict[str, Any] = {"name": name, "datatype": datatype_of(array), "shape": list(array.shape)}
        if parameters.get("binary_data", all_binary):
            blob = to_bytes(array)
            tensor["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            flat = array.ravel()
            tensor["data"] = [b.decode(errors="replace") for b in flat] if array.dtype == object else flat.tolist()
        tensors.append(tensor)
    body: dict[str, Any] = {"model_name": view.name, "model_version": str(view.manifest.version), "outputs": tensors}
    if "id" in header:
        body["id"] = header["id"]
    # pydantic-core's compiled encoder (long tensors as JSON lists are its strength); NaN and infinities,
    # which JSON lacks, as null, as KServe's own server writes them
    head = to_json(body, inf_nan_mode="null")
    if not blobs:
        return Response(head, media_type="application/json")
    return Response(
        head + b"".join(blobs), media_type="application/octet-stream", headers={HEADER_LENGTH: str(len(head))}
    )


# image views ----------------------------------------------------------------------------------------


def _images(inputs: dict[str, np.ndarray], max_images: int) -> list[bytes]:
    images = _input(inputs, "image")
    if images.dtype != object:
        raise ServiceError(400, "invalid_request", "input 'image' must be BYTES (encoded images)")
    if images.size > max_images:
        raise ServiceError(400, "too_many_images", f"{images.size} images in one request; the limit is {max_images}")
    return [bytes(item) for item in images.ravel()]


# Request parameters that belong to the protocol (Triton's and KServe's clients send them), not to a task.
PROTOCOL_PARAMETERS = {"binary_data_output", "priority", "timeout", "sequence_id", "sequence_start", "sequence_end"}


async def infer_images(
    registry: ModelRegistry,
    view: View,
    image: TensorView[Any],
    inputs: dict[str, np.ndarray],
    header: dict[str, Any],
    settings: Settings,
    limits: ImageLimits,
) -> dict[str, np.ndarray]:
    """The image view: BYTES images through the task's pipeline, its options from the request's
    parameters, validated by the same model as /v1's; its answer as the task's tensors."""
    images = _images(inputs, settings.max_images_per_request)
    parameters = header.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise ServiceError(400, "invalid_request", '"parameters" must be an object')
    options = {k: v for k, v in parameters.items() if k not in PROTOCOL_PARAMETERS}
    if options.get("render") or options.get("model", view.model.name) != view.model.name:
        raise ServiceError(
            400, "invalid_request", "an image view answers tensors of its own model: no render, no model"
        )
    parsed = parse_options(image.pipeline.options, {}, {**options, "model": view.model.name})
    _, answer = await image.pipeline(registry, images, parsed, limits)
    return image.tensors(answer)
