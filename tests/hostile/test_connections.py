"""Slow and idle clients against a real `python -m service` (uvicorn with service/connections.py):
they are cut at their timeouts or make room for newcomers, and a normal client is answered
promptly throughout. Timeouts are made small through the environment; every socket has a timeout,
so no test can hang."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx2
import pytest

from service.settings import PROJECT_ROOT
from tests.e2e.conftest import Server, running_server

HALF_BODY = (
    b"POST /v1/classify HTTP/1.1\r\nHost: t\r\nContent-Type: image/png\r\nContent-Length: 1000\r\n\r\n0123456789"
)
GET_LIVE = b"GET /health/live HTTP/1.1\r\nHost: t\r\n\r\n"


def _repository(folder: Path) -> Path:
    """A repository of the ViT alone: the server starts in seconds."""
    (folder / "repo").mkdir()
    (folder / "repo" / "vit").symlink_to(PROJECT_ROOT / "model_repository" / "vit")
    return folder / "repo"


def _serve(folder: Path, **env: str) -> Iterator[Server]:
    settings = {"VITSERVE_MODEL_REPOSITORY": str(_repository(folder)), "VITSERVE_WARMUP": "false", **env}
    with running_server(folder, **settings) as server:
        yield server
        log = server.log_path.read_text()
        assert "ERROR" not in log and "Traceback" not in log, log


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """Short timeouts, a cap above what these tests open."""
    env = {"VITSERVE_HEADER_TIMEOUT_S": "2", "VITSERVE_KEEP_ALIVE_S": "1.5", "VITSERVE_BODY_TIMEOUT_S": "2",
           "VITSERVE_SEND_TIMEOUT_S": "2", "VITSERVE_MAX_CONNECTIONS": "100"}  # fmt: skip
    yield from _serve(tmp_path_factory.mktemp("quick"), **env)


@pytest.fixture(scope="module")
def capped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A cap of 10 connections, and timeouts long enough that only the cap acts."""
    env = {"VITSERVE_HEADER_TIMEOUT_S": "30", "VITSERVE_KEEP_ALIVE_S": "30", "VITSERVE_BODY_TIMEOUT_S": "30",
           "VITSERVE_MAX_CONNECTIONS": "10"}  # fmt: skip
    yield from _serve(tmp_path_factory.mktemp("capped"), **env)


def _connect(server: Server) -> socket.socket:
    host, port = server.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    return sock


def _read_until_closed(sock: socket.socket) -> bytes:
    """What the server sends until it closes the connection (a reset counts as closed)."""
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except ConnectionResetError:
        pass
    return received


def _live_latency(server: Server) -> float:
    started = time.perf_counter()
    response = httpx2.get(f"{server.url}/health/live", timeout=5)
    assert response.status_code == 200
    return time.perf_counter() - started


def test_slowloris_headers_are_cut_while_others_are_served(quick: Server) -> None:
    """30 clients trickle header bytes; each is answered 408 and closed at the header timeout, and
    /health/live answers promptly all along."""
    clients = [_connect(quick) for _ in range(30)]
    for sock in clients:
        sock.sendall(b"GET /health/live HTTP/1.1\r\n")
    closed_after: list[float] = []
    started = time.monotonic()

    def trickle() -> None:
        alive = list(clients)
        while alive and time.monotonic() - started < 8:
            for sock in list(alive):
                try:
                    sock.sendall(b"X")
                except OSError:
                    alive.remove(sock)
                    closed_after.append(time.monotonic() - started)
            time.sleep(0.2)

    attacker = threading.Thread(target=trickle)
    attacker.start()
    latencies = []
    while attacker.is_alive():
        latencies.append(_live_latency(quick))
        time.sleep(0.05)
    attacker.join()
    answers = [_read_until_closed(sock) for sock in clients]
    for sock in clients:
        sock.close()
    print(f"/health/live under 30 slowloris clients: {len(latencies)} requests, max {max(latencies) * 1000:.1f} ms")
    assert len(closed_after) == 30 and max(closed_after) < 6  # cut at 2 s (+ a send or two to notice)
    assert all(answer.startswith(b"HTTP/1.1 408 ") and b"header_timeout" in answer for answer in answers)
    assert len(latencies) > 10 and max(latencies) < 1.0
    assert _closed(quick, "header_timeout") >= 30


