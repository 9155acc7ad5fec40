"""Bounded connections: uvicorn's HTTP protocol (httptools) with a header timeout and a cap on open
connections, so idle and slow clients cannot hold the server's descriptors away from the rest.

- Idle: a connection silent for `keep_alive_s` before its first byte (or between requests) is
  closed; uvicorn's keep-alive timer, which it arms only after an answer, is armed at the start too.
- Headers: a request's headers must be complete within `header_timeout_s` of the connection's start
  (or of its previous answer), however slowly its bytes trickle in, else 408 and close; and within
  64 KiB, else 431.
- Answers: a client that leaves an answer unread (its socket buffers full) for `send_timeout_s` is
  dropped, whatever it has pipelined behind it; a connection closed with unsent data is aborted,
  not left to drain into a client that does not read (which would keep the answer in memory).
- Cap: at `max_connections`, a newcomer takes the place of the connection that has waited longest
  without a request in progress (idle or slow headers), else of the request whose body has been
  arriving longest, else of the answer that has waited longest to be read, once either is past
  `slow_body_s` (a body gets 408); only when there is none is the newcomer answered 503, and past
  a small overflow for those answers, dropped.

A request's body is bounded by `BodyTimeoutMiddleware` (service/http_limits.py), its answer by
`TimeoutMiddleware`. Closures are counted by reason and logged as one summary line per interval."""

from __future__ import annotations

import asyncio
import json
import logging
import resource
import weakref
from collections.abc import Callable
from typing import ClassVar

from starlette.types import Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from service.context import CLIENT_LEFT, CLOSED_EARLY

log = logging.getLogger("service")

RESERVED_FDS = 128  # the process's own descriptors: model files, logs, threads' wake-up pipes, ONNX Runtime
DEFAULT_MAX_CONNECTIONS = 4096  # far more than 2-16 cores can serve at once; each costs memory
HEADER_BYTES_LIMIT = 64 * 1024  # a request line and headers larger than this get 431
SUMMARY_INTERVAL_S = 10.0


