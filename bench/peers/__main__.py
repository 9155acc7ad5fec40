"""`python -m bench.peers [--workload W] [--seconds S] [--repeats N] [--concurrency C ...] [--servers ...]`:
this service against the servers a user would otherwise put a vision model behind.

- service: `python -m service` from the project venv, all settings at their defaults;
- plain: the twenty-line FastAPI + onnxruntime app (bench/peers/serve_plain.py), no batching;
- litserve: LitServe with its batching (up to 32 within 5 ms; bench/peers/serve_litserve.py);
- pytriton: Triton Inference Server through nvidia-pytriton, a Python model with Triton's dynamic
  batcher (up to 32 within 5 ms; bench/peers/serve_pytriton.py), sent Triton's v2 binary tensor request.
Each peer runs in its own venv (bench/.venvs/<peer>, built on first use from bench/peers/requirements),
on the same ONNX file with ONNX Runtime's default session settings (CPU provider, ORT's own thread
counts, as a user would open it) and the same preprocessing (the manifest's, bench/peers/recipe.py).

Before any server is timed its top-1 label and score for 40 held-out digits are checked against
the service's answers (the service starts first); a disagreement stops the run. Then the digits
workload (held-out digits as PNGs, as bench/service.py sends them) at each concurrency; servers take
turns in every repeat and figures are medians over repeats. The photo workload (bench/peers/photos.py)
runs on the service and the plain endpoint in the same rounds. Client and servers share this
machine's cores, equally for every server. A peer that cannot run here is reported and left out.

`--workload vit-b16` or `--workload detr-r50` runs a real-size imported model on photos instead, with
transformers' pipeline as a fifth peer, each peer tuned first, and raw ONNX Runtime as the ceiling:
bench/peers/real.py."""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

import httpx2
import numpy as np

from bench.common import markdown
from bench.peers import photos, real, venvs
from bench.peers.about import describe_machine, finite, versions
from bench.peers.load import Run, load
from bench.peers.servers import DIGIT_SERVERS, SERVERS, Request, Server, raw, running
from bench.peers.venvs import Unavailable
from bench.peers.workloads import WORKLOADS
from export.data import load_digits_data
from tests.helpers import png_bytes

PHOTO_SERVERS = ("service", "plain")
CHECKED = slice(None, None, 9)  # every 9th held-out digit: 40 of 360
TOLERANCE = 1e-4


class Results:
    """Everything one run measures, keyed so the tables can be read off it."""

    def __init__(self) -> None:
        self.digits: dict[tuple[str, int], list[Run]] = defaultdict(list)
        self.photos: dict[tuple[str, str, int], list[Run]] = defaultdict(list)
        self.stages: dict[str, list[dict[str, float]]] = defaultdict(list)  # task -> service Server-Timing
        self.pillow: list[dict[str, float]] = []  # per repeat: task -> in-process Pillow ms
        self.reference: list[tuple[str, float]] = []  # the service's answers for the checked digits
        self.photo_answers: dict[str, list[Any]] = {}
        self.unavailable: dict[str, str] = {}


def check_answers(name: str, server: Server, url: str, requests: list[Request], results: Results) -> None:
    """The server's top-1 for the checked digits must equal the service's, scores within TOLERANCE."""
    answers = []
    for request in requests[CHECKED]:
        response = httpx2.post(url + request.path, content=request.body, headers=request.headers, timeout=60)
        response.raise_for_status()
        answers.append(server.top1(response.json()))
    if name == "service":
        results.reference = answers
        return
    wrong = [(i, ours, theirs) for i, (ours, theirs) in enumerate(zip(results.reference, answers, strict=True))
             if ours[0] != theirs[0] or abs(ours[1] - theirs[1]) > TOLERANCE]  # fmt: skip
    if wrong:
        i, ours, theirs = wrong[0]
        raise SystemExit(
            f"ANSWERS DIFFER: {server.title} disagrees with the service on {len(wrong)} of {len(answers)} digits "
            f"(e.g. checked digit {i}: service {ours}, {name} {theirs}); nothing is timed on unequal answers"
        )
    print(f"{server.title}: same top-1 as the service on {len(answers)} digits, scores within {TOLERANCE}")


def photo_answers(url: str, jpegs: list[bytes]) -> list[Any]:
    """Per photo, classify's top-1 label and detect's labels (the service and plain answer alike)."""
    found = []
    for task in photos.TASKS:
        for jpeg in jpegs:
            answer = httpx2.post(f"{url}/v1/{task}", content=jpeg, headers={"content-type": "image/jpeg"}, timeout=60)
            body = answer.json()
            items = body["results"][0] if isinstance(body, dict) else body
            found.append(items[0]["label"] if task == "classify" else sorted(d["label"] for d in items))
    return found


def time_photos(name: str, url: str, jpegs: list[bytes], args: argparse.Namespace, results: Results) -> None:
    for task in photos.TASKS:
        requests = [raw(f"/v1/{task}")(jpeg, "image/jpeg") for jpeg in jpegs]
        for concurrency in args.photo_concurrency:
            timings = name == "service" and concurrency == min(args.photo_concurrency)
            run = load(url, requests, concurrency, args.photo_seconds, timings)
            results.photos[(name, task, concurrency)].append(run)
            results.stages[task].extend(run.stages)


