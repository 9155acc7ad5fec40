"""Reading images out of a request in any of the three accepted forms, with the body's options.

- multipart/form-data: one or more `file` fields (other non-file fields are options, e.g. top_k);
- a raw body whose Content-Type is `image/*` (or application/octet-stream): one image;
- application/json: `{"images": ["<base64 or data: URL>", ...], ...options}`.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

from fastapi import Request
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from service.codec import MAX_JSON_KEYS, MAX_JSON_VALUES, CodecError, check_json_values
from service.errors import ServiceError
from service.pipeline import INLINE_BYTES, Opts
from service.routes.options import validate_options
from service.text import quoted

ACCEPTED = "multipart/form-data (field 'file'), image/*, or application/json {\"images\": [base64, ...]}"

# The body of every image endpoint, for the OpenAPI page (the handlers parse it themselves,
# since one operation takes three content types).
IMAGE_REQUEST_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"file": {"type": "array", "items": {"type": "string", "format": "binary"}}},
                    "required": ["file"],
                }
            },
            "image/*": {"schema": {"type": "string", "format": "binary"}},
            "application/json": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "images": {
                            "type": "array",
                            "items": {"type": "string", "format": "byte"},
                            "description": "base64-encoded images (a data: URL prefix is accepted)",
                        }
                    },
                    "required": ["images"],
                    "additionalProperties": True,
                },
                "example": {"images": ["iVBORw0KGgo..."]},
            },
        },
    }
}


def media_type(request: Request) -> str:
    """The request's Content-Type without its parameters, lower case ("" where there is none)."""
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def is_json(media: str) -> bool:
    """application/json, or a +json type (application/problem+json, say)."""
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


def require_json(request: Request) -> None:
    """415 for a body that does not say it is JSON. A text/plain (or form) POST is a request a
    browser sends from any page without asking the server first (no CORS preflight): a JSON route
    that took one could be driven by any page its user visits."""
    if not is_json(media := media_type(request)):
        shown = quoted(media) if media else "a body without Content-Type"
        raise ServiceError(415, "unsupported_media_type", f"{shown} is not accepted; send application/json")


async def read_images(request: Request, max_images: int) -> tuple[list[bytes], dict[str, Any]]:
    """The encoded images of a request, and any options sent in its body."""
    content_type = media_type(request)
    if content_type == "multipart/form-data":
        images, options = await _from_multipart(request, max_images)
    elif is_json(content_type):
        body = await request.body()  # a big one parses off the event loop
        parse = partial(_from_json, body, max_images)
        images, options = parse() if len(body) <= INLINE_BYTES else await run_in_threadpool(parse)
    elif content_type.startswith("image/") or content_type == "application/octet-stream":
        images, options = [await request.body()], {}
    else:
        shown = quoted(content_type) if content_type else "a body without Content-Type"
        raise ServiceError(415, "unsupported_media_type", f"{shown} is not accepted; send {ACCEPTED}")
    if not images:
        raise ServiceError(422, "no_image", f"the request holds no image; send {ACCEPTED}")
    if len(images) > max_images:
        raise ServiceError(413, "too_many_images", f"{len(images)} images in one request; the limit is {max_images}")
    return images, options


async def _from_multipart(request: Request, max_images: int) -> tuple[list[bytes], dict[str, Any]]:
    try:
        form = await request.form(max_files=max_images, max_fields=100)
    except HTTPException as exc:  # Starlette's multipart parser reports every problem as a 400
        if "Too many files" in str(exc.detail):
            raise ServiceError(413, "too_many_images", f"more than {max_images} images in one request") from exc
        raise ServiceError(400, "invalid_multipart", f"the multipart body is malformed: {exc.detail}") from exc
    images: list[bytes] = []
    options: dict[str, Any] = {}
    for key, value in form.multi_items():
        if isinstance(value, UploadFile):
            if key != "file":
                raise ServiceError(
                    422, "unexpected_file", f"file field {quoted(key)}: images go in fields named 'file'"
                )
            images.append(await value.read())
        elif key == "file":
            raise ServiceError(422, "not_a_file", "field 'file' must be a file upload (curl -F file=@image.png)")
        elif key in options:  # a repeated field: its values as a list (zero-shot's labels)
            options[key] = [*(options[key] if isinstance(options[key], list) else [options[key]]), value]
        else:
            options[key] = value
    return images, options


def _within_json_cap(body: bytes) -> None:
    """413 for a JSON body of more values than MAX_JSON_VALUES or keys than MAX_JSON_KEYS, before it is
    parsed (see service.codec)."""
    try:
        check_json_values(body)
    except CodecError as exc:
        message = f"the JSON body holds more than {MAX_JSON_VALUES} values, or {MAX_JSON_KEYS} object keys (colons)"
        raise ServiceError(413, "json_too_large", message) from exc


def _load_json(body: bytes) -> Any:
    _within_json_cap(body)
    try:
        return json.loads(body)
    # ValueError: also a number of over 4,300 digits; RecursionError: nested too deep
    except (ValueError, RecursionError) as exc:
        raise ServiceError(400, "invalid_json", f"the body is not valid JSON: {quoted(exc, 200)}") from exc


def _from_json(body: bytes, max_images: int) -> tuple[list[bytes], dict[str, Any]]:
    payload = _load_json(body)
    if not isinstance(payload, dict) or not isinstance(payload.get("images"), list):
        raise ServiceError(422, "invalid_request", 'the JSON body must be an object with a list "images"')
    encoded = payload.pop("images")
    if len(encoded) > max_images:  # before decoding any of them
        raise ServiceError(413, "too_many_images", f"{len(encoded)} images in one request; the limit is {max_images}")
    return [decode_base64(item, f"images[{i}]") for i, item in enumerate(encoded)], payload


def json_body(model: type[Opts]) -> Callable[[Request], Awaitable[Opts]]:
    """A dependency reading a JSON body into `model` as FastAPI would, but within the JSON value cap,
    unknown keys refused by name in a bounded list (routes/options.py) and, for a big body, off the
    event loop (FastAPI parses a body model on the loop); a body not sent as JSON (application/json
    or +json) gets 415."""

    def parse(body: bytes) -> Opts:
        payload = _load_json(body)
        if not isinstance(payload, dict):
            raise ServiceError(422, "invalid_request", "the JSON body must be an object")
        return validate_options(model, payload, lambda _: "body")

    async def read(request: Request) -> Opts:
        require_json(request)
        body = await request.body()
        return parse(body) if len(body) <= INLINE_BYTES else await run_in_threadpool(parse, body)

    return read


def json_request_body(model: type[BaseModel]) -> dict[str, Any]:
    """OpenAPI's requestBody for a route whose body `json_body` reads (a flat model: its schema inline)."""
    schema = model.model_json_schema()
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def decode_base64(item: object, what: str) -> bytes:
    """A base64 string (a `data:` URL prefix allowed) -> bytes; 422 naming `what` otherwise."""
    if not isinstance(item, str):
        raise ServiceError(422, "invalid_base64", f"{what} must be a base64 string")
    if item.startswith("data:"):
        item = item.partition(",")[2]
    try:
        return base64.b64decode(item, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ServiceError(422, "invalid_base64", f"{what} is not valid base64: {exc}") from exc


def wants_png(request: Request, render: bool, count: int) -> bool:
    """Whether to answer with one PNG (`render`, or `Accept: image/png`); that takes exactly one image."""
    wanted = render or "image/png" in request.headers.get("accept", "")
    if wanted and count != 1:
        raise ServiceError(422, "render_needs_one_image", "a PNG answer takes exactly one image")
    return wanted
