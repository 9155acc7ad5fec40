"""Per-request stage timings (decode, preprocess, queue, inference, postprocess, encode), sent back
in a `Server-Timing` header. The timings travel in a context variable, so worker threads and the
batcher record into the request that asked, without being passed around."""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

from pydantic import BaseModel
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.metrics import Metrics

Timings = dict[str, float]  # stage -> seconds, summed when a stage repeats


@dataclass
class Observation:
    """What one request did: its stage timings and the model that served it."""

    timings: Timings = field(default_factory=dict)
    model: str = ""
    provider: str = ""
    request_id: str = ""


_current: ContextVar[Observation | None] = ContextVar("observation", default=None)


def current() -> Timings | None:
    observation = _current.get()
    return observation.timings if observation else None


def request_id() -> str | None:
    observation = _current.get()
    return observation.request_id if observation else None


def served_by(model: str, provider: str) -> None:
    """Labels this request's metrics with the model (and its execution provider) that answered it."""
    observation = _current.get()
    if observation is not None:
        observation.model, observation.provider = model, provider


def record(stage: str, seconds: float, timings: Timings | None = None) -> None:
    timings = timings if timings is not None else current()
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


access_log = logging.getLogger("service.access")
_REQUEST_ID = re.compile(r"[\w.:-]{1,128}")


def _request_id(scope: Scope) -> str:
    """The client's X-Request-ID when it is a sane token, else a new one."""
    for name, value in scope["headers"]:
        if name == b"x-request-id":
            text: str = value.decode("latin-1")
            if _REQUEST_ID.fullmatch(text):
                return text
    return uuid.uuid4().hex


class ObservingMiddleware:
    """Starts each request's observation; when the response starts, adds its `Server-Timing`
    header and records the request and its stages in the metrics."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        observation = Observation(request_id=_request_id(scope))
        token = _current.set(observation)
        started = time.perf_counter()

        async def send_observed(message: Message) -> None:
            if message["type"] == "http.response.start":
                total = time.perf_counter() - started
                extra = [(b"server-timing", header(observation.timings, total)),
                         (b"x-request-id", observation.request_id.encode())]  # fmt: skip
                message["headers"] = [*message.get("headers", []), *extra]
                self._record(scope, message["status"], observation, total)
            await send(message)

        try:
            await self.app(scope, receive, send_observed)
        finally:
            _current.reset(token)

    def _record(self, scope: Scope, status: int, observation: Observation, total: float) -> None:
        route = scope.get("route")
        path = getattr(route, "path", "unmatched")
        access_log.info(
            "%s %s %d %.1fms %s", scope["method"], scope["path"], status, total * 1000, observation.model or "-",
            extra={"request_id": observation.request_id, "method": scope["method"], "path": scope["path"],
                   "status": status, "ms": round(total * 1000, 2), "model": observation.model},
        )  # fmt: skip
        self.metrics.requests.labels(path, observation.model, str(status)).inc()
        if observation.model:
            for stage, seconds in [*observation.timings.items(), ("total", total)]:
                self.metrics.stage_seconds.labels(stage, observation.model, observation.provider).observe(seconds)


def json_response(body: BaseModel) -> Response:
    """The body as JSON by pydantic's compiled encoder, timed as the `encode` stage."""
    with timed("encode"):
        return Response(body.model_dump_json(), media_type="application/json")
