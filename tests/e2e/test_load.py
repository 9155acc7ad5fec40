"""Load: thousands of requests at concurrency 64 against a real uvicorn process; nothing fails but
designed 503s, and resident memory stops growing after warm-up."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import httpx2

from tests.e2e.conftest import running_server
from tests.helpers import held_out_digits, png_bytes

DIGITS = [png_bytes(image) for image in held_out_digits()[0][:64]]
CONCURRENCY = 64


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


async def burst(url: str, requests: int) -> Counter[int]:
    """`requests` classify requests, CONCURRENCY always in flight; status -> count."""
    statuses: Counter[int] = Counter()
    remaining = iter(range(requests))
    limits = httpx2.Limits(max_connections=CONCURRENCY)
    async with httpx2.AsyncClient(base_url=url, timeout=60, limits=limits) as client:

        async def worker() -> None:
            for i in remaining:
                response = await client.post(
                    "/v1/classify", content=DIGITS[i % 64], headers={"content-type": "image/png"}
                )
                statuses[response.status_code] += 1
                if response.status_code == 200:
                    assert len(response.json()["results"][0]) == 5

        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return statuses


def test_thousands_of_requests_without_errors_or_leaks(tmp_path: Path) -> None:
    with running_server(tmp_path) as server:
        pid = server.process.pid
        warm = asyncio.run(burst(server.url, 1000))
        after_warmup = rss_mib(pid)
        rounds = [asyncio.run(burst(server.url, 2000)) for _ in range(3)]
        sizes = [rss_mib(pid)]
        statuses = sum(rounds, warm)
        for _ in range(2):
            statuses += asyncio.run(burst(server.url, 2000))
            sizes.append(rss_mib(pid))
    print(f"load: {dict(statuses)}; RSS after warm-up {after_warmup:.1f} MiB, then {[round(s, 1) for s in sizes]} MiB")
    assert set(statuses) <= {200, 503}, statuses  # 503 only as designed back-pressure
    assert statuses[200] >= 10_000 * 0.95
    assert sizes[-1] - sizes[0] < 10, "resident memory still grows after warm-up"
