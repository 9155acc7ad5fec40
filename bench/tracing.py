"""`python -m bench.tracing [--base REV] [--requests N] [--rounds N] [--json PATH]`: what tracing costs a
request. Side by side, processes taking turns: the service as it is with tracing off (no OTEL_* variable),
the service at REV before tracing existed (default: the commit before the one that added service/tracing.py),
and the service with tracing on (every request sampled, spans batched to an exporter that drops them: the
SDK's cost, not a collector's). Each process serves the shipped ViT and sends N requests of each kind
straight to the ASGI app in its own event loop (no client, no socket): a classification (a digit PNG, the
whole pipeline) and GET /health/live (the middleware alone); the figure is the median time of a request,
in microseconds."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench.common import report

ROOT = Path(__file__).resolve().parent.parent
DIGIT = ROOT / "examples" / "digit-3.png"
ROUTES = {"classify": ("POST", "/v1/classify"), "health": ("GET", "/health/live")}


async def asgi_request(app: Any, method: str, path: str, body: bytes, headers: list[tuple[bytes, bytes]]) -> int:
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "", "headers": headers,
             "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000)}  # fmt: skip
    sent = False
    status = 0

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            await asyncio.sleep(3600)
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    await app(scope, receive, send)
    return status


def child(tree: str, mode: str, requests: int, repository: str) -> dict[str, float]:
    """In a process of its own: the service of `tree`, timed."""
    sys.path.insert(0, tree)
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import Settings

    provider = None
    if mode == "on":
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

        class Dropping(SpanExporter):
            def export(self, spans: Sequence[Any]) -> SpanExportResult:
                return SpanExportResult.SUCCESS

        provider = TracerProvider()
        provider.add_span_processor(BatchSpanProcessor(Dropping()))
    settings = Settings(model_repository=Path(repository), device="cpu", grpc_port=0)
    app = create_app(settings, tracer_provider=provider) if provider else create_app(settings)
    image = DIGIT.read_bytes()
    headers = {"classify": [(b"content-type", b"image/png"), (b"content-length", str(len(image)).encode())],
               "health": []}  # fmt: skip
    bodies = {"classify": image, "health": b""}

    async def measure() -> dict[str, float]:
        found = {}
        for kind, (method, path) in ROUTES.items():
            times = []
            for i in range(requests + requests // 5):  # the first fifth: warm-up
                started = time.perf_counter()
                status = await asgi_request(app, method, path, bodies[kind], headers[kind])
                if i >= requests // 5:
                    times.append(time.perf_counter() - started)
                assert status == 200, status
            found[kind] = statistics.median(times) * 1e6
        return found

    with TestClient(app) as client:  # the lifespan: models loaded, warm
        assert client.portal is not None
        result: dict[str, float] = client.portal.call(measure)
    return result


def base_tree(rev: str, target: Path) -> Path:
    """The service at `rev`, unpacked (git archive) beside the current tree's everything else."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "service"], check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive.stdout, check=True)
    return target


def before_tracing() -> str:
    """The revision just before service/tracing.py was added (git)."""
    log = ["git", "-C", str(ROOT), "log", "-1", "--format=%h", "--diff-filter=A", "--", "service/tracing.py"]
    added = subprocess.run(log, check=True, capture_output=True, text=True).stdout.strip()
    return f"{added}^"


def run(base: str, requests: int, rounds: int) -> list[dict[str, Any]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    with tempfile.TemporaryDirectory() as folder:
        repository = Path(folder) / "repository"
        shutil.copytree(ROOT / "model_repository" / "vit", repository / "vit")
        before = base_tree(base, Path(folder))
        configs: dict[str, tuple[Path, str]] = {f"before ({base})": (before, "off"), "tracing off": (ROOT, "off"),
                                                "tracing on": (ROOT, "on")}  # fmt: skip
        seen: dict[str, list[dict[str, float]]] = {name: [] for name in configs}
        for _ in range(rounds):
            for name, (tree, mode) in configs.items():
                command = [sys.executable, "-m", "bench.tracing", "--child", str(tree), mode, str(requests),
                           str(repository)]  # fmt: skip
                out = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, check=True)
                seen[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
    rows = []
    first = next(iter(seen))
    for name, found in seen.items():
        row: dict[str, Any] = {"service": name}
        for kind in ROUTES:
            median = statistics.median(f[kind] for f in found)
            baseline = statistics.median(f[kind] for f in seen[first])
            row[f"{kind} µs"] = f"{median:.1f}"
            row[f"{kind} vs before"] = f"{median / baseline:.3f}"
        rows.append(row)
    return rows


def main(argv: list[str] | None = None, printer: Callable[[str], None] = print) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--base", help="the revision before tracing (git; default: the one before it was added)")
    parser.add_argument("--requests", type=int, default=500, help="requests of each kind per process")
    parser.add_argument("--rounds", type=int, default=5, help="processes of each kind, taking turns")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        tree, mode, requests, repository = args.child
        printer(json.dumps(child(tree, mode, int(requests), repository)))
        return
    rows = run(args.base or before_tracing(), args.requests, args.rounds)
    printer(f"a request's time, the median of {args.rounds} processes x {args.requests} requests of each kind")
    report("tracing", rows, args.json)


if __name__ == "__main__":
    main()
