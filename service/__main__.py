"""`python -m service [--host H] [--port N] [--grpc-port N] [--workers N] [--model-control-mode none|poll|explicit]
[--repository-poll-secs S]`: serve the model repository with uvicorn, in one process or in N worker
processes sharing the port (service/workers.py)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from pydantic import ValidationError

from service import logs
from service.runtime import DeviceUnavailable, check_device
from service.server import build_server
from service.settings import Settings
from service.workers import supervise

log = logging.getLogger("service")


def main(argv: list[str] | None = None, prog: str = "python -m service") -> None:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__)
    try:
        settings = Settings()
    except ValidationError as exc:
        parser.exit(2, f"invalid settings: {exc}\n")
    parser.add_argument("--host", default=settings.host, help=f"address to bind (default {settings.host})")
    parser.add_argument("--port", type=int, default=settings.port, help=f"port (default {settings.port})")
    parser.add_argument("--grpc-port", type=int, default=settings.grpc_port,
                        help=f"gRPC port, Open Inference Protocol (default {settings.grpc_port}; 0: off)")  # fmt: skip
    parser.add_argument("--model-repository", type=Path, default=settings.model_repository, help="model repository")
    parser.add_argument(
        "--workers", type=int, default=settings.workers, help=f"worker processes (default {settings.workers})"
    )
    parser.add_argument("--model-control-mode", choices=["none", "poll", "explicit"],
                        default=settings.model_control_mode, help="Triton's: none (default), poll or explicit "
                        "(docs/lifecycle.md)")  # fmt: skip
    parser.add_argument("--repository-poll-secs", type=float, default=settings.repository_poll_secs,
                        help="poll mode: seconds between reads of the repository")  # fmt: skip
    args = parser.parse_args(argv)
    if not 0 <= args.grpc_port <= 65535:
        parser.exit(2, "--grpc-port must be 0 (off) to 65535\n")
    if args.workers < 1:
        parser.exit(2, "--workers must be at least 1\n")
    if args.repository_poll_secs <= 0:
        parser.exit(2, "--repository-poll-secs must be above 0\n")
    if args.model_control_mode == "explicit" and args.workers > 1:
        parser.exit(2, "--model-control-mode explicit needs one worker (a load call reaches one process); use poll\n")
    settings = settings.model_copy(
        update={"host": args.host, "port": args.port, "grpc_port": args.grpc_port,
                "model_repository": args.model_repository,
                "workers": args.workers, "model_control_mode": args.model_control_mode,
                "repository_poll_secs": args.repository_poll_secs}
    )  # fmt: skip
    logs.configure(settings.log_level, settings.log_json)
    try:
        settings = check_device(settings)  # exit 2 with the reason, before any model loads
        server = None if settings.workers > 1 else build_server(settings)
    except DeviceUnavailable as exc:
        parser.exit(2, f"{exc}\n")
    except ValueError as exc:  # a connection cap that the descriptor limit cannot hold
        parser.exit(2, f"invalid settings: {exc}\n")
    if server is None:
        supervise(settings)
    else:
        server.run()


if __name__ == "__main__":
    main()
