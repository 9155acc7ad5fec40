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
from typing import Any

import numpy as np
from fastapi import APIRouter, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute

from service import __version__
from service.deps import RegistryDep, SettingsDep
from service.errors import ServiceError
from service.imaging import preprocess_request
from service.repository import ModelRegistry, ServedModel, served
from service.tasks import classify, detect

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
EMPTY_ERRORS: dict[int | str, dict[str, Any]] = {
    404: {"description": "unknown model"},
    503: {"description": "not ready"},
}
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
                return JSONResponse({"error": str(exc.errors())}, status_code=400)

        return protocol_errors


router = APIRouter(prefix="/v2", tags=["open inference protocol (v2)"], route_class=V2Route)


class View:
    """One model as the protocol sees it: a raw graph, or the image view of a vision model."""

    def __init__(self, model: ServedModel, image: bool) -> None:
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
        if not self.image:
            return [_tensor_meta(t.name, t.dtype, t.shape) for t in self.manifest.main.outputs]
        if self.manifest.task == classify.NAME:
            return [{"name": "label", "datatype": "BYTES", "shape": [-1, -1]},
                    {"name": "score", "datatype": "FP32", "shape": [-1, -1]}]  # fmt: skip
        return [{"name": "detections", "datatype": "BYTES", "shape": [-1]}]


def _tensor_meta(name: str, dtype: str, shape: list[int | str]) -> dict[str, Any]:
    return {"name": name, "datatype": FROM_MANIFEST[dtype], "shape": [d if isinstance(d, int) else -1 for d in shape]}


def find_view(registry: ModelRegistry, name: str, version: str | None = None) -> View:
    image = name.endswith(IMAGE_SUFFIX) and name[: -len(IMAGE_SUFFIX)] in registry.models
    model = registry.models.get(name[: -len(IMAGE_SUFFIX)] if image else name)
    if model is None or (image and model.manifest and model.manifest.task not in IMAGE_TASKS):
        raise ServiceError(404, "unknown_model", f"unknown model {name!r}")
    if model.state != "ready" or model.manifest is None:
        raise ServiceError(503, "model_not_ready", f"model {name!r} is not ready: {model.reason}")
    if version is not None and version != str(model.manifest.version):
        raise ServiceError(404, "unknown_version", f"model {name!r} has no version {version!r}")
    return View(served(model), image)


def views(registry: ModelRegistry) -> list[View]:
    ready = [m for m in registry.models.values() if m.state == "ready" and m.manifest]
    raw = [View(m, image=False) for m in ready]
    return raw + [View(m, image=True) for m in ready if m.manifest and m.manifest.task in IMAGE_TASKS]


# server and model endpoints -------------------------------------------------------------------------


@router.get("")
async def server_metadata(registry: RegistryDep) -> dict[str, Any]:
    """Server name, version, extensions, and the models it serves (both views)."""
    return {
        "name": "vitserve",
        "version": __version__,
        "extensions": ["binary_tensor_data"],
        "models": [v.name for v in views(registry)],
    }


@router.get("/health/live", response_class=Response)
async def live() -> Response:
    return Response(status_code=200)


@router.get("/health/ready", response_class=Response, responses={503: {"description": "not ready"}})
async def ready(request: Request, registry: RegistryDep) -> Response:
    return Response(status_code=200 if registry.ready and not request.app.state.draining else 503)


@router.get("/models/{name}")
@router.get("/models/{name}/versions/{version}")
async def model_metadata(registry: RegistryDep, name: str, version: str | None = None) -> dict[str, Any]:
    return find_view(registry, name, version).metadata()


@router.get("/models/{name}/ready", response_class=Response, responses=EMPTY_ERRORS)
@router.get("/models/{name}/versions/{version}/ready", response_class=Response, responses=EMPTY_ERRORS)
async def model_ready(registry: RegistryDep, name: str, version: str | None = None) -> Response:
    find_view(registry, name, version)
    return Response(status_code=200)


# inference ----------------------------------------------------------------------------------------


@router.post("/models/{name}/infer")
@router.post("/models/{name}/versions/{version}/infer")
async def infer(
    request: Request, registry: RegistryDep, settings: SettingsDep, name: str, version: str | None = None
) -> Response:
    """Inference with JSON tensors, or Triton's binary tensor data extension (the JSON header's
    length in `Inference-Header-Content-Length`, raw tensors after it)."""
    view = find_view(registry, name, version)
    header, inputs = parse_request(await request.body(), request.headers.get(HEADER_LENGTH))
    if view.image:
        images = _images(inputs, settings.max_images_per_request)
        parameters = header.get("parameters") or {}
        outputs = await IMAGE_TASKS[view.manifest.task](view, images, parameters, settings.max_image_pixels)
    else:
        feeds = {
            spec.name: checked(_input(inputs, spec.name), spec.shape).astype(spec.dtype)
            for spec in view.manifest.main.inputs
        }
        if len({len(array) for array in feeds.values()}) > 1:
            raise ServiceError(400, "invalid_request", "every input must have the same batch size")
        results = await view.model.run(feeds)
        outputs = {spec.name: array for spec, array in zip(view.manifest.main.outputs, results, strict=True)}
    return encode_response(view, header, outputs)


