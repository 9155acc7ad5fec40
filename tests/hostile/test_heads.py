"""Issue 25, item 1: request heads bounded at every point of a connection's life, against a real
`python -m service` (service/connections.py). Every request's head, pipelined behind an answer in
progress or not, however its bytes arrive, is counted (bytes and header fields) before the parser
keeps it and timed; a refusal waits for the answers ahead of it and is never written into one.

Before (measured on this machine): behind an answer in progress, 64 MiB of small headers were read
(+437 MiB resident at peak, /health/live 270 ms) and one ever-growing header value was read to
64 MiB (/health/live 2.0-2.3 s); 32 MiB of pipelined GETs held 2.4 GB; 10,000 headers in one
write got a 200. Structural checks here: statuses, their order, what the server took, its memory."""

from __future__ import annotations

import io
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx2
import pytest
from PIL import Image

from service.connections import HEADER_BYTES_LIMIT, MAX_HEADERS, MAX_PIPELINED
from tests.e2e.conftest import Server
from tests.hostile.test_connections import _closed, _connect, _live_latency, _read_until_closed, _serve

GET_LIVE = b"GET /health/live HTTP/1.1\r\nHost: t\r\n\r\n"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    env = {"VITSERVE_HEADER_TIMEOUT_S": "2", "VITSERVE_KEEP_ALIVE_S": "5", "VITSERVE_MAX_CONNECTIONS": "100"}
    yield from _serve(tmp_path_factory.mktemp("heads"), **env)


def busy_request() -> bytes:
    """A request whose answer takes a while (a 36 Mpx image decoded and resized): pipelined requests
    queue behind it."""
    out = io.BytesIO()
    Image.new("L", (6000, 6000), 9).save(out, format="PNG")
    body = out.getvalue()
    head = b"POST /v1/classify HTTP/1.1\r\nHost: t\r\nContent-Type: image/png\r\nContent-Length: %d\r\n\r\n"
    return head % len(body) + body


def statuses(answer: bytes) -> list[int]:
    return [int(code) for code in re.findall(rb"HTTP/1\.1 (\d{3}) ", answer)]


def resident_mb(server: Server) -> float:
    text = Path(f"/proc/{server.process.pid}/status").read_text()
    return int(next(line.split()[1] for line in text.splitlines() if line.startswith("VmRSS:"))) / 1024


class Flood:
    """Sends a head's bytes from a thread until the server stops taking them (or `most` is sent)."""

    def __init__(self, sock: socket.socket, first: bytes, piece: bytes, most: int) -> None:
        self.sock, self.first, self.piece, self.most, self.sent = sock, first, piece, most, 0
        self.thread = threading.Thread(target=self._send)
        self.thread.start()

    def _send(self) -> None:
        try:
            self.sock.sendall(self.first)
            while self.sent < self.most:
                self.sock.sendall(self.piece)
                self.sent += len(self.piece)
        except OSError:  # refused: reset, or timed out with the server no longer reading
            pass


def test_10000_headers_in_one_write_get_431(server: Server) -> None:
    head = b"GET /health/live HTTP/1.1\r\nHost: t\r\n" + b"".join(b"X-%05d: v\r\n" % i for i in range(10_000))
    with _connect(server) as sock:
        sock.sendall(head + b"\r\n")  # 120 KB: one write, mostly one read
        answer = _read_until_closed(sock)
    assert statuses(answer) == [431] and b"headers_too_large" in answer, answer[:300]
    few_bytes = b"GET /health/live HTTP/1.1\r\nHost: t\r\n" + b"X-A: v\r\n" * (MAX_HEADERS + 50) + b"\r\n"
    with _connect(server) as sock:
        sock.sendall(few_bytes)  # 1.2 KB: over the count, not the bytes
        answer = _read_until_closed(sock)
    assert statuses(answer) == [431] and b"header fields" in answer, answer[:300]
    fine = b"GET /health/live HTTP/1.1\r\n" + b"".join(b"X-%05d: v\r\n" % i for i in range(MAX_HEADERS - 2))
    with _connect(server) as sock:
        sock.sendall(fine + b"Host: t\r\nConnection: close\r\n\r\n")
        assert statuses(_read_until_closed(sock)) == [200]


def test_a_growing_header_value_is_refused_at_the_limit(server: Server) -> None:
    """64 KB at a time: refused once the head passes 64 KiB, before the parser keeps more."""
    before = _closed(server, "headers_too_large")
    with _connect(server) as sock:
        flood = Flood(sock, b"GET /health/live HTTP/1.1\r\nHost: t\r\nX-A: ", b"a" * 65536, 64 * 2**20)
        answer = _read_until_closed(sock)
        flood.thread.join(30)
    assert statuses(answer) == [431], answer[:300]
    assert flood.sent < 16 * 2**20  # the socket buffers, and what the lingering close drops (4 MiB)
    assert _closed(server, "headers_too_large") == before + 1


