"""`python -m bench.service [--seconds S] [--repeats N] [--json PATH]`: the real service under load.

Real uvicorn processes, one at a time, and an asyncio client holding C requests in flight, sending
held-out digits as PNGs to /v1/classify, at concurrency 1, 8, 32 and 64: requests/s and p50/p99
latency of
- the service with batching on, and with it off;
- its floor: the same HTTP + parsing + decoding + preprocessing with no model (bench/floor.py);
- a naive FastAPI + PyTorch endpoint with the same weights (bench/naive.py; needs `make models`).
Servers take turns in every repeat; figures are medians over repeats. Client and server share
this machine's cores, equally for every server."""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx2
import numpy as np

from bench.common import interleaved, report
from bench.peers.load import Run, load
from bench.peers.servers import raw
from export.data import load_digits_data
from service.runtime import create_session
from service.settings import PROJECT_ROOT, Settings
from tests.helpers import png_bytes

SERVERS = {
    "batching on": (["-m", "service"], {"VITSERVE_BATCHING": "true"}),
    "batching off": (["-m", "service"], {"VITSERVE_BATCHING": "false"}),
    "floor (no model)": (["-m", "uvicorn", "bench.floor:app", "--log-level", "warning"], {}),
    "naive FastAPI + PyTorch": (["-m", "uvicorn", "bench.naive:app", "--log-level", "warning"], {}),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextmanager
def server(args: list[str], env: dict[str, str], start_s: float = 30.0, log: Path | None = None) -> Iterator[str]:
    """A server process on a free port until the block ends; its output goes to `log` (else nowhere)."""
    port = free_port()
    command = [sys.executable, *args, "--host", "127.0.0.1", "--port", str(port)]
    environment = {**os.environ, "VITSERVE_LOG_LEVEL": "info" if log else "warning", **env}
    output = log.open("ab") if log else subprocess.DEVNULL
    process = subprocess.Popen(command, cwd=PROJECT_ROOT, env=environment, stdout=output, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(int(start_s * 10)):
            try:
                if httpx2.post(f"{url}/v1/classify", content=DIGITS[0], headers=HEADERS, timeout=5).status_code == 200:
                    break
            except httpx2.TransportError:
                time.sleep(0.1)
        else:
            raise RuntimeError(f"{args} did not start")
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)
        if log:
            output.close()  # type: ignore[union-attr]


DIGITS = [png_bytes(image) for image in load_digits_data(seed=0).held_out.images]
HEADERS = {"content-type": "image/png"}
REQUESTS = [raw("/v1/classify")(digit, "image/png") for digit in DIGITS]


def formed_batches(url: str) -> Counter[int]:
    """How many runs of each batch size the ViT's batcher has made so far (from /v1/models)."""
    models = httpx2.get(f"{url}/v1/models", timeout=10).json()["models"]
    sizes = next(m for m in models if m["name"] == "vit")["batch_sizes"].get("main", {})
    return Counter({int(size): runs for size, runs in sizes.items()})


def raw_rate(mix: Counter[int]) -> float:
    """Images/s of ONNX Runtime alone (the service's session settings) running that mix of batch sizes."""
    session = create_session(PROJECT_ROOT / "model_repository" / "vit" / "1" / "model.onnx", Settings())
    seconds = 0.0
    for size, runs in mix.items():
        feeds = {"pixel_values": np.random.rand(size, 1, 32, 32).astype(np.float32)}
        seconds += interleaved({"run": lambda f=feeds: session.run(None, f)}, 5)["run"] * runs
    return sum(size * runs for size, runs in mix.items()) / seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.service", description=__doc__)
    parser.add_argument("--seconds", type=float, default=4.0, help="length of each timed run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--servers", nargs="+", choices=list(SERVERS), default=list(SERVERS))
    parser.add_argument("--json", type=Path, default=Path("bench/results/service.json"))
    args = parser.parse_args(argv)
    servers = {name: SERVERS[name] for name in args.servers}
    if not (PROJECT_ROOT / "runs" / "vit" / "checkpoint.pt").exists():
        print("no runs/vit/checkpoint.pt (make models): the naive PyTorch endpoint is left out")
        servers.pop("naive FastAPI + PyTorch", None)
    samples: dict[tuple[str, int], list[Run]] = {}
    mixes: dict[int, Counter[int]] = {}  # concurrency -> batch sizes formed with batching on
    for _ in range(args.repeats):
        for name, (command, env) in servers.items():  # servers take turns in every repeat
            with server(command, env) as url:
                for concurrency in args.concurrency:
                    load(url, REQUESTS, concurrency, 0.5, warmup=0)  # warm the connections
                    before = formed_batches(url) if name == "batching on" else Counter()
                    run = load(url, REQUESTS, concurrency, args.seconds, warmup=0)
                    samples.setdefault((name, concurrency), []).append(run)
                    if name == "batching on":
                        mixes.setdefault(concurrency, Counter()).update(formed_batches(url) - before)
    rows = []
    for (name, concurrency), runs in samples.items():
        rows.append({
            "server": name,
            "concurrency": concurrency,
            "requests/s": statistics.median(r.rate for r in runs),
            "p50 ms": statistics.median(r.p50 for r in runs),
            "p99 ms": statistics.median(r.p99 for r in runs),
            "errors": sum(r.errors for r in runs),
            "mean batch": _mean_batch(mixes[concurrency]) if name == "batching on" else "",
            "raw ORT images/s at those batches": raw_rate(mixes[concurrency]) if name == "batching on" else "",
        })  # fmt: skip
    rows.sort(key=lambda row: (row["concurrency"], row["server"]))
    report("service", rows, args.json)


def _mean_batch(mix: Counter[int]) -> float:
    return sum(size * runs for size, runs in mix.items()) / max(sum(mix.values()), 1)


if __name__ == "__main__":
    main()
