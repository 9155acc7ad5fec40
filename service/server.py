"""uvicorn with a graceful SIGTERM: readiness turns 503 at once, requests keep being served for
`shutdown_drain_s` so a load balancer stops sending, then uvicorn stops accepting, finishes every
request it accepted, and the process exits 0."""

from __future__ import annotations

import logging
import signal
import time
from types import FrameType

import uvicorn
from fastapi import FastAPI

log = logging.getLogger("service")


class GracefulServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app: FastAPI, drain_seconds: float) -> None:
        super().__init__(config)
        self.app = app
        self.drain_seconds = drain_seconds
        self.drain_until: float | None = None

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