def checked(array: np.ndarray, shape: list[int | str]) -> np.ndarray:
    """The array, if its shape fits the graph's (fixed axes equal, same rank)."""
    if len(array.shape) != len(shape) or any(
        isinstance(d, int) and d != a for d, a in zip(shape, array.shape, strict=True)
    ):
        wanted = [d if isinstance(d, int) else -1 for d in shape]
        raise ServiceError(400, "invalid_request", f"an input has shape {list(array.shape)}; the model takes {wanted}")
    return array


def _input(inputs: dict[str, np.ndarray], name: str) -> np.ndarray:
    if name not in inputs:
        raise ServiceError(400, "invalid_request", f"input {name!r} is missing; the model takes it")
    return inputs[name]


def parse_request(body: bytes, header_length: str | None) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The JSON header and every input as a numpy array (BYTES as an object array of bytes)."""
    try:
        split = int(header_length) if header_length is not None else len(body)
        header = json.loads(body[:split])
    except (ValueError, UnicodeDecodeError) as exc:
        raise ServiceError(400, "invalid_request", f"the request header is not valid JSON: {exc}") from exc
    if not isinstance(header, dict) or not isinstance(header.get("inputs"), list):
        raise ServiceError(400, "invalid_request", 'the request needs "inputs": a list of tensors')
    binary, offset, inputs = body[split:], 0, {}
    for tensor in header["inputs"]:
        try:
            name, shape, datatype = tensor["name"], [int(d) for d in tensor["shape"]], tensor["datatype"]
            size = (tensor.get("parameters") or {}).get("binary_data_size")
            if size is not None:
                inputs[name] = from_bytes(binary[offset : offset + size], datatype, shape)
                offset += size
            else:
                inputs[name] = from_json(tensor["data"], datatype, shape)
        except (KeyError, TypeError, ValueError) as exc:
            raise ServiceError(400, "invalid_request", f"input tensor is malformed: {exc!r}") from exc
    return header, inputs


def from_json(data: list[Any], datatype: str, shape: list[int]) -> np.ndarray:
    if datatype == "BYTES":
        flat = [
            item.encode() if isinstance(item, str) else bytes(item) for item in np.asarray(data, dtype=object).ravel()
        ]
        return np.array(flat, dtype=object).reshape(shape)
    return np.asarray(data, dtype=DATATYPES[datatype]).reshape(shape)


def from_bytes(raw: bytes, datatype: str, shape: list[int]) -> np.ndarray:
    if datatype != "BYTES":
        return np.frombuffer(raw, dtype=DATATYPES[datatype]).reshape(shape)
    items, at = [], 0
    while at < len(raw):  # each element: a 4-byte little-endian length, then the bytes
        (length,) = struct.unpack_from("<I", raw, at)
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
        name = request.get("name")
        if name not in outputs:
            raise ServiceError(400, "invalid_request", f"output {name!r} is not one of {list(outputs)}")
        array = outputs[name]
        tensor: dict[str, Any] = {"name": name, "datatype": datatype_of(array), "shape": list(array.shape)}
        if (request.get("parameters") or {}).get("binary_data", all_binary):
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
    head = json.dumps(body).encode()
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


async def classify_view(
    view: View, images: list[bytes], parameters: dict[str, Any], max_pixels: int
) -> dict[str, np.ndarray]:
    """BYTES images -> `label` `[n, k]` and `score` `[n, k]`, as /v1/classify (k: parameter top_k, default 5)."""
    _, batch = await preprocess_request(images, view.manifest.preprocessing, max_pixels)
    (logits,) = await view.model.run({view.manifest.main.inputs[0].name: batch})
    ranked = classify.top_k(logits, view.manifest.labels, int(parameters.get("top_k", 5)))
    labels = np.array([[p.label.encode() for p in row] for row in ranked], dtype=object)
    scores = np.array([[p.score for p in row] for row in ranked], dtype=np.float32)
    return {"label": labels, "score": scores}


async def detect_view(
    view: View, images: list[bytes], parameters: dict[str, Any], max_pixels: int
) -> dict[str, np.ndarray]:
    """BYTES images -> `detections` `[n]`: per image the JSON list /v1/detect returns."""
    decoded, batch = await preprocess_request(images, view.manifest.preprocessing, max_pixels)
    logits, boxes = await view.model.run({view.manifest.main.inputs[0].name: batch})
    threshold, limit = float(parameters.get("threshold", 0.5)), int(parameters.get("max_detections", 100))
    spec, labels = view.manifest.preprocessing, view.manifest.labels
    found = [
        detect.as_response(detect.detections(logits[i], boxes[i], image.size, spec, threshold, limit), labels)
        for i, image in enumerate(decoded)
    ]
    encoded = [json.dumps([d.model_dump() for d in image]).encode() for image in found]
    return {"detections": np.array(encoded, dtype=object)}


IMAGE_TASKS = {classify.NAME: classify_view, detect.NAME: detect_view}