def round_of(name: str, first: bool, digits: list[bytes], jpegs: list[bytes], args: argparse.Namespace,
             results: Results) -> None:  # fmt: skip
    """One server's turn in a repeat: start it, check its answers on its first turn, time it, stop it."""
    server = SERVERS[name]
    requests = [server.encode(png, "image/png") for png in digits]
    with running(server, requests[0]) as url:
        if first:
            check_answers(name, server, url, requests, results)
            if name in PHOTO_SERVERS and jpegs:
                results.photo_answers[name] = photo_answers(url, jpegs)
        for concurrency in args.concurrency:
            results.digits[(name, concurrency)].append(load(url, requests, concurrency, args.seconds))
        if name in PHOTO_SERVERS and jpegs:
            time_photos(name, url, jpegs, args, results)


def build_venvs(names: list[str], results: Results) -> None:
    """Every peer's venv before anything is timed, so an install never lands between rounds."""
    for name in names:
        if SERVERS[name].venv:
            try:
                venvs.python(SERVERS[name].venv)
            except Unavailable as exc:
                results.unavailable[name] = str(exc)


def measure(names: list[str], args: argparse.Namespace) -> Results:
    results = Results()
    build_venvs(names, results)
    digits = [png_bytes(image) for image in load_digits_data(seed=0).held_out.images]
    jpegs = photos.photos() if args.photo_concurrency else []
    for repeat in range(args.repeats):
        for name in names:  # servers take turns in every repeat; the service first (the reference answers)
            if name in results.unavailable:
                continue
            try:
                round_of(name, repeat == 0, digits, jpegs, args, results)
            except Unavailable as exc:
                if name == "service":
                    raise
                results.unavailable[name] = str(exc)
                print(f"UNAVAILABLE {name}: {exc}")
        if jpegs:
            results.pillow.append(photos.pillow_ms(jpegs))
    return results


def _median(runs: list[Run]) -> dict[str, Any]:
    return {
        "requests/s": statistics.median(r.rate for r in runs),
        "p50 ms": statistics.median(r.p50 for r in runs),
        "p99 ms": statistics.median(r.p99 for r in runs),
        "errors": sum(r.errors for r in runs),
    }


def peer_rows(names: list[str], results: Results, concurrencies: list[int]) -> list[dict[str, Any]]:
    return [{"server": SERVERS[name].title, "concurrency": c, **_median(results.digits[(name, c)])}
            for c in concurrencies for name in names if results.digits.get((name, c))]  # fmt: skip


def summary_rows(names: list[str], results: Results, concurrencies: list[int]) -> list[dict[str, Any]]:
    """Per concurrency, the service against the plain endpoint and the best peer, and the target it
    is judged by: 0.9x plain at 1; 1.0x the best peer from 8 (aim 1.2x), and p99 at 64 no higher."""
    rows = []
    for c in concurrencies:
        service = _median(results.digits[("service", c)])
        peers = {n: _median(results.digits[(n, c)]) for n in names if n != "service" and results.digits.get((n, c))}
        plain = peers.get("plain", {}).get("requests/s", np.nan)
        best = max(peers, key=lambda n: peers[n]["requests/s"]) if peers else None
        best_rate = peers[best]["requests/s"] if best else np.nan
        best_p99 = peers[best]["p99 ms"] if best else np.nan
        if c == 1:
            target, met = "≥ 0.9x plain", service["requests/s"] >= 0.9 * plain
        else:
            target, met = "≥ 1.0x best peer (aim 1.2x)", service["requests/s"] >= best_rate
            if c == 64:
                target, met = target + ", p99 ≤ best peer's", met and service["p99 ms"] <= best_p99
        rows.append({"concurrency": c, "service req/s": service["requests/s"], "plain req/s": plain,
                     "best peer": SERVERS[best].title if best else "none", "best peer req/s": best_rate,
                     "service ÷ plain": service["requests/s"] / plain,
                     "service ÷ best peer": service["requests/s"] / best_rate,
                     "service p99 ms": service["p99 ms"], "best peer p99 ms": best_p99, "target": target,
                     "met": "yes" if met else "NO"})  # fmt: skip
    return rows


def photo_rows(results: Results, concurrencies: list[int]) -> list[dict[str, Any]]:
    rows = []
    for task in photos.TASKS:
        for c in concurrencies:
            medians = {
                n: _median(results.photos[(n, task, c)]) for n in PHOTO_SERVERS if (n, task, c) in results.photos
            }
            plain = medians.get("plain", {}).get("requests/s", np.nan)
            for name, m in medians.items():
                ratio = m["requests/s"] / plain if name == "service" else ""
                rows.append({"task": f"/v1/{task}", "server": SERVERS[name].title, "concurrency": c, **m,
                             "service ÷ plain": ratio})  # fmt: skip
    return rows


