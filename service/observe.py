"""One pure ASGI middleware that observes every request: it opens the request context (with the
client's X-Request-ID when sane, else a new one); when the response starts, adds the
`Server-Timing` (the stages so far), `X-Request-ID` and (where a model answered) `X-Model-Version`
headers; when it ends, logs one line and records the request's metrics. Where tracing is on
(service/tracing.py), it opens the request's span first, answers with its `traceparent`, and ends it
with the stages' spans last. A client that left before its answer was complete is logged as such,
with status 499 (nginx's "client closed request"), not as the server's error."""

from __future__ import annotations

import logging
import random
import re
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import context, tracing
from service.context import CLOSED_EARLY, RequestContext
from service.metrics import Metrics

access_log = logging.getLogger("service.access")
_REQUEST_ID = re.compile(r"[\w.:-]{1,128}", re.ASCII)  # ASCII: echoed in a header as it came


def server_timing(timings: context.Timings, total: float) -> bytes:
    parts = [f"{stage};dur={seconds * 1000:.2f}" for stage, seconds in timings.items()]
    return ", ".join([*parts, f"total;dur={total * 1000:.2f}"]).encode()


def _request_id(scope: Scope) -> str:
    """The client's X-Request-ID when it is a sane token, else a new one: 128 random bits as hex, like
    uuid4().hex but from Python's generator: ids need to be unique, not secret, and a system call
    per request is not free."""
    for name, value in scope["headers"]:
        if name == b"x-request-id":
            return request_id_from(value.decode("latin-1"))
    return request_id_from(None)


def request_id_from(text: str | None) -> str:
    """The client's request id where it is a sane token, else a new one (HTTP headers and gRPC metadata alike)."""
    if text is not None and _REQUEST_ID.fullmatch(text):
        return text
    return f"{random.getrandbits(128):032x}"


def _printable(path: str) -> str:
    """The path with control characters escaped: a `%0a` in a URL cannot forge a log line."""
    return path if path.isprintable() else path.encode("unicode_escape").decode("ascii")


def _route(scope: Scope) -> str | None:
    """The path template of the route that matched (None: none did)."""
    return getattr(scope.get("route"), "path", None)


class ObservingMiddleware:
    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request, token = context.begin(_request_id(scope))
        if tracing.on:
            tracing.begin_http(request, scope)
        started = time.perf_counter()
        status = 0

        async def send_observed(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                extra = [(b"server-timing", server_timing(request.timings, time.perf_counter() - started)),
                         (b"x-request-id", request.request_id.encode())]  # fmt: skip
                if request.version:  # which version of the model answered
                    extra.append((b"x-model-version", str(request.version).encode()))
                if request.trace is not None:
                    extra.append((b"traceparent", tracing.traceparent(request)))
                message["headers"] = [*message.get("headers", []), *extra]
            await send(message)

        try:
            await self.app(scope, receive, send_observed)
        finally:  # the log line and metrics cover the whole answer, a stream's every row included
            early: tuple[int, str] | None = scope.get(CLOSED_EARLY)
            status, note = early or (status, "")
            if status:
                self._record(scope, status, request, time.perf_counter() - started, note)
            if request.trace is not None:
                tracing.end_http(request, scope["method"], _route(scope), status)
            context.end(token)

    def _record(self, scope: Scope, status: int, request: RequestContext, total: float, note: str) -> None:
        route = _route(scope) or "unmatched"
        if access_log.isEnabledFor(logging.INFO):
            path = _printable(scope["path"])
            access_log.info(
                "%s %s %d %.1fms %s%s", scope["method"], path, status, total * 1000, request.model or "-",
                f" ({note})" if note else "",
                extra={"request_id": request.request_id, "method": scope["method"], "path": path,
                       "status": status, "ms": round(total * 1000, 2), "model": request.model},
            )  # fmt: skip
        self.metrics.request_done(route, status, request.model, request.provider, request.timings, total)
