"""Hostile clients against a running service, one case at a time (issue 25): for each, the status
(es) it got, how long it took, the slowest `/health/live` meanwhile (asked every 5 ms from a process
of its own, on a kept-alive connection) and the server's resident memory before, at its peak, and
3 s after the case's connection closed.

    VITSERVE_API_KEY=k python -m service --host 127.0.0.1 --port 8400 &
    python -m bench.hostile --port 8400 --pid $! [--json out.json] [CASE ...]

With no CASE, every one in order (about two minutes); `--list` names them."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import multiprocessing as mp
import re
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from multiprocessing.queues import Queue
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

HOST = "127.0.0.1"
KEY = b"X-API-Key: k\r\n"
GET_LIVE = b"GET /health/live HTTP/1.1\r\nHost: t\r\n\r\n"


@dataclass
class Outcome:
    case: str
    status: str
    seconds: float
    sent: int = 0
    answer_bytes: int = 0
    live_max_ms: float = 0.0
    rss_before_mb: float = 0.0
    rss_peak_mb: float = 0.0
    rss_after_mb: float = 0.0


def resident_mb(pid: int) -> float:
    text = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in text.splitlines() if line.startswith("VmRSS:"))) / 1024


def _poll(port: int, stop: Any, out: Any) -> None:
    """/health/live every 5 ms on one kept-alive connection; its latencies put in `out`."""
    latencies: list[float] = []
    sock = socket.create_connection((HOST, port), timeout=10)
    while not stop.is_set():
        started = time.perf_counter()
        try:
            sock.sendall(GET_LIVE)
            answer = b""
            while not answer.endswith(b"}"):
                chunk = sock.recv(4096)
                if not chunk:
                    raise OSError("closed")
                answer += chunk
        except OSError:
            sock = socket.create_connection((HOST, port), timeout=10)
            continue
        latencies.append(time.perf_counter() - started)
        time.sleep(0.005)
    out.put(latencies)


class Watch:
    """/health/live from another process and the server's resident memory, while a case runs."""

    def __init__(self, port: int, pid: int) -> None:
        self.port, self.pid = port, pid

    def __enter__(self) -> Watch:
        self.stop = mp.Event()
        self.out: Queue[list[float]] = mp.Queue()
        self.poller = mp.Process(target=_poll, args=(self.port, self.stop, self.out))
        self.poller.start()
        time.sleep(0.3)
        self.before = self.peak = resident_mb(self.pid)
        self.running = True
        self.sampler = threading.Thread(target=self._sample)
        self.sampler.start()
        return self

    def _sample(self) -> None:
        while self.running:
            self.peak = max(self.peak, resident_mb(self.pid))
            time.sleep(0.02)

    def __exit__(self, *_: object) -> None:
        self.running = False
        self.sampler.join()
        self.stop.set()
        latencies = self.out.get()
        self.poller.join()
        self.live_max_ms = max(latencies, default=-1.0) * 1000


# what a case sends ------------------------------------------------------------------------------------


def post(path: bytes, body: bytes, content_type: bytes = b"application/json") -> bytes:
    head = b"POST %s HTTP/1.1\r\nHost: t\r\n%sContent-Type: %s\r\nContent-Length: %d\r\n\r\n"
    return head % (path, KEY, content_type, len(body)) + body


def statuses(answer: bytes) -> str:
    codes = re.findall(rb"HTTP/1\.1 (\d{3}) ", answer)
    counted = Counter(code.decode() for code in codes)
    return ",".join(f"{code}x{n}" if n > 1 else code for code, n in counted.items()) or "none"


def exchange(port: int, request: bytes) -> tuple[bytes, int]:
    """Sends a request whole, then reads its answer (until the connection closes, or the answer is whole)."""
    with socket.create_connection((HOST, port), timeout=60) as sock:
        with contextlib.suppress(OSError):
            sock.sendall(request)
        answer = b""
        try:
            while chunk := sock.recv(1 << 20):
                answer += chunk
                head, _, body = answer.partition(b"\r\n\r\n")
                length = re.search(rb"content-length: (\d+)", head, re.IGNORECASE)
                if length and len(body) >= int(length.group(1)):
                    break
        except OSError:
            pass
    return answer, len(request)


