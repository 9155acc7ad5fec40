"""SIGTERM under load: readiness turns 503 first, every request that got an answer got a whole
one, and the process exits 0."""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import httpx2

from tests.e2e.conftest import running_server
from tests.helpers import held_out_digits, png_bytes

DIGIT = png_bytes(held_out_digits()[0][0])


async def load(url: str, stop: asyncio.Event, outcomes: Counter[str]) -> None:
    async with httpx2.AsyncClient(base_url=url, timeout=30) as client:

        async def worker() -> None:
            while not stop.is_set():
                try:
                    response = await client.post("/v1/classify", content=DIGIT, headers={"content-type": "image/png"})
                except (httpx2.ConnectError, httpx2.RemoteProtocolError, httpx2.ReadError) as exc:
                    # refused or closed before an answer began: allowed once the server stops accepting;
                    # a body cut off mid-way would surface here too, so it is told apart below
                    outcomes["cut off" if isinstance(exc, httpx2.RemoteProtocolError) and "incomplete" in str(exc)
                             else "not accepted"] += 1  # fmt: skip
                    await asyncio.sleep(0.01)
                    continue
                if response.status_code == 200 and len(response.json()["results"][0]) == 5:
                    outcomes["whole"] += 1
                else:
                    outcomes[f"status {response.status_code}"] += 1

        await asyncio.gather(*(worker() for _ in range(16)))


async def until(condition: Callable[[], bool]) -> None:
    """Wait for an event (with a generous guard against a hang, not a timing assertion)."""
    deadline = time.monotonic() + 60
    while not condition():
        assert time.monotonic() < deadline, "gave up waiting"
        await asyncio.sleep(0.01)


async def readiness_turns_503(url: str) -> bool:
    """Poll readiness until it answers 503; False if the server stopped listening first."""
    async with httpx2.AsyncClient(timeout=30) as probe:
        for _ in range(6000):
            try:
                if (await probe.get(f"{url}/health/ready")).status_code == 503:
                    return True
            except httpx2.TransportError:
                return False
            await asyncio.sleep(0.01)
    return False


def test_sigterm_under_load_loses_nothing(tmp_path: Path) -> None:
    """Event-driven: SIGTERM once answers flow, then readiness must turn 503 and answers go on after it.
    The drain (10 s) is far longer than a loaded machine needs to see both."""
    outcomes: Counter[str] = Counter()
    with running_server(tmp_path, VITSERVE_SHUTDOWN_DRAIN_S="10") as server:

        async def scenario() -> bool:
            stop = asyncio.Event()
            traffic = asyncio.create_task(load(server.url, stop, outcomes))
            await until(lambda: outcomes["whole"] >= 16)
            server.process.send_signal(signal.SIGTERM)
            draining = await readiness_turns_503(server.url)
            served_at_503 = outcomes["whole"]
            if draining:
                await until(lambda: outcomes["whole"] > served_at_503 or traffic.done())
            still_serving = outcomes["whole"] > served_at_503
            stop.set()
            await traffic
            return draining and still_serving

        assert asyncio.run(scenario()), f"readiness did not turn 503 while requests were still served: {outcomes}"
        assert server.process.wait(timeout=60) == 0, server.log_path.read_text()
    print(f"SIGTERM under load: {outcomes}")
    assert outcomes["whole"] > 0 and outcomes["cut off"] == 0
    assert set(outcomes) <= {"whole", "not accepted"}, outcomes  # nothing cut off, no 5xx, no other status