def decode_rows(results: Results) -> list[dict[str, Any]]:
    """The service's decode + preprocess (its Server-Timing, at the lowest photo concurrency) against
    the plain full Pillow decode + preprocessing of the same photos in this process, same run."""
    rows = []
    for task in photos.TASKS:
        decode, preprocess, both = photos.stage_ms(results.stages[task])
        pillow = statistics.median(p[task] for p in results.pillow) if results.pillow else np.nan
        rows.append({"task": f"/v1/{task}", "photo": "1920x1440 JPEG q90", "service decode ms": decode,
                     "service preprocess ms": preprocess, "service decode + preprocess ms": both,
                     "plain Pillow full decode + preprocess ms": pillow, "service ÷ Pillow": both / pillow,
                     "target": "≤ 0.33", "met": "yes" if both <= pillow / 3 else "NO"})  # fmt: skip
    return rows


def report(names: list[str], results: Results, args: argparse.Namespace) -> None:
    about = describe_machine()
    print(f"\nmachine: {about['cpu'] or about['processor']}, {about['cpus']} CPUs, Python {about['python']}, "
          f"client and servers on the same machine")  # fmt: skip
    for name, pins in versions(names).items():
        print(f"- {name}: {pins}")
    for name, why in results.unavailable.items():
        print(f"- {name}: UNAVAILABLE, left out: {why}")
    tables = {"peers": peer_rows(names, results, args.concurrency),
              "summary": summary_rows(names, results, args.concurrency),
              "photos": photo_rows(results, args.photo_concurrency), "decode": decode_rows(results)}  # fmt: skip
    titles = {"peers": "digits as PNG, one per request", "summary": "the service against the peers",
              "photos": "photos, 1920x1440 JPEG", "decode": "decode + preprocess of one photo"}  # fmt: skip
    for key, rows in tables.items():
        if rows and (key != "decode" or results.pillow):
            print(f"\n{titles[key]} ({args.repeats} repeats, {args.seconds:g} s runs, medians)\n\n{markdown(rows)}")
    if len(results.photo_answers) == 2:
        service, plain = results.photo_answers["service"], results.photo_answers["plain"]
        verdict = "the same" if service == plain else "DIFFERENT (a reduced-scale decode can do that)"
        print(f"\nphoto answers (classify top-1, detect labels): service {service}, plain {plain}: {verdict}")
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    out = {"benchmark": "peers", "machine": about, "settings": settings, "versions": versions(names),
           "unavailable": results.unavailable, "photo_answers": results.photo_answers, **tables}  # fmt: skip
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(finite(out), indent=2))
    print(f"\nwritten to {args.json}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.peers", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--workload", choices=["digits", *WORKLOADS], default="digits",
                        help="digits (below), or a real-size model on photos (bench/peers/real.py)")  # fmt: skip
    parser.add_argument("--seconds", type=float, help="length of each timed run (digits 4, vit-b16 10, detr-r50 15)")
    parser.add_argument("--repeats", type=int, help="rounds, servers taking turns in each (digits 4, else 2)")
    parser.add_argument("--concurrency", type=int, nargs="+", help="digits 1 8 32 64; vit-b16 1 4 16; detr-r50 1 4")
    parser.add_argument("--servers", nargs="+", choices=list(SERVERS),
                        help="the service always runs, the reference; transformers: real workloads only")  # fmt: skip
    parser.add_argument("--photo-seconds", type=float, default=3.0, help="digits: length of each timed photo run")
    parser.add_argument("--photo-concurrency", type=int, nargs="*", default=[1, 8],
                        help="digits: the photo workload's concurrencies; none: no photo workload")  # fmt: skip
    parser.add_argument("--tune-seconds", type=float, default=4.0,
                        help="real workloads: each peer configuration's run at concurrency 4 (0: none)")  # fmt: skip
    parser.add_argument("--ceiling-seconds", type=float, default=2.0,
                        help="real workloads: each ONNX Runtime configuration's run, in every repeat")  # fmt: skip
    parser.add_argument("--json", type=Path, help="default bench/results/peers[-WORKLOAD].json")
    args = parser.parse_args(argv)
    workload = WORKLOADS.get(args.workload)
    if workload is None and "transformers" in (args.servers or []):
        parser.error("transformers serves the real workloads only (it has no digit model)")
    defaults = (4.0, 4, [1, 8, 32, 64]) if workload is None else (workload.seconds, 2, list(workload.concurrency))
    args.seconds, args.repeats, args.concurrency = (
        given if given is not None else default
        for given, default in zip((args.seconds, args.repeats, args.concurrency), defaults, strict=True)
    )
    suffix = "" if workload is None else f"-{workload.name}"
    args.json = args.json or Path(f"bench/results/peers{suffix}.json")
    every = DIGIT_SERVERS if workload is None else list(SERVERS)
    names = ["service", *(name for name in every if name in (args.servers or every) and name != "service")]
    if workload is None:
        report(names, measure(names, args), args)
    else:
        real.run(names, workload, args)


if __name__ == "__main__":
    main()
