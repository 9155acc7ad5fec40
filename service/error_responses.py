"""One error shape for every failure: `{"error": {"code", "message"}}`, never a stack trace."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.context import CLIENT_LEFT, CLOSED_EARLY, request_id
from service.errors import ServiceError
from service.text import LISTED_ITEMS, QUOTED_CHARS, clipped

log = logging.getLogger("service")


def error_response(status: int, code: str, message: str, **extra: Any) -> JSONResponse:
    """The one error shape; it carries the request id the response's X-Request-ID also has. The
    message is cut to MESSAGE_CHARS, whatever client text it quotes."""
    body = {"code": code, "message": clipped(message), **extra}
    if rid := request_id():
        body["request_id"] = rid
    return JSONResponse({"error": body}, status_code=status)


async def _service_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServiceError)
    request.app.state.metrics.rejected.labels(exc.code).inc()
    response = error_response(exc.status, exc.code, exc.message)
    response.headers.update(exc.headers or {})
    return response


async def _http_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return error_response(exc.status_code, code, str(exc.detail))


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    """422 with the first LISTED_ITEMS errors, each place and message cut (a key name is the client's
    own text), and how many there were in all: the answer stays a few KB whatever was sent."""
    assert isinstance(exc, RequestValidationError)
    request.app.state.metrics.rejected.labels("invalid_request").inc()
    errors = exc.errors()
    total = getattr(exc, "total", len(errors))
    details = [
        {"loc": [p if isinstance(p, int) else clipped(p, QUOTED_CHARS) for p in e.get("loc", ())],
         "msg": clipped(e.get("msg", ""), 4 * QUOTED_CHARS), "type": clipped(e.get("type", ""), QUOTED_CHARS)}
        for e in errors[:LISTED_ITEMS]
    ]  # fmt: skip
    message = "; ".join(f"{'.'.join(map(str, d['loc']))}: {d['msg']}" for d in details)
    if total > len(details):
        message += f"; and {total - len(details)} more"
    return error_response(422, "invalid_request", message, details=details)


class UnexpectedErrorMiddleware:
    """Any other failure (an inference error, a bug) fails its own request alone: a 500 carrying the
    request id, the details in the log, never a stack trace in the response; the server goes on."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_tracked)
        except ClientDisconnect:  # no one to answer, nothing gone wrong: the access line says the client left
            scope.setdefault(CLOSED_EARLY, CLIENT_LEFT)
        except Exception:
            if CLOSED_EARLY in scope:  # the connection was dropped (the client left, or never read): an
                return  # answer it could not take is no error of the server's; the access line says why
            log.exception("unhandled error on %s %s (request %s)", scope["method"], scope["path"], request_id())
            if not started:
                message = "the server failed to answer this request; its log has the details"
                await error_response(500, "internal_error", message)(scope, receive, send)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_middleware(UnexpectedErrorMiddleware)
