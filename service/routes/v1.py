"""The /v1 adapter over a task's image pipelines: a request's images (multipart, raw or base64
JSON) and options (query string, overlaid by form fields or JSON keys) in; JSON, or one PNG, out."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError

from service.context import timed
from service.imaging import encode_png
from service.inputs import IMAGE_REQUEST_BODY, read_images, wants_png
from service.pipeline import Batch, ImagePipeline, Opts
from service.settings import Settings

IMAGE_ERRORS: dict[int | str, dict[str, Any]] = {
    413: {"description": "body, image or image count over a limit"},
    415: {"description": "not an image"},
}


def image_route(
    router: APIRouter, path: str, pipeline: ImagePipeline[Any, Any], answer: type[BaseModel], description: str
) -> None:
    """Adds `POST path`, running `pipeline` on the request's images."""

    async def endpoint(request: Request) -> Response:
        settings: Settings = request.app.state.settings
        images, body_options = await read_images(request, settings.max_images_per_request)
        options = parse_options(pipeline.options, dict(request.query_params), body_options)
        png = pipeline.render is not None and wants_png(request, bool(getattr(options, "render", False)), len(images))
        batch, result = await pipeline(
            request.app.state.registry, images, options, request.app.state.image_limits, full_size=png
        )
        if png:  # drawing and PNG encoding are heavy: off the event loop
            picture = await request.app.state.image_limits.run(_render, pipeline, batch, result)
            return Response(picture, media_type="image/png")
        return json_response(result)

    responses = {**IMAGE_ERRORS, 200: {"content": {"image/png": {}}}} if pipeline.render else IMAGE_ERRORS
    router.add_api_route(
        path, endpoint, methods=["POST"], response_model=answer, description=description, responses=responses,
        name=path.strip("/").replace("/", "_"),
        openapi_extra={**IMAGE_REQUEST_BODY, "parameters": query_parameters(pipeline.options)},
    )  # fmt: skip


def _render(pipeline: ImagePipeline[Opts, Any], batch: Batch[Opts], result: Any) -> bytes:
    assert pipeline.render is not None
    picture = pipeline.render(batch, result)
    with timed("encode"):
        return encode_png(picture)


def parse_options(cls: type[Opts], query: dict[str, Any], body: dict[str, Any]) -> Opts:
    """Query-string options overlaid by the body's (a form field or JSON key wins), validated together."""
    try:
        return cls.model_validate({**query, **body})
    except ValidationError as exc:
        errors = [{**e, "loc": ("body" if e["loc"][:1] and e["loc"][0] in body else "query", *e["loc"])}
                  for e in exc.errors(include_url=False)]  # fmt: skip
        raise RequestValidationError(errors) from exc


def query_parameters(cls: type[BaseModel]) -> list[dict[str, Any]]:
    """The options model as OpenAPI query parameters (every one optional: each has a default)."""
    schema = cls.model_json_schema()
    return [
        {"name": name, "in": "query", "required": False, "schema": {k: v for k, v in prop.items() if k != "title"},
         "description": prop.get("description", "")}
        for name, prop in schema["properties"].items()
    ]  # fmt: skip


def json_response(body: BaseModel) -> Response:
    """The answer as JSON by pydantic's compiled encoder, timed as the `encode` stage."""
    with timed("encode"):
        return Response(body.model_dump_json(), media_type="application/json")