def _closed(server: Server, reason: str) -> float:
    """The server's count of connections it closed for `reason`, from /metrics."""
    metrics = httpx2.get(f"{server.url}/metrics", timeout=5).text
    prefix = f'vitserve_connections_closed_total{{reason="{reason}"}} '
    return sum(float(line.removeprefix(prefix)) for line in metrics.splitlines() if line.startswith(prefix))


def _summary_soon(server: Server, reason: str) -> bool:
    """The summary line of closures comes once per 10 s interval."""
    deadline = time.monotonic() + 12
    while time.monotonic() < deadline:
        if f"{reason} " in server.log_path.read_text():
            return True
        time.sleep(0.2)
    return False


def test_a_slow_next_request_on_a_kept_alive_connection_is_cut(quick: Server) -> None:
    with _connect(quick) as sock:
        sock.sendall(GET_LIVE)
        assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
        sock.sendall(b"GET /health/live HTTP/1.1\r\n")
        started = time.monotonic()
        for _ in range(40):  # a header byte every 0.1 s: the idle timer never fires, the header timeout does
            try:
                sock.sendall(b"X")
            except OSError:
                break
            time.sleep(0.1)
        # the first answer's body may come in a packet of its own: the 408 follows it
        assert b"HTTP/1.1 408 " in _read_until_closed(sock)
        assert time.monotonic() - started < 10  # cut at 2 s; generous for a loaded machine (the 408 says why)


def test_an_idle_connection_is_closed(quick: Server) -> None:
    with _connect(quick) as sock:
        started = time.monotonic()
        assert _read_until_closed(sock) == b""
        assert 1.0 < time.monotonic() - started < 3.5  # the idle timeout: 1.5 s


def test_headers_too_large_get_431(quick: Server) -> None:
    with _connect(quick) as sock:
        sock.sendall(b"GET /health/live HTTP/1.1\r\n" + b"X-Big: " + b"x" * 100_000)
        assert _read_until_closed(sock).startswith(b"HTTP/1.1 431 ")


def test_a_half_sent_body_gets_408_and_its_connection_closed(quick: Server) -> None:
    with _connect(quick) as sock:
        started = time.monotonic()
        sock.sendall(HALF_BODY)
        answer = _read_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 408 ") and b'"body_timeout"' in answer, answer
    assert b"connection: close" in answer.lower()
    assert time.monotonic() - started < 6
    assert _live_latency(quick) < 1.0


def test_a_client_leaving_mid_body_is_logged_as_such(quick: Server) -> None:
    with _connect(quick) as sock:
        sock.sendall(HALF_BODY)
        time.sleep(0.3)
    deadline = time.monotonic() + 5
    while "client left" not in quick.log_path.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    log = quick.log_path.read_text()
    line = next(line for line in log.splitlines() if "client left" in line)
    assert "POST /v1/classify 499 " in line and " INFO " in line
    assert "ERROR" not in log and "Traceback" not in log, log
    png = (PROJECT_ROOT / "examples" / "digit-7.png").read_bytes()
    response = httpx2.post(f"{quick.url}/v1/classify", files={"file": ("d.png", png, "image/png")}, timeout=10)
    assert response.status_code == 200 and response.json()["results"][0][0]["label"] == "7"


def test_idle_sockets_past_the_cap_make_room_for_newcomers(capped: Server) -> None:
    """30 idle sockets against a cap of 10: newcomers are served, and the oldest idle ones closed."""
    idle = [_connect(capped) for _ in range(30)]
    try:
        for _ in range(5):
            assert _live_latency(capped) < 1.0
        for sock in idle[:15]:  # the first ones in were the first evicted
            sock.settimeout(2)
            assert _read_until_closed(sock) == b""
    finally:
        for sock in idle:
            sock.close()
    assert _closed(capped, "evicted") >= 20
    assert _summary_soon(capped, "evicted")
    summaries = [line for line in capped.log_path.read_text().splitlines() if "connections closed" in line]
    assert len(summaries) <= 2  # one line per interval, not one per connection


