"""The /v1 adapter: each task's declared routes built into FastAPI routes. A request's images
(multipart, raw or base64 JSON, or base64 in a named field of a JSON body) and options (query
string, overlaid by form fields or JSON keys) in; JSON, one PNG, or Server-Sent Events out."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import numpy as np
from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel
from starlette.background import BackgroundTask

from service.budget import ImageLimits
from service.context import timed
from service.errors import ServiceError
from service.imaging import encode_png
from service.inputs import IMAGE_REQUEST_BODY, decode_base64, json_body, json_request_body, read_images, wants_png
from service.pipeline import ImagePipeline, Job, Opts, Stream, StreamPipeline
from service.routes.options import parse_options, query_options, query_parameters
from service.sampling import finished
from service.tasks.base import Route, Task
from service.text import clipped

log = logging.getLogger("service")
IMAGE_ERRORS: dict[int | str, dict[str, Any]] = {
    413: {"description": "body, image or image count over a limit"},
    415: {"description": "not an image"},
}
BINARY = "application/octet-stream"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no cache, no proxy buffering


def task_router(task: Task) -> APIRouter:
    """The task's routes, as its declarations say."""
    router = APIRouter(tags=[task.name])
    for route in task.routes:
        if isinstance(route.pipeline, StreamPipeline):
            add_stream_route(router, route, route.pipeline)
        elif route.image_field is None:
            add_upload_route(router, route, route.pipeline)
        else:
            add_json_image_route(router, route, route.pipeline)
    return router


def add_upload_route(router: APIRouter, route: Route, pipeline: ImagePipeline[Any, Any]) -> None:
    """Images uploaded in any of the accepted forms, options in the query string or the body."""

    async def endpoint(request: Request) -> Response:
        images, body_options = await read_images(request, request.app.state.image_limits.max_images)
        options = parse_options(pipeline.options, query_options(request.query_params), body_options)
        return await answer_images(request, pipeline, images, options, route.binary)

    responses = {**IMAGE_ERRORS, 200: {"content": {"image/png": {}}}} if pipeline.render else IMAGE_ERRORS
    if route.binary is not None:
        responses = {**responses, 200: {"content": {BINARY: {}}}}
    extra = {**IMAGE_REQUEST_BODY, "parameters": query_parameters(pipeline.options)}
    _add(router, route, endpoint, responses, extra)


def add_json_image_route(router: APIRouter, route: Route, pipeline: ImagePipeline[Any, Any]) -> None:
    """A JSON body of options with one base64 image in `route.image_field`."""
    read_body = json_body(pipeline.options)

    async def endpoint(request: Request) -> Response:
        options = await read_body(request)
        return await answer_images(request, pipeline, field_images(options, route), options)

    responses: dict[int | str, dict[str, Any]] = {200: {"content": {"image/png": {}}}} if pipeline.render else {}
    _add(router, route, endpoint, responses, json_request_body(pipeline.options))


def add_stream_route(router: APIRouter, route: Route, pipeline: StreamPipeline[Any, Any, Any]) -> None:
    """A JSON body of options (an optional base64 image in `route.image_field`); the answer as JSON,
    one PNG (`Accept: image/png`), or its rows as Server-Sent Events (`stream`, or `Accept:
    text/event-stream`)."""
    read_body = json_body(pipeline.options)

    async def endpoint(request: Request) -> Response:
        options = await read_body(request)
        limits: ImageLimits = request.app.state.image_limits
        stream = await pipeline(request.app.state.registry, field_images(options, route), options, limits)
        if getattr(options, "stream", False) or "text/event-stream" in request.headers.get("accept", ""):
            return StreamingResponse(events(stream, limits), media_type="text/event-stream", headers=SSE_HEADERS,
                                     background=BackgroundTask(release_on_loop, stream))  # fmt: skip
        try:
            png = wants_png(request, False, stream.count)
            images_done = await finished(stream.rows)
        finally:
            stream.release()
        if png:
            return Response(await limits.run(lambda: encode_png(stream.picture(images_done))), media_type="image/png")
        return json_response(await limits.run(stream.answer, images_done))  # many PNGs: not on the loop

    content: dict[str, Any] = {"image/png": {}, "text/event-stream": {}}
    responses: dict[int | str, dict[str, Any]] = {
        200: {"content": content, "description": "images, one PNG, or an event stream"}
    }
    _add(router, route, endpoint, responses, json_request_body(pipeline.options))


