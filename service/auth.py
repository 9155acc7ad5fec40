"""Optional API keys. With `VITSERVE_API_KEY` set, every route but health, metrics and the docs
needs it, as `Authorization: Bearer <key>` or `X-API-Key: <key>` (health and metrics too with
`VITSERVE_AUTH_HEALTH`). With `VITSERVE_CONTROL_API_KEY` set, the model repository's routes (load,
unload, index) need that key instead. Keys are compared in constant time and never logged."""

from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Receive, Scope, Send

from service.error_responses import error_response
from service.metrics import Metrics

HEALTH = ("/health/", "/v2/health/", "/metrics")
DOCS = ("/docs", "/openapi.json", "/redoc")
CONTROL = "/v2/repository/"


class ApiKeyMiddleware:
    def __init__(
        self, app: ASGIApp, key: str | None, protect_health: bool, metrics: Metrics, control_key: str | None = None
    ) -> None:
        self.app = app
        self.key = key.encode() if key is not None else None
        self.control_key = control_key.encode() if control_key is not None else self.key
        self.protect_health = protect_health
        self.metrics = metrics

    def _needed(self, path: str) -> bytes | None:
        """The key a path needs, or None. The page and the docs are open (the page asks for the key);
        health too unless guarded."""
        if path.startswith(CONTROL):
            return self.control_key
        if path == "/" or path.startswith(DOCS) or (not self.protect_health and path.startswith(HEALTH)):
            return None
        return self.key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        needed = self._needed(scope["path"]) if scope["type"] == "http" else None
        if needed is None or authorized(presented(scope), needed):
            await self.app(scope, receive, send)
            return
        self.metrics.rejected.labels("unauthorized").inc()
        response = error_response(401, "unauthorized", "this route needs the API key (Authorization: Bearer <key>)")
        response.headers["WWW-Authenticate"] = "Bearer"
        await response(scope, receive, send)


def presented(scope: Scope) -> bytes:
    """The key a request carries, or b"" (so the comparison still runs in constant time)."""
    headers = dict(scope["headers"])
    return carried(headers.get(b"x-api-key"), headers.get(b"authorization"))


def carried(api_key: bytes | None, authorization: bytes | None) -> bytes:
    """The key in `X-API-Key`, else in `Authorization: Bearer <key>`, else b"": HTTP headers and gRPC
    metadata alike."""
    if api_key:
        return bytes(api_key)
    scheme, _, token = (authorization or b"").partition(b" ")
    return bytes(token) if scheme.lower() == b"bearer" else b""


def authorized(presented_key: bytes, needed: bytes | None) -> bool:
    """Whether a request carrying `presented_key` may pass where `needed` is asked (None: open);
    compared in constant time."""
    return needed is None or hmac.compare_digest(presented_key, needed)