def flood(port: int, first: bytes, pieces: Iterator[bytes], most: int, read_along: bool = False) -> tuple[bytes, int]:
    """Sends `first`, then `pieces` until the server stops taking them (30 s without progress) or
    `most` bytes are sent; reads what comes back meanwhile, or (the issue's client, which leaves its
    answers unread: SO_RCVBUF 4 KB) only once it has stopped sending."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(30)
    sock.connect((HOST, port))
    sent = 0
    answer = bytearray()

    def read() -> None:
        try:
            while chunk := sock.recv(1 << 20):
                answer.extend(chunk)
        except OSError:
            pass

    reader = threading.Thread(target=read)
    try:
        sock.sendall(first)
        if read_along:
            reader.start()
        for piece in pieces:
            sock.sendall(piece)
            sent += len(piece)
            if sent >= most:
                break
    except OSError:
        pass
    if reader.ident is None:
        reader.start()
    reader.join(35)
    sock.close()
    return bytes(answer), sent


def repeat(piece: bytes) -> Iterator[bytes]:
    while True:
        yield piece


def png(image: Image.Image, **options: Any) -> bytes:
    out = io.BytesIO()
    image.save(out, format=options.pop("format", "PNG"), **options)
    return out.getvalue()


def palette(side: int) -> Image.Image:
    image = Image.new("P", (side, side), 3)
    image.putpalette([i % 256 for i in range(768)])
    return image


def noise(side: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (side, side), dtype=np.uint8), "L")


GENERATE_64 = post(b"/v1/generate", b'{"num_images": 64, "scale": 64, "seed": 1}')  # a while to answer
LIVE_HEAD = b"GET /health/live HTTP/1.1\r\nHost: t\r\n"
SMALL_HEADERS = (b"X-A: " + b"a" * 20 + b"\r\n") * 2000  # 54 KB a write
Case = Callable[[int], tuple[bytes, int]]


def _sse200(port: int) -> tuple[bytes, int]:
    request = post(b"/v1/generate", b'{"num_images": 1, "stream": true}')

    def one(_: int) -> bytes:
        with socket.create_connection((HOST, port), timeout=120) as sock:
            sock.sendall(request)
            answer = b""
            while b"event: done" not in answer and b"event: error" not in answer:
                if not (chunk := sock.recv(65536)):
                    break
                answer += chunk
            return answer[:20]

    with ThreadPoolExecutor(200) as pool:
        return b"".join(pool.map(one, range(200))), 200 * len(request)


def _renders4(port: int) -> tuple[bytes, int]:
    request = post(b"/v1/classify/attention?render=true&scale=64", png(noise(62)), b"image/png")
    end = time.perf_counter() + 10

    def loop(_: int) -> bytes:
        answers = b""
        while time.perf_counter() < end:
            answers += exchange(port, request)[0][:20]
        return answers

    with ThreadPoolExecutor(4) as pool:
        return b"".join(pool.map(loop, range(4))), 0


def _options(count: int, **extra: Any) -> bytes:
    return json.dumps({**{f"opt{i:06d}": 1 for i in range(count)}, **extra}).encode()


CASES: dict[str, Case] = {
    # item 2: input echoed back
    "290k unknown options": lambda p: exchange(p, post(b"/v1/generate", _options(290_000, num_images=1))),
    "9k unknown options": lambda p: exchange(p, post(b"/v1/generate", _options(9_000, num_images=1))),
    "10 MB key": lambda p: exchange(p, post(b"/v1/generate", json.dumps({"k" * 10_000_000: 1}).encode())),
    "10 MB model name": lambda p: exchange(p, post(b"/v1/generate", json.dumps({"model": "m" * 10_000_000}).encode())),
    # item 3: small files that decode big
    "52 KB palette+transparency 40 Mpx": lambda p: exchange(
        p, post(b"/v1/classify", png(palette(6300), transparency=3), b"image/png")),
    "palette 40 Mpx": lambda p: exchange(p, post(b"/v1/classify", png(palette(6300)), b"image/png")),
    "RGBA 40 Mpx": lambda p: exchange(
        p, post(b"/v1/classify", png(Image.new("RGBA", (6300, 6300), (1, 2, 3, 128))), b"image/png")),
    "LA 40 Mpx": lambda p: exchange(
        p, post(b"/v1/classify", png(Image.new("LA", (6300, 6300), (1, 128))), b"image/png")),
    "16-bit 40 Mpx": lambda p: exchange(
        p, post(b"/v1/classify", png(Image.fromarray(np.full((6300, 6300), 999, np.uint16))), b"image/png")),
    "WebP 40 Mpx (1.6 KB)": lambda p: exchange(p, post(
        b"/v1/classify", png(Image.new("RGBA", (6300, 6300), (1, 2, 3, 100)), format="WEBP", lossless=True),
        b"image/webp")),
    "RGB 40 Mpx": lambda p: exchange(p, post(b"/v1/classify", png(Image.new("RGB", (6300, 6300))), b"image/png")),
    # item 1: heads
    "10,000 headers in one write": lambda p: exchange(
        p, LIVE_HEAD + b"".join(b"X-%05d: v\r\n" % i for i in range(10_000)) + b"\r\n"),
    "200 KB URL": lambda p: exchange(p, b"GET /health/live?" + b"a" * 200_000 + b" HTTP/1.1\r\nHost: t\r\n\r\n"),
    "growing header value": lambda p: flood(p, LIVE_HEAD + b"X-A: ", repeat(b"a" * 65536), 64 * 2**20),
    "pipelined growing value": lambda p: flood(p, GENERATE_64 + LIVE_HEAD + b"X-A: ", repeat(b"a" * 65536),
                                               64 * 2**20),
    "pipelined small headers": lambda p: flood(p, GENERATE_64 + LIVE_HEAD, repeat(SMALL_HEADERS), 64 * 2**20),
    "pipelined requests": lambda p: flood(p, GENERATE_64, repeat(GET_LIVE * 1000), 32 * 2**20),
    # item 4: stalls
    "largest attention render": lambda p: exchange(
        p, post(b"/v1/classify/attention?render=true&scale=64", png(noise(62)), b"image/png")),
    "200 SSE streams at once": _sse200,
    "4 clients looping the largest render, 10 s": _renders4,
}  # fmt: skip


def run(name: str, port: int, pid: int) -> Outcome:
    case = CASES[name]
    with Watch(port, pid) as watch:
        started = time.perf_counter()
        answer, sent = case(port)
        seconds = time.perf_counter() - started
    time.sleep(3)
    return Outcome(name, statuses(answer), round(seconds, 2), sent, len(answer), round(watch.live_max_ms, 1),
                   round(watch.before), round(watch.peak), round(resident_mb(pid)))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.hostile", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("cases", nargs="*", help="cases to run (default: all)")
    parser.add_argument("--port", type=int, default=8400)
    parser.add_argument("--pid", type=int, help="the server's process id (for its memory)")
    parser.add_argument("--json", type=Path, help="also write the outcomes here")
    parser.add_argument("--list", action="store_true", help="name the cases and stop")
    args = parser.parse_args()
    if args.list or args.pid is None:
        print("\n".join(CASES))
        return
    outcomes = []
    print(f"{'case':44s} {'status':18s} {'s':>6s} {'sent MB':>8s} {'answer':>10s} {'live max':>9s}  "
          "resident MiB before/peak/3 s after")  # fmt: skip
    for name in args.cases or list(CASES):
        outcome = run(name, args.port, args.pid)
        outcomes.append(outcome)
        print(f"{name:44s} {outcome.status[:18]:18s} {outcome.seconds:6.2f} {outcome.sent / 1e6:8.2f} "
              f"{outcome.answer_bytes:10d} {outcome.live_max_ms:7.1f}ms  {outcome.rss_before_mb:.0f}/"
              f"{outcome.rss_peak_mb:.0f}/{outcome.rss_after_mb:.0f}", flush=True)  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps([asdict(o) for o in outcomes], indent=1))


if __name__ == "__main__":
    main()
