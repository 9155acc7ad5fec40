"""Bounded connections: uvicorn's HTTP protocol (httptools) with a header timeout and a cap on open
connections, so idle and slow clients cannot hold the server's descriptors away from the rest.

- Idle: a connection silent for `keep_alive_s` before its first byte (or between requests) is
  closed; uvicorn's keep-alive timer, which it arms only after an answer, is armed at the start too.
- Headers: every request's head (request line and headers), pipelined or not, however its bytes
  arrive, must be complete within `header_timeout_s` of the connection's start, of its previous
  answer, or (pipelined behind an answer in progress) of its first byte, else 408; within
  HEADER_BYTES_LIMIT (64 KiB) and MAX_HEADERS (100) fields, else 431, counted before the bytes are
  kept: a chunk read while a head is open is measured up to the head's end before the parser sees it
  (one ever-growing header value is refused at 64 KiB, not read to 64 MiB), and the parser's
  callbacks count each field and the URL as they come (10,000 headers in one write are refused at the
  101st). A malformed request gets 400. While earlier requests of the connection are being answered,
  the refusal waits for their answers (never written into the middle of one), nothing more is read,
  and then the connection is closed.
- Pipelining: at most MAX_PIPELINED requests wait behind the one being answered, and reading stays
  paused while one waits (uvicorn resumed it whenever the running request read its body, so a client
  that pipelined without reading its answers had every request it sent parsed and queued: 32 MiB of
  them held 2.4 GB); a request past that gets 429 after the others' answers, and the connection
  is closed.
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

import httptools
from starlette.types import Receive, Scope, Send
from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from service.context import CLIENT_LEFT, CLOSED_EARLY

log = logging.getLogger("service")

RESERVED_FDS = 128  # the process's own descriptors: model files, logs, threads' wake-up pipes, ONNX Runtime
DEFAULT_MAX_CONNECTIONS = 4096  # far more than 2-16 cores can serve at once; each costs memory
HEADER_BYTES_LIMIT = 64 * 1024  # a request line and headers larger than this get 431
MAX_HEADERS = 100  # header fields in one request (Apache's LimitRequestFields); more get 431
MAX_PIPELINED = 32  # requests waiting behind the one being answered on one connection; more get 429
HEAD_END = b"\r\n\r\n"
LINGER_S = 2.0  # after a refusal, how long what the client still sends is read and dropped
LINGER_BYTES = 4 * 2**20  # and how much of it
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
    b"431 Request Header Fields Too Large", "headers_too_large",
    f"the request line and headers are over {HEADER_BYTES_LIMIT} bytes",
)  # fmt: skip
TOO_MANY_HEADERS_ANSWER = _answer(
    b"431 Request Header Fields Too Large", "headers_too_large", f"the request has over {MAX_HEADERS} header fields"
)
TOO_MANY_PIPELINED_ANSWER = _answer(
    b"429 Too Many Requests", "too_many_pipelined",
    f"over {MAX_PIPELINED} requests were sent ahead of their answers; the rest were not read",
)  # fmt: skip
MALFORMED_ANSWER = _answer(b"400 Bad Request", "malformed_request", "the request is not valid HTTP/1.1")
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


class HeadRefused(Exception):
    """Raised in a parser callback to stop the parser: what the client sent is refused with `answer`."""

    def __init__(self, answer: bytes, reason: str) -> None:
        super().__init__(reason)
        self.answer, self.reason = answer, reason


class GuardedFlow(FlowControl):
    """uvicorn's flow control, but reading stays paused while a request waits behind the one being
    answered, or the connection is being refused: uvicorn resumes it whenever the running request
    reads (its body, or a disconnect), and a pipelined request's body or the requests behind it would
    then be read without bound."""

    def __init__(self, transport: asyncio.Transport, protocol: GuardedProtocol) -> None:
        super().__init__(transport)
        self.protocol = protocol

    def resume_reading(self) -> None:
        if not self.protocol.pipeline and self.protocol.refusal is None:
            super().resume_reading()


class GuardedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, with the guard's bounds. Bind a guard with `bound_protocol`."""

    guard: ClassVar[ConnectionGuard]
    slot: str | None = None  # "admitted" or "refused" while the guard counts it
    header_timer: asyncio.TimerHandle | None = None
    in_headers = False  # a request has begun and its headers are not complete
    in_body = False  # the parser is reading a request's body: the bytes that come are not a head's
    head_seen = 0  # bytes of the head being read, measured before the parser sees them
    head_tail = b""  # the last bytes of the previous chunk, where a head's end may begin
    head_bytes = 0  # bytes of the head being read, as the parser's callbacks give its parts
    head_began = False  # the head being read began in the chunk being parsed
    body_fed = 0  # body bytes the chunk being parsed gave the request before that head
    header_count = 0
    refusal: bytes | None = None  # the answer to send once the answers in progress are complete
    lingering = -1  # bytes dropped since the refusal was sent (-1: not sent)
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
        self.flow = GuardedFlow(transport, self)
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

    # the head of each request: measured before the parser keeps it, counted as the parser reads it ---

    def data_received(self, data: bytes) -> None:
        """uvicorn's, with every head measured first: a chunk that arrives while a head is open (no
        body being read) counts, up to the head's end, against HEADER_BYTES_LIMIT before the parser
        sees it; and refusals (431, 400, 429) that wait for the answers in progress."""
        if self.lingering >= 0:
            self.lingering += len(data)
            if self.lingering > LINGER_BYTES:
                self.transport.abort()
            return
        if self.refusal is not None or self.transport.is_closing():
            return  # being refused: nothing more is read
        self._unset_keepalive_if_required()
        if not self.in_body and not self._head_fits(data):
            self._refuse(HEADERS_TOO_LARGE_ANSWER, "headers_too_large")
            return
        self.head_began, self.body_fed = False, 0
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
        except httptools.HttpParserError as exc:
            if isinstance(exc.__context__, HeadRefused):
                self._refuse(exc.__context__.answer, exc.__context__.reason)
            else:
                self.logger.warning("Invalid HTTP request received.")  # uvicorn's words: service.logs collapses them
                self._refuse(MALFORMED_ANSWER, "malformed")
        else:
            if self.in_headers and self.head_began and not self._began_head_fits(data):
                self._refuse(HEADERS_TOO_LARGE_ANSWER, "headers_too_large")
            # where the blank line that ends a head may begin: the next chunk may hold its end
            self.head_tail = b"" if self.in_body else (self.head_tail + data[-3:])[-3:]

    def _head_fits(self, data: bytes) -> bool:
        """Whether the head being read, with this chunk's part of it, stays within HEADER_BYTES_LIMIT."""
        end = -1
        if self.head_tail:  # the blank line that ends a head may have begun in the previous chunk
            end = (self.head_tail + data[:3]).find(HEAD_END)
            end = end + len(HEAD_END) - len(self.head_tail) if end >= 0 else -1
        if end < 0:
            end = data.find(HEAD_END)
            end = end + len(HEAD_END) if end >= 0 else -1
        self.head_seen += len(data) if end < 0 else end
        return self.head_seen <= HEADER_BYTES_LIMIT

    def _began_head_fits(self, data: bytes) -> bool:
        """A head that began inside this chunk, after an earlier request (pipelined), and is still
        open at its end: its bytes here are those after the chunk's last blank line less the body
        bytes given since (an upper bound, but for a chunked body's framing), within the limit."""
        start = data.rfind(HEAD_END)
        self.head_seen = max(0, len(data) - (start + len(HEAD_END) if start >= 0 else 0) - self.body_fed)
        return self.head_seen <= HEADER_BYTES_LIMIT

    def on_message_begin(self) -> None:
        if len(self.pipeline) >= MAX_PIPELINED:
            raise HeadRefused(TOO_MANY_PIPELINED_ANSWER, "pipelined_too_deep")
        super().on_message_begin()
        self.head_began = True
        self.in_headers = True
        self.head_bytes = self.header_count = 0
        if self.header_timer is None:  # pipelined behind an answer in progress: its own header timeout
            self.header_timer = self.loop.call_later(self.guard.header_timeout_s, self._header_timeout)

    def on_url(self, url: bytes) -> None:
        self._count_head(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self.header_count += 1
        if self.header_count > MAX_HEADERS:
            raise HeadRefused(TOO_MANY_HEADERS_ANSWER, "headers_too_large")
        self._count_head(len(name) + len(value) + 4)  # ": " and CRLF
        super().on_header(name, value)

    def _count_head(self, size: int) -> None:
        self.head_bytes += size
        if self.head_bytes > HEADER_BYTES_LIMIT:
            raise HeadRefused(HEADERS_TOO_LARGE_ANSWER, "headers_too_large")

    def on_headers_complete(self) -> None:
        self.in_headers = False
        self._head_done()
        self.head_began, self.body_fed = False, 0
        self.in_body = True
        if self.header_timer is not None:
            self.header_timer.cancel()
            self.header_timer = None
        self.request_started = self.loop.time()
        super().on_headers_complete()
        self.cycles.add(self.cycle)
        self.guard.began_request(self)

    def on_body(self, body: bytes) -> None:
        self.body_fed += len(body)
        super().on_body(body)

    def on_message_complete(self) -> None:
        self.in_body = False
        self._head_done()
        super().on_message_complete()

    def _head_done(self) -> None:
        self.head_seen, self.head_tail = 0, b""

    def _refuse(self, answer: bytes, reason: str) -> None:
        """Refuses what the client sends now with `answer` and closes the connection: at once, or where
        answers are in progress (pipelined requests ahead of it), after them; nothing more is read."""
        self.guard.closed(reason)
        if self.busy:
            self.refusal = answer
            self.flow.pause_reading()
        else:
            self._close_with(answer)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.transport.is_closing() or self.busy:  # busy: a pipelined request has started
            return
        if self.refusal is not None:
            self._close_with(self.refusal)
        else:
            self._await_request()

    def _await_request(self) -> None:
        """From now, the next request's headers have the header timeout to arrive."""
        if self.header_timer is not None:
            self.header_timer.cancel()
        self.header_timer = self.loop.call_later(self.guard.header_timeout_s, self._header_timeout)
        self.guard.await_request(self)

    def _header_timeout(self) -> None:
        self.header_timer = None
        if self.transport.is_closing() or self.refusal is not None:
            return
        if self.in_headers:  # a request has begun: tell it why (after the answers ahead of it)
            self._refuse(HEADER_TIMEOUT_ANSWER, "header_timeout")
        elif not self.busy:  # a silent connection just closes
            self.shut()

    def close_slow_body(self) -> None:
        """Answers 408 for the app, which waits for the body: from now on it receives a disconnect,
        and what it sends is dropped; its access line shows the 408."""
        self.cycle.scope[CLOSED_EARLY] = (408, "its body came too slowly while the server was full")  # type: ignore[literal-required]
        self.cycle.disconnected = True
        self.cycle.message_event.set()
        self.transport.write(SLOW_BODY_ANSWER)
        self.transport.close()

    def _close_with(self, answer: bytes) -> None:
        """Sends `answer` and closes the connection. Closed with data unread, a socket is reset, and
        the reset can take the answer away before the client reads it: so the connection is
        half-closed after the answer, and what the client still sends read and dropped, for up to
        LINGER_S and LINGER_BYTES (nginx's lingering close)."""
        self.transport.write(answer)
        if not self.transport.can_write_eof():
            self.transport.close()
            return
        self.transport.write_eof()
        self.lingering = 0
        self.transport.resume_reading()
        self.loop.call_later(LINGER_S, self.shut)

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