@pytest.mark.parametrize(
    "piece", [b"a" * 65536, b"X-A: aaaaaaaaaaaaaaaaaaaa\r\n" * 2000], ids=["one growing value", "many small headers"]
)
def test_a_pipelined_head_behind_an_answer_in_progress_is_counted(server: Server, piece: bytes) -> None:
    """The issue's case: behind a request being answered, the next head was neither counted nor
    timed. Now it is refused at 64 KiB, after the answer ahead of it (never inside it); the server
    stops reading, and its memory stays where it was."""
    before, rest = _closed(server, "headers_too_large"), resident_mb(server)
    first = busy_request() + b"GET /health/live HTTP/1.1\r\nHost: t\r\n" + (b"X-A: " if b"\r\n" not in piece else b"")
    with _connect(server) as sock:
        flood = Flood(sock, first, piece, 64 * 2**20)
        flood.thread.join(30)
        answer = _read_until_closed(sock)
    # the socket buffers, what the lingering close drops, and what arrived while the answer ahead ran:
    # under 16 MiB on a quiet machine, 16.5 MiB measured on busy cores; never the 64 MiB sent at
    assert flood.sent < 24 * 2**20, flood.sent
    assert _closed(server, "headers_too_large") == before + 1
    if answer:  # a client still sending when the lingering close gives up is reset: the answers may be lost
        assert statuses(answer)[:1] == [200] and statuses(answer)[1:] in ([], [431]), answer[:300]
    assert resident_mb(server) - rest < 100
    assert _live_latency(server) < 1.0


def test_a_pipelined_head_that_trickles_gets_its_own_header_timeout(server: Server) -> None:
    with _connect(server) as sock:
        sock.sendall(busy_request() + b"GET /health/live HTTP/1.1\r\nHost: t\r\n")
        started = time.monotonic()
        for _ in range(50):  # a header line every 0.1 s: never complete
            try:
                sock.sendall(b"X-A: b\r\n")
            except OSError:
                break
            time.sleep(0.1)
        answer = _read_until_closed(sock)
    assert statuses(answer) == [200, 408], answer[:300]
    assert b"header_timeout" in answer
    assert time.monotonic() - started < 10  # 2 s here; generous for a loaded machine


def test_at_most_32_requests_wait_behind_the_one_answered(server: Server) -> None:
    """100 pipelined requests in one write: the first and the 32 queued behind it are answered in
    order, the 34th gets 429, and nothing after it is read (32 MiB of them held 2.4 GB)."""
    with _connect(server) as sock:
        sock.sendall(GET_LIVE * 100)
        answer = _read_until_closed(sock)
    assert statuses(answer) == [200] * (1 + MAX_PIPELINED) + [429], statuses(answer)
    assert b"too_many_pipelined" in answer


def test_a_pipelined_flood_of_requests_is_not_read(server: Server) -> None:
    rest = resident_mb(server)
    with _connect(server) as sock:
        flood = Flood(sock, busy_request(), GET_LIVE * 1000, 32 * 2**20)
        flood.thread.join(30)
        _read_until_closed(sock)
    assert flood.sent < 16 * 2**20
    assert resident_mb(server) - rest < 100
    assert _live_latency(server) < 1.0


def test_a_malformed_request_behind_an_answer_gets_400_after_it(server: Server) -> None:
    """uvicorn wrote its 400 the moment the parser failed, into the middle of the answer in progress."""
    with _connect(server) as sock:
        sock.sendall(busy_request() + b"NOT HTTP AT ALL\r\n\r\n")
        answer = _read_until_closed(sock)
    assert statuses(answer) == [200, 400], answer[:300]
    first_body = answer[: answer.index(b"HTTP/1.1 400")]
    assert first_body.endswith(b"]]}"), first_body[-200:]  # the classification answer, whole
    assert b"malformed_request" in answer


def test_heads_at_the_limits_are_served(server: Server) -> None:
    """Just under 64 KiB of head in 99 fields, in one write or 4 KB at a time: answered."""
    value = b"v" * ((HEADER_BYTES_LIMIT - 2000) // (MAX_HEADERS - 2))
    head = b"GET /health/live HTTP/1.1\r\nHost: t\r\n" + b"".join(
        b"X-%02d: " % i + value + b"\r\n" for i in range(MAX_HEADERS - 2)
    )
    assert len(head) < HEADER_BYTES_LIMIT
    response = httpx2.get(f"{server.url}/health/live", headers={f"X-{i:02d}": "v" * 650 for i in range(90)})
    assert response.status_code == 200
    with _connect(server) as sock:
        for i in range(0, len(head), 4096):
            sock.sendall(head[i : i + 4096])
        sock.sendall(b"Connection: close\r\n\r\n")
        assert statuses(_read_until_closed(sock)) == [200]