def _add(
    router: APIRouter, route: Route, endpoint: Callable[[Request], Awaitable[Response]],
    responses: dict[int | str, dict[str, Any]], openapi_extra: dict[str, Any],
) -> None:  # fmt: skip
    router.add_api_route(
        route.path, endpoint, methods=["POST"], response_model=route.answer, description=route.description,
        responses=responses, name=route.path.strip("/").replace("/", "_"), openapi_extra=openapi_extra,
    )  # fmt: skip


def field_images(options: BaseModel, route: Route) -> list[bytes]:
    """The image a JSON body carries as base64 in the route's image field: none where it is unset."""
    encoded = getattr(options, route.image_field) if route.image_field else None
    return [] if encoded is None else [decode_base64(encoded, route.image_field or "")]


async def answer_images(
    request: Request, pipeline: ImagePipeline[Opts, Any], images: list[bytes], options: Opts,
    binary: Callable[[Any], tuple[bytes, dict[str, str]]] | None = None,
) -> Response:  # fmt: skip
    """The pipeline's answer as JSON, drawn as one PNG where asked (`render`, `Accept: image/png`), or
    as raw bytes where the route has them and they are asked for (`Accept: application/octet-stream`)."""
    png = pipeline.render is not None and wants_png(request, bool(getattr(options, "render", False)), len(images))
    limits: ImageLimits = request.app.state.image_limits
    job, result = await pipeline(request.app.state.registry, images, options, limits, full_size=png)
    if png:  # drawing and PNG encoding are heavy: off the event loop
        return Response(await limits.run(_render, pipeline, job, result), media_type="image/png")
    if binary is not None and BINARY in request.headers.get("accept", ""):
        with timed("encode"):
            body, headers = binary(result)
        return Response(body, media_type=BINARY, headers=headers)
    return json_response(result)


def _render(pipeline: ImagePipeline[Opts, Any], job: Job[Opts], result: Any) -> bytes:
    assert pipeline.render is not None
    picture = pipeline.render(job, result)
    with timed("encode"):
        return encode_png(picture)


async def release_on_loop(stream: Stream[Any]) -> None:  # a plain function would run in a worker thread
    stream.release()


async def events(stream: Stream[Any], limits: ImageLimits) -> AsyncIterator[str]:
    """`event: row` with the grey values (0-255; RGB triples for a palette model) of that row of every image, then
    `event: done` with the answer; or, where the stream cannot finish (a failed step), `event: error` saying why: the
    200 went out with the first row, so the end of the stream is where a client learns it. What the stream holds is
    released when its rows are done, or the client has left."""
    images: np.ndarray | None = None
    try:
        async for row, images in stream.rows:
            grey = stream.grey(images[:, row]).tolist()
            yield f"event: row\ndata: {json.dumps({'row': row, 'pixels': grey})}\n\n"
    except Exception as exc:
        error = {"code": exc.code, "message": clipped(exc.message)} if isinstance(exc, ServiceError) else None
        if error is None:
            log.exception("a generation stream failed")
            error = {"code": "internal_error", "message": "generation failed; the server's log has the details"}
        yield f"event: error\ndata: {json.dumps(error)}\n\n"
        return
    finally:
        stream.release()
    assert images is not None
    yield f"event: done\ndata: {(await limits.run(stream.answer, images)).model_dump_json()}\n\n"


def json_response(body: BaseModel) -> Response:
    """The answer as JSON by pydantic's compiled encoder, timed as the `encode` stage."""
    with timed("encode"):
        return Response(body.model_dump_json(), media_type="application/json")
