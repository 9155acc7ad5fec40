"""Request limits: body size, enforced while the body streams in (413 before it is read whole), and
time to answer (504)."""

from __future__ import annotations

import asyncio

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import ServiceError, error_response
from service.metrics import Metrics


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
