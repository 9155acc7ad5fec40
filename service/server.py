"""uvicorn with a graceful SIGTERM: readiness turns 503 at once, requests keep being served for
`shutdown_drain_s` so a load balancer stops sending, then uvicorn stops accepting, finishes every
request it accepted, and the process exits 0. Beside it, in the same event loop, the gRPC server
(service/grpc_server.py): started once the lifespan has loaded the models, stopped (finishing its
calls) before the lifespan closes them."""

from __future__ import annotations

import logging
import signal
import socket
import time
from types import FrameType

import grpc
import uvicorn
from fastapi import FastAPI

from service import grpc_server
from service.app import create_app
from service.connections import ConnectionGuard, bound_protocol, connection_limits, raise_descriptor_limit
from service.settings import Settings

log = logging.getLogger("service")


class GracefulServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app: FastAPI, drain_seconds: float, settings: Settings) -> None:
        super().__init__(config)
        self.app = app
        self.drain_seconds = drain_seconds
        self.drain_until: float | None = None
        self.settings = settings
        self.grpc: grpc.aio.Server | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if not self.should_exit:  # the lifespan loaded the models: the app's state is complete
            self.grpc = await grpc_server.start(self.app.state, self.settings)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        if self.grpc is not None:  # new calls refused at once; those under way get the grace period
            await self.grpc.stop(self.settings.shutdown_grace_s)
        await super().shutdown(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """Not recorded for re-raising (uvicorn would re-raise it after shutdown): a clean exit is 0."""
        if sig == signal.SIGTERM and self.drain_until is None and not self.should_exit:
            self.app.state.draining = True
            self.drain_until = time.monotonic() + self.drain_seconds
            log.info(
                "SIGTERM: readiness is 503; draining for %.1f s, then finishing accepted requests", self.drain_seconds
            )
        elif self.should_exit:
            self.force_exit = True
        else:
            self.app.state.draining = True
            self.should_exit = True

    async def on_tick(self, counter: int) -> bool:
        if self.drain_until is not None and time.monotonic() >= self.drain_until:
            self.should_exit = True
        return await super().on_tick(counter)


def build_server(settings: Settings) -> GracefulServer:
    """The app, behind uvicorn with the service's connection bounds. Raises ValueError where the
    descriptor limit cannot hold the connection cap."""
    cap, overflow = connection_limits(settings.max_connections, descriptors := raise_descriptor_limit())
    app = create_app(settings)
    # at the cap, a body still arriving after a tenth of its timeout (3 s by default) gives way to a newcomer
    guard = ConnectionGuard(cap, overflow, settings.header_timeout_s, slow_body_s=settings.body_timeout_s / 10,
                            send_timeout_s=settings.send_timeout_s)  # fmt: skip
    guard.record = app.state.metrics.track_connections(lambda: len(guard.admitted))
    log.info("at most %d connections (%d more answered 503); descriptors allowed: %d", cap, overflow, descriptors)
    # the service logs one line per request itself (with its request id), so uvicorn's access log is off
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=False,
        http=bound_protocol(guard),
        timeout_keep_alive=settings.keep_alive_s,  # type: ignore[arg-type]  # uvicorn takes a float as well
        log_config=None,
        timeout_graceful_shutdown=settings.shutdown_grace_s,
    )
    return GracefulServer(config, app, settings.shutdown_drain_s, settings)
