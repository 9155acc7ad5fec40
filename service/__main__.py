"""`python -m service [--host H] [--port N]`: serve the model repository with uvicorn."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import uvicorn
from pydantic import ValidationError

from service import logs
from service.app import create_app
from service.connections import ConnectionGuard, bound_protocol, connection_limits, raise_descriptor_limit
from service.runtime import DeviceUnavailable, check_device
from service.server import GracefulServer
from service.settings import Settings

log = logging.getLogger("service")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m service", description=__doc__)
    try:
        settings = Settings()
    except ValidationError as exc:
        parser.exit(2, f"invalid settings: {exc}\n")
    parser.add_argument("--host", default=settings.host, help=f"address to bind (default {settings.host})")
    parser.add_argument("--port", type=int, default=settings.port, help=f"port (default {settings.port})")
    parser.add_argument("--model-repository", type=Path, default=settings.model_repository, help="model repository")
    args = parser.parse_args(argv)
    settings = settings.model_copy(
        update={"host": args.host, "port": args.port, "model_repository": args.model_repository}
    )
    try:
        cap, overflow = connection_limits(settings.max_connections, descriptors := raise_descriptor_limit())
    except ValueError as exc:
        parser.exit(2, f"invalid settings: {exc}\n")
    logs.configure(settings.log_level, settings.log_json)
    try:
        check_device(settings)
    except DeviceUnavailable as exc:
        parser.exit(2, f"{exc}\n")
    app = create_app(settings)
    # at the cap, a body still arriving after a tenth of its timeout (3 s by default) gives way to a newcomer
    guard = ConnectionGuard(cap, overflow, settings.header_timeout_s, slow_body_s=settings.body_timeout_s / 10)
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
    GracefulServer(config, app, settings.shutdown_drain_s).run()


if __name__ == "__main__":
    main()
