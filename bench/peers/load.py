"""The load generator, as in bench/service.py: an asyncio client keeping `concurrency` requests in
flight for a fixed time, cycling through prepared requests; requests/s, p50 and p99 latency, non-200
answers, and (when asked) each answer's `Server-Timing` stages."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import httpx2
import numpy as np

from bench.peers.servers import Request


@dataclass
class Run:
    rate: float  # requests/s
    p50: float  # ms
    p99: float  # ms
    errors: int  # answers other than 200, and requests that failed outright
    stages: list[dict[str, float]] = field(default_factory=list)  # Server-Timing per answer, ms
    answered: int = 0  # requests answered (any status)


def server_timing(value: str) -> dict[str, float]:
    """`decode;dur=0.41, preprocess;dur=0.12` -> {"decode": 0.41, "preprocess": 0.12}."""
    stages = {}
    for part in value.split(","):
        name, _, params = part.strip().partition(";")
        for param in params.split(";"):
            key, _, number = param.strip().partition("=")
            if key == "dur":
                stages[name] = float(number)
    return stages


async def _load(url: str, requests: list[Request], concurrency: int, seconds: float, timings: bool) -> Run:
    latencies: list[float] = []
    stages: list[dict[str, float]] = []
    errors = 0
    deadline = time.perf_counter() + seconds
    limits = httpx2.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx2.AsyncClient(base_url=url, limits=limits, timeout=60) as client:

        async def worker(offset: int) -> None:
            nonlocal errors
            i = offset
            while time.perf_counter() < deadline:
                request = requests[i % len(requests)]
                started = time.perf_counter()
                try:
                    response = await client.post(request.path, content=request.body, headers=request.headers)
                except httpx2.HTTPError:  # counted, not timed; a pause so a dead server is not hammered
                    errors += 1
                    await asyncio.sleep(0.01)
                    continue
                latencies.append(time.perf_counter() - started)
                errors += response.status_code != 200
                if timings and "server-timing" in response.headers:
                    stages.append(server_timing(response.headers["server-timing"]))
                i += concurrency

        started = time.perf_counter()
        await asyncio.gather(*(worker(i) for i in range(concurrency)))
        elapsed = time.perf_counter() - started
    ms = np.array(latencies or [np.nan]) * 1000
    p50, p99 = float(np.median(ms)), float(np.quantile(ms, 0.99))
    return Run(len(latencies) / elapsed, p50, p99, errors, stages, len(latencies))


def load(
    url: str, requests: list[Request], concurrency: int, seconds: float, timings: bool = False, warmup: float = 0.5
) -> Run:
    """One timed run, after `warmup` seconds of the same load to open the connections and warm the server."""
    if warmup > 0:
        asyncio.run(_load(url, requests, concurrency, warmup, False))
    return asyncio.run(_load(url, requests, concurrency, seconds, timings))