def raise_descriptor_limit() -> int:
    """Raises the soft limit on open descriptors to the hard one; returns the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):  # an unlimited hard limit, or a platform that refuses
            pass
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def connection_limits(requested: int, descriptors: int) -> tuple[int, int]:
    """(cap, overflow): at most `cap` connections served, and `overflow` more that are being
    answered 503, both within the descriptors left after RESERVED_FDS. `requested` 0 derives the
    cap: three quarters of those descriptors, at most DEFAULT_MAX_CONNECTIONS."""
    budget = descriptors - RESERVED_FDS
    cap = requested or min(DEFAULT_MAX_CONNECTIONS, budget * 3 // 4)
    overflow = max(8, cap // 4)
    if cap < 1 or cap + overflow > budget:
        raise ValueError(
            f"{cap} connections (+{overflow} for 503 answers) do not fit in the {descriptors} open files allowed "
            f"({RESERVED_FDS} reserved): raise `ulimit -n` or lower VITSERVE_MAX_CONNECTIONS"
        )
    return cap, overflow


def _error_body(code: str, message: str) -> bytes:
    return json.dumps({"error": {"code": code, "message": message}}).encode()


def _answer(status: bytes, code: str, message: str) -> bytes:
    """A whole HTTP/1.1 error response, written straight to the socket before closing it."""
    body = _error_body(code, message)
    head = b"HTTP/1.1 %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n"
    return head % (status, len(body)) + body


HEADER_TIMEOUT_ANSWER = _answer(b"408 Request Timeout", "header_timeout", "the request's headers came too slowly")
HEADERS_TOO_LARGE_ANSWER = _answer(
    b"431 Request Header Fields Too Large", "headers_too_large", "the request line and headers are too large"
)
SLOW_BODY_ANSWER = _answer(
    b"408 Request Timeout", "body_timeout", "the request body came too slowly while the server was full"
)
BUSY_BODY = _error_body("too_many_connections", "every connection has a request in progress; retry shortly")
BUSY_HEADERS = [(b"content-type", b"application/json"), (b"content-length", str(len(BUSY_BODY)).encode()),
                (b"retry-after", b"1"), (b"connection", b"close")]  # fmt: skip


class ConnectionGuard:
    """The open connections of one server: which have waited longest without a request, the cap
    and its overflow, and the count of closures by reason (a metric per closure, a log line per
    interval)."""

    def __init__(
        self,
        cap: int,
        overflow: int,
        header_timeout_s: float,
        slow_body_s: float,
        record: Callable[[str], None] = lambda _: None,
        send_timeout_s: float = 30.0,
    ) -> None:
        self.cap = cap
        self.overflow = overflow
        self.header_timeout_s = header_timeout_s
        self.slow_body_s = slow_body_s
        self.send_timeout_s = send_timeout_s
        self.record = record
        self.admitted: dict[GuardedProtocol, None] = {}
        # admitted ones in eviction order, oldest first; those that moved on are pruned when met
        self.waiting: dict[GuardedProtocol, None] = {}  # waiting for a request
        self.receiving: dict[GuardedProtocol, None] = {}  # receiving a request's body
        self.unread: dict[GuardedProtocol, None] = {}  # its answer waits for the client to read
        self.refused = 0
        self.counts: dict[str, int] = {}

    def admit(self, conn: GuardedProtocol) -> None:
        if len(self.admitted) >= self.cap and not (
            self._evict_waiting() or self._evict_slow_body() or self._evict_unread(conn.loop.time())
        ):
            if self.refused < self.overflow:
                self.refused += 1
                conn.slot = "refused"
                conn.refuse()
                self.closed("refused")
            else:
                conn.transport.abort()
                self.closed("dropped")
            return
        conn.slot = "admitted"
        self.admitted[conn] = None
        self.waiting[conn] = None

    def _evict_waiting(self) -> bool:
        """Closes the connection that has waited longest without a request in progress (idle or slow)."""
        while self.waiting:
            conn = next(iter(self.waiting))
            del self.waiting[conn]
            if not conn.busy:  # a busy one comes back at the end when its answer is complete
                self.release(conn)
                conn.shut()
                self.closed("evicted")
                return True
        return False

    def _evict_unread(self, now: float) -> bool:
        """Drops the connection whose answer has waited longest to be read, past `slow_body_s`."""
        for conn in self.unread:
            if now - conn.unread_since < self.slow_body_s:
                return False
            self.release(conn)
            conn.drop()
            self.closed("evicted_slow_reader")
            return True
        return False

    def _evict_slow_body(self) -> bool:
        """Closes, with a 408, the request whose body has been arriving longest, past `slow_body_s`:
        a slow body may hold its place until the body timeout, but not against a newcomer."""
        while self.receiving:
            conn = next(iter(self.receiving))
            if not conn.receiving_body:
                del self.receiving[conn]
            elif conn.loop.time() - conn.request_started < self.slow_body_s:
                return False
            else:
                self.release(conn)
                conn.close_slow_body()
                self.closed("evicted_slow_body")
                return True
        return False

    def await_request(self, conn: GuardedProtocol) -> None:
        """`conn` waits for a request from now on: it goes to the end of the eviction order."""
        if conn.slot == "admitted":
            self.waiting.pop(conn, None)
            self.waiting[conn] = None

    def began_request(self, conn: GuardedProtocol) -> None:
        """`conn`'s request has its headers: it may now receive a body (oldest request first)."""
        if conn.slot == "admitted":
            self.receiving.pop(conn, None)
            self.receiving[conn] = None

    def release(self, conn: GuardedProtocol) -> None:
        if conn.slot == "admitted":
            del self.admitted[conn]
            self.waiting.pop(conn, None)
            self.receiving.pop(conn, None)
            self.unread.pop(conn, None)
        elif conn.slot == "refused":
            self.refused -= 1
        conn.slot = None

    def closed(self, reason: str) -> None:
        """Counts a closure; the first of an interval schedules that interval's summary line."""
        self.record(reason)
        if not self.counts:
            asyncio.get_running_loop().call_later(SUMMARY_INTERVAL_S, self.log_summary)
        self.counts[reason] = self.counts.get(reason, 0) + 1

    def log_summary(self) -> None:
        counts = ", ".join(f"{reason} {n}" for reason, n in sorted(self.counts.items()))
        log.warning(
            "connections closed to protect the others in the last %g s: %s (open: %d of %d)",
            SUMMARY_INTERVAL_S, counts, len(self.admitted), self.cap,
        )  # fmt: skip
        self.counts = {}


async def _busy_app(scope: Scope, receive: Receive, send: Send) -> None:
    """What a refused connection's request gets: 503 with Retry-After, and the connection closed."""
    await send({"type": "http.response.start", "status": 503, "headers": BUSY_HEADERS})
    await send({"type": "http.response.body", "body": BUSY_BODY})


class GuardedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, with the guard's bounds. Bind a guard with `bound_protocol`."""

    guard: ClassVar[ConnectionGuard]
    slot: str | None = None  # "admitted" or "refused" while the guard counts it
    header_timer: asyncio.TimerHandle | None = None
    in_headers = False  # a request has begun and its headers are not complete
    header_bytes = 0
    request_started = 0.0  # loop time its headers were complete
    unread_since = 0.0  # loop time writing paused: the client stopped reading
    send_timer: asyncio.TimerHandle | None = None

    @property
    def busy(self) -> bool:
        """A request is in progress: its headers are complete and its answer is not."""
        return self.cycle is not None and not self.cycle.response_complete

    @property
    def receiving_body(self) -> bool:
        return self.busy and self.cycle.more_body and not self.cycle.response_started

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.cycles: weakref.WeakSet[RequestResponseCycle] = weakref.WeakSet()  # its requests, pipelined ones too
        self.guard.admit(self)
        if not transport.is_closing():
            self._await_request()
            # uvicorn arms its idle timer only after an answer: a connection's first silence counts too
            self.timeout_keep_alive_task = self.loop.call_later(
                self.timeout_keep_alive, self.timeout_keep_alive_handler
            )

    def pause_writing(self) -> None:
        """The socket's buffers are full: the client is not reading. It has `send_timeout_s` to start."""
        super().pause_writing()
        self.unread_since = self.loop.time()
        self.send_timer = self.loop.call_later(self.guard.send_timeout_s, self._send_timeout)
        if self.slot == "admitted":
            self.guard.unread[self] = None

    def resume_writing(self) -> None:
        super().resume_writing()
        if self.send_timer is not None:
            self.send_timer.cancel()
            self.send_timer = None
        self.guard.unread.pop(self, None)

    def _send_timeout(self) -> None:
        self.send_timer = None
        self.drop()
        self.guard.closed("send_timeout")

    def drop(self) -> None:
        """Gives up on a client that does not read: the connection is aborted, its unsent data freed."""
        self._client_left()
        self.transport.abort()

    def _client_left(self) -> None:
        """Every request of the connection still unanswered (pipelined ones too) learns that its client
        is gone: what it sends from now on goes nowhere, and its access line says so."""
        for cycle in list(self.cycles):
            if not cycle.response_complete:
                cycle.scope.setdefault(CLOSED_EARLY, CLIENT_LEFT)  # type: ignore[misc]
                cycle.disconnected = True

    def shut(self) -> None:
        """Closes the connection; aborts it where data is still unsent (a close would wait for the
        client to read it, holding the socket and the data)."""
        if self.transport.get_write_buffer_size():
            self.transport.abort()
        else:
            self.transport.close()

    def timeout_keep_alive_handler(self) -> None:
        if not self.transport.is_closing():
            self.shut()

    def refuse(self) -> None:
        """The request this connection sends is answered 503 (see _busy_app)."""
        self.app = _busy_app

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.in_headers = True
        self.header_bytes = 0

    def on_headers_complete(self) -> None:
        self.in_headers = False
        self.request_started = self.loop.time()
        super().on_headers_complete()
        self.cycles.add(self.cycle)
        self.guard.began_request(self)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.in_headers and not self.busy and not self.transport.is_closing():
            self.header_bytes += len(data)
            if self.header_bytes > HEADER_BYTES_LIMIT:
                self._close_with(HEADERS_TOO_LARGE_ANSWER, "headers_too_large")

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and not self.busy:  # busy: a pipelined request has started
            self._await_request()

    def _await_request(self) -> None:
        """From now, the next request's headers have the header timeout to arrive."""
        if self.header_timer is not None:
            self.header_timer.cancel()
        self.header_timer = self.loop.call_later(self.guard.header_timeout_s, self._header_timeout)
        self.guard.await_request(self)

    def _header_timeout(self) -> None:
        self.header_timer = None
        if self.busy or self.transport.is_closing():
            return
        if self.in_headers:  # a request has begun: tell it why; a silent connection just closes
            self._close_with(HEADER_TIMEOUT_ANSWER, "header_timeout")
        else:
            self.shut()

    def close_slow_body(self) -> None:
        """Answers 408 for the app, which waits for the body: from now on it receives a disconnect,
        and what it sends is dropped; its access line shows the 408."""
        self.cycle.scope[CLOSED_EARLY] = (408, "its body came too slowly while the server was full")  # type: ignore[literal-required]
        self.cycle.disconnected = True
        self.cycle.message_event.set()
        self.transport.write(SLOW_BODY_ANSWER)
        self.transport.close()

    def _close_with(self, answer: bytes, reason: str) -> None:
        self.transport.write(answer)
        self.transport.close()
        self.guard.closed(reason)

    def handle_websocket_upgrade(self) -> None:
        self._forget()  # the connection is the WebSocket protocol's from now on
        super().handle_websocket_upgrade()

    def connection_lost(self, exc: Exception | None) -> None:
        self._client_left()  # before its answers were complete, if any: the access lines say so
        self._forget()
        super().connection_lost(exc)

    def _forget(self) -> None:
        for timer in (self.header_timer, self.send_timer):
            if timer is not None:
                timer.cancel()
        self.header_timer = self.send_timer = None
        self.guard.release(self)


def bound_protocol(guard: ConnectionGuard) -> type[GuardedProtocol]:
    """The protocol class to give uvicorn (`Config(http=...)`), bound to `guard`."""
    return type("GuardedProtocol", (GuardedProtocol,), {"guard": guard})
