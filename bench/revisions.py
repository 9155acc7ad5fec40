"""`python -m bench.revisions REV [--concurrency C ...] [--repeats N] [--seconds S]`: the service of this
checkout against the service at git revision REV (checked out in a temporary worktree), on the photo
path: scikit-learn's sample photos as 1920x1440 JPEGs POSTed to /v1/classify. Both servers are up
together and take turns in every repeat; the ratio of medians is what to read on a shared machine.
Measures what a change costs, e.g. `python -m bench.revisions b1202f8`."""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path

from bench.peers.load import load
from bench.peers.photos import photos
from bench.peers.servers import ROOT, SERVERS, running


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.revisions", description=__doc__)
    parser.add_argument("revision")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    service = SERVERS["service"]
    requests = [service.encode(jpeg, "image/jpeg") for jpeg in photos()]
    with tempfile.TemporaryDirectory() as folder, ExitStack() as stack:
        tree = Path(folder) / "tree"
        subprocess.run(["git", "worktree", "add", "--detach", str(tree), args.revision], cwd=ROOT, check=True)
        stack.callback(subprocess.run, ["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, check=False)
        urls = {
            args.revision: stack.enter_context(running(replace(service, title=args.revision, cwd=tree), requests[0])),
            "this checkout": stack.enter_context(running(service, requests[0])),
        }  # fmt: skip
        print(f"| concurrency | {args.revision} req/s | this checkout req/s | ratio |\n|---|---|---|---|")
        for concurrency in args.concurrency:
            rates: dict[str, list[float]] = {name: [] for name in urls}
            for repeat in range(args.repeats):
                for name in list(urls)[:: 1 if repeat % 2 == 0 else -1]:  # turns, alternating who goes first
                    rates[name].append(load(urls[name], requests, concurrency, args.seconds).rate)
            old, new = (statistics.median(rates[name]) for name in urls)
            print(f"| {concurrency} | {old:.0f} | {new:.0f} | {new / old:.2f} |", flush=True)


if __name__ == "__main__":
    main()
