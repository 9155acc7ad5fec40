"""Triton's model repository extension: the repository's index, and loading and unloading models
while the service runs (`--model-control-mode explicit`; the index in every mode). `tritonclient`'s
`get_model_repository_index`, `load_model` and `unload_model` call these as they are: POSTs with no
content type and a body that is empty, `{}`, or `{"parameters": {...}}`. Errors are the protocol's
`{"error": "..."}`, 400 as Triton answers them."""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, Field, ValidationError

from service.deps import RegistryDep, SettingsDep
from service.errors import ServiceError
from service.manifest import ModelConfig
from service.routes.v2 import V2Route
from service.settings import Settings
from service.text import clipped

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


@router.post("/index")
async def index(request: Request, registry: RegistryDep) -> list[IndexEntry]:
    """Every model folder of the repository, each version with its state (`{"ready": true}`: READY ones only)."""
    ready = (await _body(request)).get("ready", False)
    if not isinstance(ready, bool):
        raise ServiceError(400, "invalid_request", "'ready' must be true or false")
    return [IndexEntry(**row) for row in registry.index(ready_only=ready)]


@router.post("/models/{name}/load")
async def load(request: Request, name: str, registry: RegistryDep, settings: SettingsDep) -> Response:
    """Loads the model, or brings it up to date: new or changed versions load and warm up beside
    those serving and replace them once ready; a version that fails changes nothing that serves,
    and the answer says why."""
    _controlled(settings, "load")
    config = load_config((await _body(request)).get("parameters", {}))
    await registry.load(name, config)
    return Response(status_code=200)


@router.post("/models/{name}/unload")
async def unload(request: Request, name: str, registry: RegistryDep, settings: SettingsDep) -> Response:
    """Takes the model out of service: new requests for it get 404 at once; the answer comes once the
    requests it was serving are done and its memory is freed."""
    _controlled(settings, "unload")
    await _body(request)  # `unload_dependents`: a model here has none
    await registry.unload(name)
    return Response(status_code=200)
