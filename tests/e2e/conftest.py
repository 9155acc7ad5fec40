"""A real `python -m service` process on a free port, shared by the end-to-end tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx2
import pytest

from service.settings import PROJECT_ROOT


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Server:
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path
    grpc: str = ""  # host:port of its gRPC server


@contextmanager
def running_server(folder: Path, grpc_port: int | None = None, **env: str) -> Iterator[Server]:
    """`python -m service` on a free port (and gRPC on another, or on `grpc_port`), ready; SIGTERM at
    the end must give a clean exit 0."""
    port = free_port()
    grpc_port = free_port() if grpc_port is None else grpc_port
    log_path = folder / "server.log"
    with log_path.open("w") as log:  # a file, not a pipe: a full pipe would stall the server
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "service",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--grpc-port",
                str(grpc_port),
            ],
            cwd=PROJECT_ROOT,
            env={**os.environ, "VITSERVE_DEVICE": "cpu", "VITSERVE_SHUTDOWN_DRAIN_S": "0.2", **env},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        server = Server(f"http://127.0.0.1:{port}", process, log_path, f"127.0.0.1:{grpc_port}")
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx2.get(f"{server.url}/health/ready", timeout=2).status_code == 200:
                    break
            except httpx2.TransportError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                pytest.fail(f"the service did not become ready:\n{log_path.read_text()}")
            time.sleep(0.2)
        try:
            yield server
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=30) == 0, log_path.read_text()


@pytest.fixture(scope="session")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with running_server(tmp_path_factory.mktemp("server")) as running:
        yield running


@pytest.fixture(scope="session")
def server(served: Server) -> str:
    return served.url
