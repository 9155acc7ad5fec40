"""The pure parts of bounded connections: the cap derived from the open-file limit, the guard's
choice of whom to close at the cap, and the body-read deadline."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from service import connections
from service.connections import ConnectionGuard, connection_limits
from service.limits import BodyTimeout, BodyTimeoutMiddleware


def test_the_cap_is_derived_well_under_the_descriptor_limit() -> None:
    assert connection_limits(0, 1024) == (672, 168)  # 3/4 of 1024 - 128, and a quarter more for 503s
    assert connection_limits(0, 1_048_576) == (4096, 1024)
    assert connection_limits(100, 1024) == (100, 25)
    for requested, descriptors in ((800, 1024), (0, 130), (10, 140)):
        with pytest.raises(ValueError, match="ulimit -n"):
            connection_limits(requested, descriptors)


class FakeTransport:
    def __init__(self) -> None:
        self.state = "open"
        self.written = b""

    def close(self) -> None:
        self.state = "closed"

    def abort(self) -> None:
        self.state = "aborted"

    def write(self, data: bytes) -> None:
        self.written += data


class FakeConnection:
    """What the guard uses of a GuardedProtocol."""

    def __init__(self, now: float = 0.0) -> None:
        self.transport = FakeTransport()
        self.slot: str | None = None
        self.busy = False
        self.receiving_body = False
        self.request_started = 0.0
        self.refused = False
        self.loop = type("Loop", (), {"time": lambda _: now})()

    def refuse(self) -> None:
        self.refused = True

    def close_slow_body(self) -> None:
        self.transport.close()


def _guard(cap: int = 3, overflow: int = 2, slow_body_s: float = 3.0) -> tuple[ConnectionGuard, list[str]]:
    reasons: list[str] = []
    return ConnectionGuard(cap, overflow, 10.0, slow_body_s, reasons.append), reasons


def _admit(guard: ConnectionGuard, conn: Any) -> Any:
    guard.admit(conn)
    return conn


def test_at_the_cap_the_longest_waiting_idle_connection_makes_room() -> None:
    async def scenario() -> None:
        guard, reasons = _guard()
        first, second, third = (_admit(guard, FakeConnection()) for _ in range(3))
        first.busy = True  # a request in progress is never evicted
        guard.await_request(second)  # answered since: it moves to the back
        newcomer = _admit(guard, FakeConnection())
        assert third.transport.state == "closed" and reasons == ["evicted"]
        assert first.transport.state == second.transport.state == newcomer.transport.state == "open"
        assert newcomer.slot == "admitted" and third.slot is None and len(guard.admitted) == 3

    asyncio.run(scenario())


def test_when_all_are_busy_newcomers_get_503_then_are_dropped() -> None:
    async def scenario() -> None:
        guard, reasons = _guard()
        for conn in [_admit(guard, FakeConnection()) for _ in range(3)]:
            conn.busy = True
        refused = [_admit(guard, FakeConnection()) for _ in range(2)]
        dropped = _admit(guard, FakeConnection())
        assert all(conn.refused and conn.transport.state == "open" for conn in refused)
        assert dropped.transport.state == "aborted" and reasons == ["refused", "refused", "dropped"]
        guard.release(refused[0])  # its 503 is sent and it closed: room for the next refusal
        assert _admit(guard, FakeConnection()).refused

    asyncio.run(scenario())


def test_a_slow_body_gives_way_to_a_newcomer_but_a_recent_one_does_not() -> None:
    async def scenario() -> None:
        guard, reasons = _guard(cap=2)
        old, recent = (_admit(guard, FakeConnection(now=10.0)) for _ in range(2))
        for conn, started in ((old, 5.0), (recent, 9.0)):
            conn.busy = conn.receiving_body = True
            conn.request_started = started
            guard.began_request(conn)
        newcomer = _admit(guard, FakeConnection())
        assert old.transport.state == "closed" and recent.transport.state == "open"
        assert newcomer.slot == "admitted" and reasons == ["evicted_slow_body"]
        newcomer.busy = True
        assert _admit(guard, FakeConnection()).refused  # recent: 1 s of its body, under slow_body_s

    asyncio.run(scenario())


def test_closures_are_logged_once_per_interval(monkeypatch: pytest.MonkeyPatch, caplog: Any) -> None:
    monkeypatch.setattr(connections, "SUMMARY_INTERVAL_S", 0.05)

    async def scenario() -> None:
        guard, _ = _guard(cap=1)
        for _ in range(20):
            _admit(guard, FakeConnection())
        await asyncio.sleep(0.2)

    with caplog.at_level(logging.WARNING, logger="service"):
        asyncio.run(scenario())
    (line,) = caplog.messages
    assert "evicted 19" in line and "(open: 1 of 1)" in line


def test_a_body_that_does_not_arrive_in_time_is_refused() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        while (await receive()).get("more_body"):
            pass

    async def trickle() -> dict[str, Any]:
        await asyncio.sleep(0.02)
        return {"type": "http.request", "body": b"x", "more_body": True}

    async def whole() -> dict[str, Any]:
        return {"type": "http.request", "body": b"x", "more_body": False}

    scope = {"type": "http"}
    with pytest.raises(BodyTimeout):
        asyncio.run(BodyTimeoutMiddleware(app, seconds=0.2)(scope, trickle, None))  # type: ignore[arg-type]
    asyncio.run(BodyTimeoutMiddleware(app, seconds=0.2)(scope, whole, None))  # type: ignore[arg-type]
