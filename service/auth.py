"""An optional API key. With `VITSERVE_API_KEY` set, every route but health, metrics and the docs
needs it, as `Authorization: Bearer <key>` or `X-API-Key: <key>` (health and metrics too with
`VITSERVE_AUTH_HEALTH`). Keys are compared in constant time and never logged."""

from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Receive, Scope, Send

from service.error_responses import error_response
from service.metrics import Metrics

HEALTH = ("/health/", "/v2/health/", "/metrics")
DOCS = ("/docs", "/openapi.json", "/redoc")


class ApiKeyMiddleware:
    def __init__(self, app: ASGIApp, key: str, protect_health: bool, metrics: Metrics) -> None:
        self.app = app
        self.key = key.encode()
        self.protect_health = protect_health
        self.metrics = metrics

    def _open(self, path: str) -> bool:
        """The page and the docs are open (the page asks for the key); health too unless guarded."""
        return path == "/" or path.startswith(DOCS) or (not self.protect_health and path.startswith(HEALTH))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self._open(scope["path"]) or hmac.compare_digest(presented(scope), self.key):
            await self.app(scope, receive, send)
            return
        self.metrics.rejected.labels("unauthorized").inc()
        response = error_response(401, "unauthorized", "this route needs the API key (Authorization: Bearer <key>)")
        response.headers["WWW-Authenticate"] = "Bearer"
        await response(scope, receive, send)


def presented(scope: Scope) -> bytes:
    """The key a request carries, or b"" (so the comparison still runs in constant time)."""
    headers = dict(scope["headers"])
    if key := headers.get(b"x-api-key"):
        return bytes(key)
    scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
    return bytes(token) if scheme.lower() == b"bearer" else b""
