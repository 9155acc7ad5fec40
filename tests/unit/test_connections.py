"""The pure parts of bounded connections: the cap derived from the open-file limit, the guard's
choice of whom to close at the cap, and the body-read deadline."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from fastapi import Request

from service import connections
from service.__main__ import main
from service.app import create_app
from service.connections import ConnectionGuard, connection_limits
from service.context import CLIENT_LEFT, CLOSED_EARLY
from service.http_limits import BodyTimeout, BodyTimeoutMiddleware
from service.settings import Settings


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
        self.unread_since = 0.0
        self.refused = False
        self.loop = type("Loop", (), {"time": lambda _: now})()

    def refuse(self) -> None:
        self.refused = True

    def close_slow_body(self) -> None:
        self.transport.close()

    def shut(self) -> None:
        self.transport.close()

    def drop(self) -> None:
        self.transport.abort()


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


def test_a_client_that_leaves_is_logged_as_499_never_as_an_error(caplog: Any) -> None:
    """Mid-body (the app's read fails) or before its answer (the protocol marks the scope): one
    access line with 499, no error and no traceback."""
    app = create_app(Settings())

    @app.post("/leave")
    async def leave(request: Request) -> None:
        await request.body()

    @app.post("/answered")
    async def answered(request: Request) -> dict[str, str]:
        request.scope[CLOSED_EARLY] = CLIENT_LEFT  # as the protocol's connection_lost does
        return {}

    async def receive() -> dict[str, Any]:
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message["type"])

    sent: list[str] = []
    with caplog.at_level(logging.INFO):
        for path in ("/leave", "/answered"):
            scope = {"type": "http", "method": "POST", "path": path, "raw_path": path.encode(), "query_string": b"",
                     "headers": [], "http_version": "1.1", "scheme": "http", "root_path": ""}  # fmt: skip
            asyncio.run(app(scope, receive, send))
    access = [r.getMessage() for r in caplog.records if r.name == "service.access"]
    assert len(access) == 2 and all(
        line.startswith(f"POST {path} 499 ") and line.endswith("(the client left before its answer)")
        for line, path in zip(access, ("/leave", "/answered"), strict=True)
    ), access
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert sent == ["http.response.start", "http.response.body"]  # /answered's, which uvicorn would drop


def test_a_cap_over_the_descriptor_limit_is_refused_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VITSERVE_MAX_CONNECTIONS", "100000000")
    with pytest.raises(SystemExit) as exit_:
        main([])
    assert exit_.value.code == 2


def test_at_the_cap_an_answer_left_unread_longest_makes_room() -> None:
    """Busy connections whose clients stopped reading (pipelined requests, say) hold their place
    only until `slow_body_s`; then the longest-unread one is dropped for a newcomer."""

    async def scenario() -> None:
        guard, reasons = _guard(cap=2, slow_body_s=3.0)
        first, second = _admit(guard, FakeConnection()), _admit(guard, FakeConnection())
        for conn, since in ((first, 0.0), (second, 1.0)):
            conn.busy, conn.unread_since = True, since
            guard.unread[conn] = None
        early = FakeConnection(now=2.0)
        guard.admit(early)
        assert early.refused  # nobody unread long enough yet
        late = _admit(guard, FakeConnection(now=3.5))
        assert late.slot == "admitted" and first.transport.state == "aborted" and second.transport.state == "open"
        assert reasons == ["refused", "evicted_slow_reader"]

    asyncio.run(scenario())
