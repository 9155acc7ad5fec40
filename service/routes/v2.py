"""The Open Inference Protocol (KServe v2, as Triton speaks it), with Triton's binary tensor extension.

Each model shows two views: `<name>`, its raw ONNX graph (tensors in, tensors out, as its manifest
says), and, for classification and detection, `<name>_image`, which takes encoded images as BYTES and
answers with the same labels, scores and boxes as /v1. Both run through the model's batcher.
Errors are `{"error": "..."}` with Triton's statuses: 400 invalid, 404 unknown model, 503 unavailable.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Header, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, Field

from service import protocol
from service.codec import HEADER_LENGTH, CodecError, encode_response, parse_request
from service.deps import RegistryDep, SettingsDep
from service.errors import ServiceError
from service.pipeline import INLINE_BYTES
from service.tasks.base import Task
from service.text import clipped


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


def _invalid(exc: RequestValidationError) -> str:
    return protocol.invalid_options(exc.errors())


router = APIRouter(prefix="/v2", tags=["open inference protocol (v2)"], route_class=V2Route)


# server and model endpoints -------------------------------------------------------------------------


@router.get("")
async def server_metadata(registry: RegistryDep, tasks: TasksDep) -> dict[str, Any]:
    """Server name, version, extensions, and the models it serves (both views)."""
    return protocol.server_metadata(registry, tasks)


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
    is_ready = protocol.server_ready(registry, request.app.state.draining)
    if not is_ready:
        response.status_code = 503
    return ServerReady(ready=is_ready)


@router.get("/models/{name}")
@router.get("/models/{name}/versions/{version}")
async def model_metadata(
    registry: RegistryDep, tasks: TasksDep, name: str, version: str | None = None
) -> dict[str, Any]:
    return protocol.protocol_model(registry, tasks, name, version).metadata()


@router.get("/models/{name}/ready", responses=MODEL_READY_ERRORS)
@router.get("/models/{name}/versions/{version}/ready", responses=MODEL_READY_ERRORS)
async def model_ready(registry: RegistryDep, tasks: TasksDep, name: str, version: str | None = None) -> ModelReady:
    """`{"name": ..., "ready": true}`; 404 for an unknown model or version, 503 for one not loaded."""
    return ModelReady(name=protocol.protocol_model(registry, tasks, name, version).name, ready=True)


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
    view = protocol.protocol_model(registry, tasks, name, version)
    body = await request.body()
    big = len(body) > INLINE_BYTES  # big tensors parse, check and encode off the event loop
    parsed = await protocol.off_loop(big, parse_request, body, header_length)
    limits = request.app.state.image_limits
    outputs = await protocol.infer(registry, view, parsed, settings, limits, big)
    encode = (encode_response, view.name, str(view.manifest.version), parsed, outputs)
    head, blobs = await protocol.off_loop(protocol.outputs_big(outputs), *encode)
    if not blobs:
        return Response(head, media_type="application/json")
    return Response(
        head + b"".join(blobs), media_type="application/octet-stream", headers={HEADER_LENGTH: str(len(head))}
    )
