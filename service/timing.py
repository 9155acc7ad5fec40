"""Per-request stage timings (decode, preprocess, queue, inference, postprocess, encode), sent back
in a `Server-Timing` header. The timings travel in a context variable, so worker threads and the
batcher record into the request that asked, without being passed around."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from pydantic import BaseModel
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

Timings = dict[str, float]  # stage -> seconds, summed when a stage repeats
_current: ContextVar[Timings | None] = ContextVar("timings", default=None)


def current() -> Timings | None:
    return _current.get()


def record(stage: str, seconds: float, timings: Timings | None = None) -> None:
    timings = timings if timings is not None else _current.get()
    if timings is not None:
        timings[stage] = timings.get(stage, 0.0) + seconds


@contextmanager
def timed(stage: str) -> Iterator[None]:
    started = time.perf_counter()
    try:
        yield
    finally:
        record(stage, time.perf_counter() - started)


def header(timings: Timings, total: float) -> bytes:
    parts = [f"{stage};dur={seconds * 1000:.2f}" for stage, seconds in timings.items()]
    return ", ".join([*parts, f"total;dur={total * 1000:.2f}"]).encode()


class ServerTimingMiddleware:
    """Starts each request's timings and adds them as `Server-Timing` when the response starts."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        timings: Timings = {}
        token = _current.set(timings)
        started = time.perf_counter()

        async def send_with_timing(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [
                    *message.get("headers", []),
                    (b"server-timing", header(timings, time.perf_counter() - started)),
                ]
            await send(message)

        try:
            await self.app(scope, receive, send_with_timing)
        finally:
            _current.reset(token)


def json_response(body: BaseModel) -> Response:
    """The body as JSON by pydantic's compiled encoder, timed as the `encode` stage."""
    with timed("encode"):
        return Response(body.model_dump_json(), media_type="application/json")
