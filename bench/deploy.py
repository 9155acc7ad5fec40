"""`python -m bench.deploy [--seconds S] [--repeats N] [--concurrency C ...] [--json PATH]`: what
running beyond one process costs and brings, on this machine.

Three pairs, each pair's two servers up together and taking turns in every repeat (ratios within a
pair are what to read on a shared machine; absolute figures move with the neighbours' load):
- `python -m service` against Ray Serve with one replica (`serve run` on a copy of
  deploy/ray/serve.yaml with num_replicas: 1): what Ray's proxy and its hop to the replica cost;
- `python -m service` against Ray Serve as shipped (2 replicas of one CPU each);
- `python -m service --workers 1` against `--workers 2`.
Load: an asyncio client keeping C requests in flight (bench/peers/load.py), POSTing
examples/digit-7.png to /v1/classify. Besides requests/s and latency, each server's CPU time per
request: the CPU its whole process tree (Ray's own processes included) spent during the run,
divided by the requests it answered; the client's CPU is not counted."""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx2
import yaml

from bench.common import report
from bench.peers.load import Run, load
from bench.peers.servers import Request
from service.settings import PROJECT_ROOT
from tests.e2e.conftest import free_port

DIGIT = (PROJECT_ROOT / "examples" / "digit-7.png").read_bytes()
REQUESTS = [Request("/v1/classify", DIGIT, {"content-type": "image/png"})]
TICK = os.sysconf("SC_CLK_TCK")


def tree(pid: int) -> list[int]:
    """`pid` and every process below it."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, queue = [], [pid]
    while queue:
        found.append(current := queue.pop())
        queue.extend(parents.get(current, []))
    return found


def cpu_seconds(pid: int) -> float:
    """User + system CPU of the process tree under `pid` (the processes alive now)."""
    total = 0
    for member in tree(pid):
        try:
            fields = Path(f"/proc/{member}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / TICK


@contextmanager
def started(command: list[str], env: dict[str, str], url: str, seconds: float = 300) -> Iterator[int]:
    """A server process, once /v1/classify answers 200; SIGINT then SIGKILL at the end."""
    log = tempfile.TemporaryFile()  # noqa: SIM115  # read only if the server fails to start
    process = subprocess.Popen(command, cwd=PROJECT_ROOT, env={**os.environ, **env}, stdout=log, stderr=log,
                               start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + seconds
        while not _answers(url):
            if process.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                raise RuntimeError(f"{command} did not start:\n{log.read().decode()[-3000:]}")
            time.sleep(0.5)
        yield process.pid
    finally:
        process.send_signal(signal.SIGINT)  # `serve run` shuts Ray down on Ctrl-C; the service drains
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _answers(url: str) -> bool:
    try:
        response = httpx2.post(f"{url}/v1/classify", content=DIGIT, headers=REQUESTS[0].headers, timeout=5)
        return response.status_code == 200
    except httpx2.TransportError:
        return False


Server = tuple[list[str], dict[str, str], int]  # command, environment, port


def plain(workers: int) -> Server:
    port = free_port()
    command = [sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers)]
    return command, {"VITSERVE_DEVICE": "cpu", "VITSERVE_LOG_LEVEL": "warning"}, port


def ray_serve(replicas: int | None, folder: Path) -> Server:
    """`serve run` on deploy/ray/serve.yaml, its address changed; `replicas`: a fixed count instead
    of the shipped autoscaling (None: as shipped)."""
    port = free_port()
    config = yaml.safe_load((PROJECT_ROOT / "deploy" / "ray" / "serve.yaml").read_text())
    config["http_options"].update(host="127.0.0.1", port=port)
    (deployment,) = config["applications"][0]["deployments"]
    if replicas is not None:
        del deployment["autoscaling_config"]
        deployment["num_replicas"] = replicas
    config["applications"][0]["runtime_env"]["env_vars"]["VITSERVE_LOG_LEVEL"] = "warning"
    path = folder / f"serve-{replicas}.yaml"
    path.write_text(yaml.safe_dump(config))
    serve = str(Path(sys.executable).parent / "serve")
    return [serve, "run", "--address", "local", str(path)], {"RAY_USAGE_STATS_ENABLED": "0"}, port


def measure(servers: dict[str, Server], args: argparse.Namespace) -> list[dict[str, Any]]:
    """The servers up together, taking turns at each concurrency in every repeat."""
    samples: dict[tuple[str, int], list[tuple[Run, float]]] = {}
    with ExitStack() as stack:
        pids = {}
        for name, (command, env, port) in servers.items():
            pids[name] = stack.enter_context(started(command, env, f"http://127.0.0.1:{port}"))
        for _ in range(args.repeats):
            for concurrency in args.concurrency:
                for name, (_, _, port) in servers.items():
                    url = f"http://127.0.0.1:{port}"
                    load(url, REQUESTS, concurrency, 1.0, warmup=0)  # connections open, replicas warm
                    before = cpu_seconds(pids[name])
                    run = load(url, REQUESTS, concurrency, args.seconds, warmup=0)
                    cpu = (cpu_seconds(pids[name]) - before) / max(run.rate * args.seconds, 1)
                    samples.setdefault((name, concurrency), []).append((run, cpu))
    return [
        {
            "server": name,
            "concurrency": concurrency,
            "requests/s": statistics.median(run.rate for run, _ in runs),
            "p50 ms": statistics.median(run.p50 for run, _ in runs),
            "p99 ms": statistics.median(run.p99 for run, _ in runs),
            "server CPU ms/request": statistics.median(cpu for _, cpu in runs) * 1000,
            "errors": sum(run.errors for run, _ in runs),
        }
        for (name, concurrency), runs in samples.items()
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.deploy", description=__doc__)
    parser.add_argument("--seconds", type=float, default=4.0, help="length of each timed run")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[32])
    parser.add_argument("--pairs", nargs="+", choices=["ray1", "ray", "workers"], default=["ray1", "ray", "workers"])
    parser.add_argument("--json", type=Path, default=Path("bench/results/deploy.json"))
    args = parser.parse_args(argv)
    folder = Path(tempfile.mkdtemp(prefix="bench-deploy-"))
    pairs = {
        "ray1": {"python -m service": plain(1), "Ray Serve, 1 replica": ray_serve(1, folder)},
        "ray": {"python -m service": plain(1), "Ray Serve, 2 replicas (serve.yaml)": ray_serve(None, folder)},
        "workers": {"--workers 1": plain(1), "--workers 2": plain(2)},
    }
    rows = []
    for pair in args.pairs:
        measured = measure(pairs[pair], args)
        first = {row["concurrency"]: row for row in reversed(measured)}  # each concurrency's first server
        for row in measured:
            row["pair"] = pair
            row["rate vs first"] = row["requests/s"] / first[row["concurrency"]]["requests/s"]
            row["CPU vs first"] = row["server CPU ms/request"] / first[row["concurrency"]]["server CPU ms/request"]
        rows.extend(measured)
    report("deploy", rows, args.json)


if __name__ == "__main__":
    main()
