"""`python -m service --workers 2`: both workers serve one port, /metrics adds their counts up
whichever answers, a killed worker is replaced, and SIGTERM drains them all to exit 0."""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import httpx2
import pytest

from tests.e2e.conftest import running_server
from tests.helpers import held_out_digits, png_bytes

CLASSIFIED = re.compile(r'^vitserve_requests_total\{model="vit",route="/v1/classify",status="200"\} (\S+)$', re.M)


def children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:  # the parent's pid
            found.append(int(stat.parent.name))
    return found


def workers_of(pid: int) -> list[int]:
    """The worker processes (the spawn machinery also starts a resource tracker)."""
    return [c for c in children(pid) if b"resource_tracker" not in Path(f"/proc/{c}/cmdline").read_bytes()]


def test_two_workers_serve_count_and_survive(tmp_path: Path) -> None:
    digit = png_bytes(held_out_digits()[0][0])
    with running_server(tmp_path, VITSERVE_WORKERS="2") as server:
        assert len(workers_of(server.process.pid)) == 2
        with httpx2.Client(base_url=server.url, timeout=30) as client:
            for _ in range(12):
                response = client.post("/v1/classify", content=digit, headers={"content-type": "image/png"})
                assert response.status_code == 200
            counts = set()
            for _ in range(8):  # new connections: the scrapes land on both workers
                with httpx2.Client(base_url=server.url, timeout=30) as scraper:
                    counts.add(float(CLASSIFIED.search(scraper.get("/metrics").text).group(1)))  # type: ignore[union-attr]
            assert counts == {12.0}
            metrics = client.get("/metrics").text
            assert 'vitserve_model_ready{model="vit",version="1"} 1.0' in metrics

        victim = workers_of(server.process.pid)[0]
        os.kill(victim, signal.SIGKILL)  # no chance to drain: the parent starts another
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            current = workers_of(server.process.pid)
            if len(current) == 2 and victim not in current:
                break
            time.sleep(0.2)
        else:
            pytest.fail("the killed worker was not replaced")
        for _ in range(6):  # the other worker serves while the new one loads
            response = httpx2.post(f"{server.url}/v1/classify", content=digit, headers={"content-type": "image/png"})
            assert response.status_code == 200
        while server.log_path.read_text().count("Application startup complete") < 3 and time.monotonic() < deadline:
            time.sleep(0.2)  # the new worker has loaded the models
    log = server.log_path.read_text()
    assert "exited (-9); starting another" in log
    assert log.count("SIGTERM: readiness is 503") == 2  # each worker drained
