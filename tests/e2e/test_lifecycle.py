"""A real `python -m service --model-control-mode explicit` under steady load from a pool of client
threads while an operator, through `tritonclient` as it is, rolls a new version in, tries a broken
one, and unloads the model: no request fails but those that ask after the unload (404), and
20 load/unload cycles leave the process's memory where it was."""

from __future__ import annotations

import shutil
import threading
from collections import Counter
from pathlib import Path

import httpx2
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from tests.api.test_lifecycle import PNG, add_version
from tests.conftest import TINY_NAME, copy_repository
from tests.e2e.conftest import running_server

CLIENTS = 4


class Traffic:
    """CLIENTS threads classifying in a loop, each answer's status and version counted by phase."""

    def __init__(self, url: str) -> None:
        self.url, self.phase = url, "start"
        self.seen: Counter[tuple[str, str]] = Counter()
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._loop) for _ in range(CLIENTS)]
        self.lock = threading.Lock()

    def _loop(self) -> None:
        with httpx2.Client(timeout=30) as client:
            while not self.stop.is_set():
                began = self.phase
                try:
                    response = client.post(f"{self.url}/v1/classify?model={TINY_NAME}", **PNG)
                    outcome = f"{response.status_code} v{response.headers.get('x-model-version', '-')}"
                except httpx2.TransportError as exc:
                    outcome = f"transport error {type(exc).__name__}"
                # a request that straddles a phase change belongs to neither: its own "a->b" (a 404
                # asked just before an unload, answered after, is right; so is a 200 of the old version)
                phase = began if self.phase == began else f"{began}->{self.phase}"
                with self.lock:
                    self.seen[(phase, outcome)] += 1

    def __enter__(self) -> Traffic:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=30)

    def during(self, phase: str) -> dict[str, int]:
        with self.lock:
            return {outcome: n for (p, outcome), n in self.seen.items() if p == phase}


def resident_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.fixture()
def repository(tiny_repository: Path, tmp_path: Path) -> Path:
    return copy_repository(tiny_repository / TINY_NAME, tmp_path / "repo" / TINY_NAME).parent


def test_roll_in_refuse_and_unload_under_load(repository: Path, tmp_path: Path) -> None:
    model_dir = repository / TINY_NAME
    env = {"VITSERVE_MODEL_REPOSITORY": str(repository), "VITSERVE_MODEL_CONTROL_MODE": "explicit"}
    with running_server(tmp_path, **env) as server:
        operator = triton.InferenceServerClient(server.url.removeprefix("http://"), network_timeout=120)
        assert operator.get_model_repository_index() == [
            {"name": TINY_NAME, "version": "1", "state": "READY", "reason": ""}
        ]
        with Traffic(server.url) as traffic:
            traffic.phase = "reload"
            add_version(model_dir, 2)
            operator.load_model(TINY_NAME)
            traffic.phase = "after reload"
            wait_for_answers(traffic, "after reload")

            traffic.phase = "broken"
            (model_dir / "3").mkdir()
            (model_dir / "3" / "manifest.json").write_text("{not json")
            with pytest.raises(InferenceServerException, match="version 3"):
                operator.load_model(TINY_NAME)
            states = {(r["version"], r["state"]) for r in operator.get_model_repository_index()}
            assert states == {("2", "READY"), ("3", "UNAVAILABLE")}
            wait_for_answers(traffic, "broken")  # a failed load is quick: answers to look at, on busy cores too
            shutil.rmtree(model_dir / "3")
            traffic.phase = "before unload"
            wait_for_answers(traffic, "before unload")

            traffic.phase = "unload"
            operator.unload_model(TINY_NAME)
            traffic.phase = "after unload"
            wait_for_answers(traffic, "after unload")
        failed = [outcome for (_, outcome) in traffic.seen if not outcome.startswith(("200", "404"))]
        assert not failed, traffic.seen  # no 5xx, no reset connection, whatever the phase
        assert set(traffic.during("reload")) <= {"200 v1", "200 v2"}, traffic.seen
        assert set(traffic.during("after reload")) == {"200 v2"}, traffic.seen
        assert set(traffic.during("broken")) == {"200 v2"}, traffic.seen
        assert set(traffic.during("before unload")) == {"200 v2"}, traffic.seen
        assert set(traffic.during("unload")) <= {"200 v2", "404 v-"}, traffic.seen  # asked before, or after
        assert set(traffic.during("after unload")) == {"404 v-"}, traffic.seen
        assert not operator.is_model_ready(TINY_NAME)
        print(f"\nanswers by phase: {dict(traffic.seen)}")


def wait_for_answers(traffic: Traffic, phase: str, count: int = 2 * CLIENTS) -> None:
    """Until each client has had about two answers in this phase."""
    while sum(traffic.during(phase).values()) < count:
        traffic.stop.wait(0.05)


def test_twenty_load_unload_cycles_give_the_memory_back(repository: Path, tmp_path: Path) -> None:
    env = {"VITSERVE_MODEL_REPOSITORY": str(repository), "VITSERVE_MODEL_CONTROL_MODE": "explicit"}
    with running_server(tmp_path, **env) as server:
        operator = triton.InferenceServerClient(server.url.removeprefix("http://"), network_timeout=120)
        with httpx2.Client(timeout=30) as client:
            assert client.post(f"{server.url}/v1/classify?model={TINY_NAME}", **PNG).status_code == 200
            start = resident_mib(server.process.pid)
            for _ in range(20):
                operator.unload_model(TINY_NAME)
                operator.load_model(TINY_NAME)
                assert client.post(f"{server.url}/v1/classify?model={TINY_NAME}", **PNG).status_code == 200
        grown = resident_mib(server.process.pid) - start
        print(f"\nresident memory after 20 load/unload cycles: {grown:+.1f} MiB")
        assert grown < 100
