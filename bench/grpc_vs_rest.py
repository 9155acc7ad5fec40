"""`python -m bench.grpc_vs_rest [--rounds N] [--requests N] [--batch N] [--json PATH]`: the Open
Inference Protocol over gRPC against the same over REST, each through Triton's own client
(`tritonclient.grpc`, `tritonclient.http` with binary tensors), on one `python -m service` process,
on the shipped ViT's raw view (`vit`, FP32 pixels in, logits out), at concurrency 1 and 32.

The two protocols take turns round by round (each round: `--requests` calls per client thread);
the figures are medians over the rounds: requests per second, and the median latency of a call.
Absolute times on a shared machine are noise; the ratio between the two, measured in the same
rounds, is the figure to read."""

from __future__ import annotations

import argparse
import os
import queue
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx2
import numpy as np
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http

from bench.common import report
from service.settings import PROJECT_ROOT
from tests.e2e.conftest import free_port

Call = Callable[[], object]


def start_server(folder: Path) -> tuple[subprocess.Popen[bytes], int, int]:
    http_port, grpc_port = free_port(), free_port()
    log = (folder / "server.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(http_port),
         "--grpc-port", str(grpc_port)],
        cwd=PROJECT_ROOT, env={**os.environ, "VITSERVE_DEVICE": "cpu"}, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx2.get(f"http://127.0.0.1:{http_port}/health/ready", timeout=2).status_code == 200:
                return process, http_port, grpc_port
        except httpx2.TransportError:
            pass
        time.sleep(0.2)
    process.kill()
    raise SystemExit(f"the service did not become ready: {folder / 'server.log'}")


def grpc_call(port: int, pixels: np.ndarray) -> Call:
    client = triton_grpc.InferenceServerClient(f"127.0.0.1:{port}")
    tensor = triton_grpc.InferInput("pixel_values", list(pixels.shape), "FP32")
    tensor.set_data_from_numpy(pixels)
    return lambda: client.infer("vit", [tensor]).as_numpy("logits")


def http_call(port: int, pixels: np.ndarray) -> Call:
    client = triton_http.InferenceServerClient(f"127.0.0.1:{port}")
    tensor = triton_http.InferInput("pixel_values", list(pixels.shape), "FP32")
    tensor.set_data_from_numpy(pixels, binary_data=True)
    wanted = [triton_http.InferRequestedOutput("logits", binary_data=True)]
    return lambda: client.infer("vit", [tensor], outputs=wanted).as_numpy("logits")


class Client(threading.Thread):
    """One client thread holding a client of each protocol, made and used in it (tritonclient.http's
    gevent client stays in the thread that made it): it runs the rounds it is sent."""

    def __init__(self, ports: tuple[int, int], pixels: np.ndarray) -> None:
        super().__init__(daemon=True)
        self.ports, self.pixels = ports, pixels
        self.orders: queue.Queue[tuple[str, int] | None] = queue.Queue()
        self.results: queue.Queue[list[float]] = queue.Queue()

    def run(self) -> None:
        calls = {"grpc": grpc_call(self.ports[1], self.pixels), "http": http_call(self.ports[0], self.pixels)}
        while (order := self.orders.get()) is not None:
            name, requests = order
            times = []
            for _ in range(requests):
                started = time.perf_counter()
                calls[name]()
                times.append(time.perf_counter() - started)
            self.results.put(times)


def one_round(clients: list[Client], name: str, requests: int) -> tuple[float, list[float]]:
    """Every client thread makes `requests` calls at once: requests per second, and each call's seconds."""
    started = time.perf_counter()
    for client in clients:
        client.orders.put((name, requests))
    latencies = [t for client in clients for t in client.results.get()]
    return len(latencies) / (time.perf_counter() - started), latencies


def measure(ports: tuple[int, int], concurrency: int, rounds: int, requests: int, batch: int) -> list[dict[str, Any]]:
    pixels = np.random.default_rng(0).random((batch, 1, 32, 32), dtype=np.float32)
    clients = [Client(ports, pixels) for _ in range(concurrency)]
    for client in clients:
        client.start()
    names = ("grpc", "http")
    throughput: dict[str, list[float]] = {name: [] for name in names}
    latency: dict[str, list[float]] = {name: [] for name in names}
    for name in names:  # warm-up: connections open, batchers primed
        one_round(clients, name, 2)
    for _ in range(rounds):
        for name in names:
            rate, times = one_round(clients, name, requests)
            throughput[name].append(rate)
            latency[name].append(statistics.median(times))
    for client in clients:
        client.orders.put(None)
    rows = [{"protocol": f"tritonclient.{name}", "concurrency": concurrency, "batch": batch,
             "requests/s": statistics.median(throughput[name]),
             "median ms": 1000 * statistics.median(latency[name])} for name in names]  # fmt: skip
    ratio = rows[0]["requests/s"] / rows[1]["requests/s"]
    rows[0]["grpc/http"], rows[1]["grpc/http"] = ratio, 1.0
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.grpc_vs_rest", description=__doc__)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds per concurrency")
    parser.add_argument("--requests", type=int, default=20, help="calls per client thread per round")
    parser.add_argument("--batch", type=int, default=1, help="images per call")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        process, http_port, grpc_port = start_server(Path(folder))
        try:
            rows = [
                row
                for concurrency in (1, 32)
                for row in measure((http_port, grpc_port), concurrency, args.rounds, args.requests, args.batch)
            ]
        finally:  # fmt: skip
            process.send_signal(signal.SIGTERM)
            process.wait(60)
    report("grpc_vs_rest", rows, args.json)


if __name__ == "__main__":
    main()
