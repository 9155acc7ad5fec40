"""The servers under test: how to start each (its venv, command, environment), how to send it one
image for a task in its own protocol, and how to read its answer (labels, or detections). Request
bodies are built once, before timing, so the client's work per request is the same small copy for
every server."""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2

from bench.peers import venvs
from bench.peers.venvs import Unavailable

ROOT = Path(__file__).resolve().parents[2]
START_SECONDS = 180  # PyTriton copies tritonserver into a workspace and loads the model through it
IDENTITY = {"accept-encoding": "identity"}  # Triton gzips answers for clients that accept it; nobody else does


@dataclass(frozen=True)
class Request:
    path: str
    body: bytes
    headers: dict[str, str]


Encoder = Callable[[bytes, str], Request]  # (image bytes, its content type) -> the request carrying it


def raw(path: str) -> Encoder:
    """The image as the whole body, with its image/* content type (the service, the plain endpoint)."""
    return lambda data, kind: Request(path, data, {**IDENTITY, "content-type": kind})


def form(path: str) -> Encoder:
    """The image as multipart field `file`, as LitServe reads it."""

    def encode(data: bytes, kind: str) -> Request:
        boundary = "vitserve-bench-boundary"
        head = f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="image"\r\nContent-Type: {kind}'
        body = head.encode() + b"\r\n\r\n" + data + f"\r\n--{boundary}--\r\n".encode()
        return Request(path, body, {**IDENTITY, "content-type": f"multipart/form-data; boundary={boundary}"})

    return encode


OUTPUTS = {"classify": ("labels", "scores"), "detect": ("detections",)}  # PyTriton's outputs, by task


def triton(model: str, task: str = "classify") -> Encoder:
    """Triton's v2 inference request with the image as one binary BYTES element (the binary tensor
    extension: a JSON header, then each element as a 4-byte little-endian length and its bytes)."""

    def encode(data: bytes, kind: str) -> Request:
        tensor = {
            "name": "image",
            "shape": [1, 1],
            "datatype": "BYTES",
            "parameters": {"binary_data_size": len(data) + 4},
        }
        outputs = [{"name": name, "parameters": {"binary_data": False}} for name in OUTPUTS[task]]
        header = json.dumps({"inputs": [tensor], "outputs": outputs}).encode()
        headers = {**IDENTITY, "content-type": "application/octet-stream",
                   "inference-header-content-length": str(len(header))}  # fmt: skip
        return Request(f"/v2/models/{model}/infer", header + struct.pack("<I", len(data)) + data, headers)

    return encode


def _triton_items(answer: dict[str, Any]) -> list[dict[str, Any]]:
    outputs = {output["name"]: output["data"] for output in answer["outputs"]}
    if "detections" in outputs:
        return list(json.loads(outputs["detections"][0]))
    return [{"label": label, "score": score} for label, score in zip(outputs["labels"], outputs["scores"], strict=True)]


Route = Callable[[str, str | None], Encoder]  # (task, model name or None: the default) -> its requests


@dataclass(frozen=True)
class Server:
    title: str
    venv: str | None  # None: this interpreter, the project's own venv
    args: list[str]
    route: Route
    items: Callable[[Any], list[dict[str, Any]]]  # an answer -> the first image's labels (and boxes), best first
    env: Callable[[], dict[str, str]] = field(default=dict)
    cwd: Path | None = None  # where it runs (default the project root): another checkout, say

    @property
    def encode(self) -> Encoder:
        """The digits workload's requests: the default classifier."""
        return self.route("classify", None)

    def top1(self, answer: Any) -> tuple[str, float]:
        first = self.items(answer)[0]
        return first["label"], first["score"]


def _service_route(task: str, model: str | None) -> Encoder:
    return raw(f"/v1/{task}" + (f"?model={model}" if model else ""))


def _triton_route(task: str, model: str | None) -> Encoder:
    return triton({"classify": "vit", "detect": "detr"}[task], task)


def _uvicorn(app: str) -> list[str]:
    return ["-m", "uvicorn", app, "--log-level", "warning"]


SERVERS = {
    "service": Server("vitserve (defaults)", None, ["-m", "service"], _service_route,
                      lambda answer: answer["results"][0]),
    "plain": Server("plain FastAPI + ORT", "plain", _uvicorn("bench.peers.serve_plain:app"),
                    lambda task, model: raw(f"/v1/{task}"), list),
    "litserve": Server("LitServe, batching", "litserve", ["-m", "bench.peers.serve_litserve"],
                       lambda task, model: form("/predict"), list),
    "pytriton": Server("PyTriton, dynamic batching", "pytriton", ["-m", "bench.peers.serve_pytriton"],
                       _triton_route, _triton_items, venvs.libpython_env),
    "transformers": Server("transformers pipeline (PyTorch)", None, _uvicorn("bench.peers.serve_transformers:app"),
                           lambda task, model: raw(f"/v1/{task}"), list),
}  # fmt: skip
DIGIT_SERVERS = ("service", "plain", "litserve", "pytriton")  # transformers has no digit model to serve


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class Live:
    """A started server: where it answers, its process (the root of its tree), and how long it took
    from the start of its process to its first successful answer."""

    url: str
    pid: int
    ready_seconds: float


@contextmanager
def launched(server: Server, probe: Request, env: dict[str, str] | None = None) -> Iterator[Live]:
    """The server started in its own venv and process group, with `env` added to its environment,
    answering `probe`. Raises Unavailable (with its log's tail) when it exits or does not answer in time."""
    python = sys.executable if server.venv is None else str(venvs.python(server.venv))
    port = free_port()
    environment = {**os.environ, "VITSERVE_LOG_LEVEL": "warning", **server.env(), **(env or {})}
    command = [python, *server.args, "--host", "127.0.0.1", "--port", str(port)]
    with tempfile.TemporaryFile() as log:
        started = time.perf_counter()
        process = subprocess.Popen(command, cwd=server.cwd or ROOT, env=environment, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        try:
            url = f"http://127.0.0.1:{port}"
            _wait_ready(process, url, probe, log, server.title)
            yield Live(url, process.pid, time.perf_counter() - started)
        finally:
            _stop(process)


@contextmanager
def running(server: Server, probe: Request, env: dict[str, str] | None = None) -> Iterator[str]:
    """`launched`, yielding its URL."""
    with launched(server, probe, env) as live:
        yield live.url


def _wait_ready(process: subprocess.Popen[bytes], url: str, probe: Request, log: Any, title: str) -> None:
    deadline = time.monotonic() + START_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise Unavailable(f"{title} exited with code {process.returncode}:\n{_tail(log)}")
        try:
            response = httpx2.post(url + probe.path, content=probe.body, headers=probe.headers, timeout=60)
            if response.status_code == 200:
                return
        except httpx2.TransportError:
            pass
        time.sleep(0.2)
    raise Unavailable(f"{title} did not answer within {START_SECONDS} s:\n{_tail(log)}")


def _tail(log: Any, lines: int = 12) -> str:
    log.seek(0)
    return "\n".join(log.read().decode(errors="replace").strip().splitlines()[-lines:])


def _stop(process: subprocess.Popen[bytes]) -> None:
    """Ctrl-C to the server's whole process group (PyTriton's tritonserver and LitServe's workers are
    children), as a terminal would: each shuts down cleanly. Whatever is left after 30 s is killed."""
    try:
        os.killpg(process.pid, signal.SIGINT)
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass
    except ProcessLookupError:
        return
    with suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()
