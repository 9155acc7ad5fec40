"""Request limits: per-client rate (429, before anything is read), body size, enforced while the body
streams in (413 before it is read whole), time to receive the body (408), and time to answer (504)."""

from __future__ import annotations

import asyncio
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.auth import HEALTH, presented
from service.error_responses import error_response
from service.errors import ServiceError
from service.metrics import Metrics
from service.ratelimit import RateLimited, RateLimiter


class RateLimitMiddleware:
    """Per-client rate limits (service/ratelimit.py): 429 `rate_limited` with Retry-After, before the
    body is read. Health and metrics are exempt."""

    def __init__(self, app: ASGIApp, limiter: RateLimiter, metrics: Metrics) -> None:
        self.app = app
        self.limiter = limiter
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith(HEALTH):
            await self.app(scope, receive, send)
            return
        peer = scope.get("client")
        try:
            self.limiter.check(presented(scope), peer[0] if peer else None)
        except RateLimited as exc:
            self.metrics.rejected.labels(exc.code).inc()
            response = error_response(exc.status, exc.code, exc.message)
            response.headers.update(exc.headers or {})
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


class BodyTooLarge(ServiceError):
    def __init__(self, limit: int) -> None:
        super().__init__(413, "body_too_large", f"the request body is over the limit of {limit} bytes")


class BodyLimitMiddleware:
    """Refuses a declared Content-Length over the limit at once, and stops a chunked or lying
    body as soon as it passes the limit."""

    def __init__(self, app: ASGIApp, max_bytes: int, metrics: Metrics) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                await error_response(400, "bad_content_length", "Content-Length is not a number")(scope, receive, send)
                return
            if int(declared) > self.max_bytes:
                exc = BodyTooLarge(self.max_bytes)
                self.metrics.rejected.labels(exc.code).inc()
                await error_response(exc.status, exc.code, exc.message)(scope, receive, send)
                return

        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        await self.app(scope, limited_receive, send)


class BodyTimeout(ServiceError):
    def __init__(self, seconds: float) -> None:
        message = f"the request body did not arrive whole within {seconds:g} s"
        # the rest of the body may still be on its way: the connection cannot carry another request
        super().__init__(408, "body_timeout", message, headers={"Connection": "close"})


class BodyTimeoutMiddleware:
    """Bounds the time to receive a request's whole body, from the request's start: a client sending
    half a body, or a byte at a time, gets 408 and its connection closed instead of holding the
    request (and the connection) until the answer's timeout."""

    def __init__(self, app: ASGIApp, seconds: float) -> None:
        self.app = app
        self.seconds = seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        deadline = time.monotonic() + self.seconds
        complete = False

        async def timed_receive() -> Message:
            nonlocal complete
            if complete:  # later calls wait for a disconnect (a stream's listener): no deadline
                return await receive()
            try:
                async with asyncio.timeout(deadline - time.monotonic()):
                    message = await receive()
            except TimeoutError:
                raise BodyTimeout(self.seconds) from None
            complete = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        await self.app(scope, timed_receive, send)


class TimeoutMiddleware:
    """Answers 504 when no response has started within the limit. Once a response starts (a stream
    of generated rows, say) it is left to finish."""

    def __init__(self, app: ASGIApp, seconds: float, metrics: Metrics) -> None:
        self.app = app
        self.seconds = seconds
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False
        try:
            async with asyncio.timeout(self.seconds) as deadline:

                async def send_started(message: Message) -> None:
                    nonlocal started
                    if message["type"] == "http.response.start":
                        started = True
                        deadline.reschedule(None)
                    await send(message)

                await self.app(scope, receive, send_started)
        except TimeoutError:
            if started:
                raise
            self.metrics.rejected.labels("timeout").inc()
            message = f"no answer within {self.seconds:g} s; the request was abandoned"
            await error_response(504, "timeout", message)(scope, receive, send)