def test_busy_connections_at_the_cap_get_newcomers_a_503_until_their_bodies_are_slow(capped: Server) -> None:
    """10 requests in progress (bodies half sent) fill the cap: a newcomer gets 503 at once, not a
    hang. Once those bodies have been arriving for a tenth of the body timeout (3 s), they are slow:
    a newcomer is served in place of the oldest, which gets 408."""
    busy = [_connect(capped) for _ in range(10)]
    try:
        for sock in busy:
            sock.sendall(HALF_BODY)
            time.sleep(0.01)  # the first is the oldest
        started = time.monotonic()
        with _connect(capped) as newcomer:
            newcomer.sendall(GET_LIVE)
            answer = _read_until_closed(newcomer)
        assert time.monotonic() - started < 2.5  # the test relies on the 3 s not having passed yet
        assert answer.startswith(b"HTTP/1.1 503 "), answer
        assert b"retry-after: 1" in answer.lower() and b'"too_many_connections"' in answer
        time.sleep(3.5 - (time.monotonic() - started))
        assert _live_latency(capped) < 1.0
        oldest = _read_until_closed(busy[0])
        assert oldest.startswith(b"HTTP/1.1 408 ") and b'"body_timeout"' in oldest, oldest
    finally:
        for sock in busy:
            sock.close()
    time.sleep(0.3)
    assert _closed(capped, "refused") == 1 and _closed(capped, "evicted_slow_body") == 1
    line = next(line for line in capped.log_path.read_text().splitlines() if "POST /v1/classify 408" in line)
    assert "came too slowly while the server was full" in line


# answers beyond what the client reads; no more than the 1 + 32 a connection may have pipelined
PIPELINED = b"GET /openapi.json HTTP/1.1\r\nHost: t\r\n\r\n" * 33


def _non_reader(server: Server) -> socket.socket:
    """A client that pipelines 300 requests and reads nothing: its answers pile up in the server."""
    host, port = server.url.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(10)
    sock.connect((host, int(port)))
    sock.sendall(PIPELINED)
    return sock


def _open_connections(server: Server) -> float:
    metrics = httpx2.get(f"{server.url}/metrics", timeout=5).text
    return float(next(line.split()[1] for line in metrics.splitlines() if line.startswith("vitserve_connections_open")))


def test_clients_that_never_read_are_dropped_at_the_send_timeout(quick: Server) -> None:
    """Their answers wait in the server's buffers; after VITSERVE_SEND_TIMEOUT_S (2 s here) each
    connection is aborted, its unsent answers freed, whatever it pipelined behind them."""
    readers = [_non_reader(quick) for _ in range(5)]
    try:
        deadline = time.monotonic() + 15
        while _open_connections(quick) > 1 and time.monotonic() < deadline:  # 1: the scrape itself
            time.sleep(0.5)
        assert _open_connections(quick) <= 1
        assert _live_latency(quick) < 1.0
    finally:
        for sock in readers:
            sock.close()


def test_non_readers_at_the_cap_make_room_for_newcomers(capped: Server) -> None:
    """Ten connections (the cap) whose answers go unread: once an answer has waited past a tenth of
    the body timeout (3 s), a newcomer takes the place of the longest-waiting one. (A connection may
    pipeline 32 requests behind the one answered: their 1.3 MB of answers can fit the socket buffers
    on loopback, and the non-reader then waits as an idle connection, the first to give way.)"""
    readers = [_non_reader(capped) for _ in range(10)]
    try:
        deadline, status = time.monotonic() + 15, 0
        while status != 200 and time.monotonic() < deadline:  # 503 until an answer has waited 3 s
            status = httpx2.get(f"{capped.url}/health/live", timeout=5).status_code
            time.sleep(0.5)
        assert status == 200
        for _ in range(3):
            assert _live_latency(capped) < 2.0  # served, not 503
        metrics = httpx2.get(f"{capped.url}/metrics", timeout=5).text
        assert 'reason="evicted_slow_reader"' in metrics or 'reason="evicted"' in metrics
    finally:
        for sock in readers:
            sock.close()
