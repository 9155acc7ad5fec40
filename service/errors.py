"""One error shape for every failure: `{"error": {"code", "message"}}`, never a stack trace."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.timing import request_id

log = logging.getLogger("service")


class ServiceError(Exception):
    """An error a client caused or should know about, with its HTTP status."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers


def error_response(status: int, code: str, message: str, **extra: Any) -> JSONResponse:
    """The one error shape; it carries the request id the response's X-Request-ID also has."""
    body = {"code": code, "message": message, **extra}
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
    assert isinstance(exc, RequestValidationError)
    request.app.state.metrics.rejected.labels("invalid_request").inc()
    details = [
        {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")} for e in exc.errors()
    ]
    message = "; ".join(f"{'.'.join(map(str, d['loc']))}: {d['msg']}" for d in details)
    return error_response(422, "invalid_request", message, details=details)


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s (request %s)", request.method, request.url.path, request_id(), exc_info=exc)
    return error_response(500, "internal_error", "the server failed to answer this request; see its log")


def install_error_handlers(app: FastAPI, metrics: object) -> None:
    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _unexpected_error)
