"""`python -m bench.ready REPOSITORY [--rounds N] [--json PATH]`: how long `python -m service` takes
to become ready on REPOSITORY at a first start (nothing kept of what loading measured) and at the
next one on the same host (what it measured kept in REPOSITORY/.measured). Pairs of starts, one
after the other; medians. Only 127.0.0.1."""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx2

from bench.common import report
from service.measured import FOLDER
from service.settings import PROJECT_ROOT
from tests.e2e.conftest import free_port


def seconds_to_ready(repository: Path) -> float:
    port = free_port()
    started = time.monotonic()
    env = {**os.environ, "VITSERVE_MODEL_REPOSITORY": str(repository), "VITSERVE_GRPC_PORT": "0"}
    command = [sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(port)]
    process = subprocess.Popen(command, env=env, cwd=PROJECT_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while time.monotonic() - started < 300:
            if process.poll() is not None:
                raise SystemExit(f"the service exited ({process.returncode}) before it was ready")
            try:
                if httpx2.get(f"http://127.0.0.1:{port}/health/ready", timeout=1).status_code == 200:
                    return time.monotonic() - started
            except httpx2.TransportError:
                pass
            time.sleep(0.05)
        raise SystemExit("not ready within 300 s")
    finally:
        process.terminate()
        process.wait()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.ready", description=__doc__)
    parser.add_argument("repository", type=Path)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    first, next_ = [], []
    for _ in range(args.rounds):
        shutil.rmtree(args.repository / FOLDER, ignore_errors=True)
        first.append(seconds_to_ready(args.repository))
        next_.append(seconds_to_ready(args.repository))
    rows = [{"start": "first (measures)", "ready_s": statistics.median(first), "runs": first},
            {"start": "next (kept)", "ready_s": statistics.median(next_), "runs": next_}]  # fmt: skip
    report("ready", rows, args.json)


if __name__ == "__main__":
    main()
