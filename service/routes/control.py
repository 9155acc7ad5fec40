"""Triton's model repository extension: the repository's index, and loading and unloading models
while the service runs (`--model-control-mode explicit`; the index in every mode). `tritonclient`'s
`get_model_repository_index`, `load_model` and `unload_model` call these as they are: POSTs with no
content type and a body that is empty, `{}`, or `{"parameters": {...}}`. Errors are the protocol's
`{"error": "..."}`, 400 as Triton answers them."""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, Field

from service import protocol
from service.deps import RegistryDep, SettingsDep
from service.errors import ServiceError
from service.routes.v2 import V2Route

router = APIRouter(prefix="/v2/repository", tags=["model repository (Triton's extension)"], route_class=V2Route)
MAX_CONTROL_BODY = 64 * 1024  # a load's config is a few lines


class IndexEntry(BaseModel):
    name: str
    version: str = Field(description="empty for a model with no version loaded")
    state: str = Field(description="READY, LOADING, UNLOADING or UNAVAILABLE")
    reason: str = Field(description="why it is unavailable")


async def _body(request: Request) -> dict[str, Any]:
    """The request's JSON object, whatever its content type says; nothing or `{}` is no parameters."""
    raw = await request.body()
    if len(raw) > MAX_CONTROL_BODY:
        raise ServiceError(400, "invalid_request", f"the body is over {MAX_CONTROL_BODY} bytes")
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        raise ServiceError(400, "invalid_request", "the body is not JSON") from None
    if not isinstance(body, dict) or not isinstance(body.get("parameters", {}), dict):
        raise ServiceError(400, "invalid_request", 'the body must be a JSON object, {"parameters": {...}} at most')
    return body


@router.post("/index")
async def index(request: Request, registry: RegistryDep) -> list[IndexEntry]:
    """Every model folder of the repository, each version with its state (`{"ready": true}`: READY ones only)."""
    ready = (await _body(request)).get("ready", False)
    if not isinstance(ready, bool):
        raise ServiceError(400, "invalid_request", "'ready' must be true or false")
    return [IndexEntry(**row) for row in protocol.repository_index(registry, ready)]


@router.post("/models/{name}/load")
async def load(request: Request, name: str, registry: RegistryDep, settings: SettingsDep) -> Response:
    """Loads the model, or brings it up to date: new or changed versions load and warm up beside
    those serving and replace them once ready; a version that fails changes nothing that serves,
    and the answer says why."""
    await protocol.load(registry, settings, name, (await _body(request)).get("parameters", {}))
    return Response(status_code=200)


@router.post("/models/{name}/unload")
async def unload(request: Request, name: str, registry: RegistryDep, settings: SettingsDep) -> Response:
    """Takes the model out of service: new requests for it get 404 at once; the answer comes once the
    requests it was serving are done and its memory is freed."""
    await _body(request)  # `unload_dependents`: a model here has none
    await protocol.unload(registry, settings, name)
    return Response(status_code=200)
