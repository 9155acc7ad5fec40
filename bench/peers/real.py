"""`python -m bench.peers --workload vit-b16|detr-r50`: the service against the peers on a real-size
model and photos, each peer set up first as its own documentation advises, and every server held
against raw ONNX Runtime in this process (the ceiling).

- The model (bench/peers/workloads.py): a ViT-B/16 at 224x224 with 1,000 labels, or a DETR-ResNet-50
  at its native 800-pixel shortest edge; random weights, saved as a Hugging Face folder and imported
  with `python -m export.hf`, once (bench/.cache/peers/).
- The photos: scikit-learn's two sample photos cropped to 4:3 and resized to 480x360 ... 1280x960,
  JPEG quality 90 (bench/peers/photos.py), one per request, cycling.
- The servers, all on the import's ONNX file and the same ONNX Runtime but transformers: the service
  (`python -m service`, VITSERVE_MODEL_REPOSITORY at the workload's repository, all else default), the
  plain FastAPI + ORT endpoint, LitServe, PyTriton, and transformers' pipeline on PyTorch.
- Tuning: each peer's candidate configurations (`configs`: ONNX Runtime's threads at the physical
  cores with spinning on and off; LitServe's and Triton's batching off or within a queue delay; the
  pipeline one request at a time or batched as transformers' web-server guide does) run in turn at
  concurrency 4 for --tune-seconds; the fastest is the peer's configuration from then on, named in
  the tables. The service runs as started, untuned.
- Answers: on its first start each server's top-1 label (classify) or set of labels (detect) for
  every photo is set against the service's. An ONNX Runtime peer that differs stops the run (the same
  graph and preprocessing must agree); transformers' pipeline (PyTorch) is reported, not stopped.
- Rounds: in each repeat the ceiling, then every server in turn: started (its time to its first
  answer), at each concurrency warmed then timed (requests/s, p50, p99, errors; CPU seconds per
  request and resident memory of its process tree from /proc), stopped. Figures are medians over
  repeats; client and servers share the machine's cores.
- The ceiling: ONNX Runtime alone on the same graph, the photos' inputs preprocessed in memory, at
  each thread count, spinning and batch size. At each concurrency the ceiling is the best
  configuration whose batch that many requests in flight can form (one at a time forms none)."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2
import numpy as np
import onnxruntime as ort

from bench.common import markdown
from bench.peers import photos, venvs
from bench.peers.about import describe_machine, finite, versions
from bench.peers.load import Run, load
from bench.peers.procs import cpu_seconds, resident_bytes
from bench.peers.recipe import pixels, session_options
from bench.peers.servers import SERVERS, Request, Server, launched
from bench.peers.venvs import Unavailable
from bench.peers.workloads import Workload, prepare

ORT_PEERS = ("plain", "litserve", "pytriton")
TUNING_CONCURRENCY = 4
WARMUP_SECONDS = 1.0  # every connection answered at least once before a timed run


def physical_cores() -> int:
    """Cores, not hardware threads: the distinct sibling sets of the CPUs this process may use."""
    siblings = set()
    for cpu in os.sched_getaffinity(0):
        path = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list")
        siblings.add(path.read_text().strip() if path.exists() else str(cpu))
    return len(siblings)


CORES = physical_cores()


@dataclass(frozen=True)
class Config:
    label: str  # as the tables name it
    env: dict[str, str] = field(default_factory=dict)


def configs(name: str, workload: Workload) -> list[Config]:
    """A server's candidate configurations, the one its documentation starts from first. ONNX
    Runtime's guide: intra-op threads = physical cores; spinning on (its default) or off."""
    threads = {"PEER_THREADS": str(CORES)}
    spinning = [Config(f"{CORES} threads, spinning {word}", {**threads, "PEER_SPINNING": flag})
                for word, flag in (("on", "1"), ("off", "0"))]  # fmt: skip
    if name == "plain":
        return spinning
    if name in ("litserve", "pytriton"):
        return [Config(f"{spin.label}, {batching(size, delay)}",
                       {**spin.env, "PEER_MAX_BATCH": str(size), "PEER_QUEUE_DELAY_MS": str(delay)})
                for spin in spinning for size, delay in workload.batchers]  # fmt: skip
    if name == "transformers":  # PyTorch's tuning guide: threads = physical cores
        return [Config(f"{CORES} torch threads, {batching(size, 1) if size > 1 else 'one at a time'}",
                       {**threads, "PEER_MAX_BATCH": str(size)}) for size in (1, 8)]  # fmt: skip
    return [Config("defaults")]


def batching(size: int, delay_ms: float) -> str:
    return f"batches of up to {size} within {delay_ms:g} ms" if size > 1 else "no batching"


def workload_env(workload: Workload) -> dict[str, str]:
    """Where each kind of server finds the model: the service, the ONNX Runtime peers, transformers."""
    repository = str(workload.repository)
    return {"VITSERVE_MODEL_REPOSITORY": repository, "PEER_REPOSITORY": repository, "PEER_MODELS": workload.model,
            "PEER_CHECKPOINT": str(workload.checkpoint), "PEER_TASK": workload.task}  # fmt: skip


@dataclass
class Sample:
    run: Run
    cpu_per_request: float  # CPU seconds of the server's process tree per answered request
    resident: int  # bytes, the process tree's RSS after the run
    ready: float  # seconds from the start of its process to its first answer


@dataclass
class Results:
    tuning: list[dict[str, Any]] = field(default_factory=list)
    chosen: dict[str, Config] = field(default_factory=dict)
    samples: dict[tuple[str, int], list[Sample]] = field(default_factory=lambda: defaultdict(list))
    ceiling: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))  # configuration -> images/s
    ceiling_batch: dict[str, int] = field(default_factory=dict)  # configuration -> its batch size
    reference: list[Any] = field(default_factory=list)  # the service's answers
    answers: dict[str, str] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)


# answers ------------------------------------------------------------------------------------------


def requests_for(server: Server, workload: Workload, jpegs: list[bytes]) -> list[Request]:
    encode = server.route(workload.task, workload.model)
    return [encode(jpeg, "image/jpeg") for jpeg in jpegs]


def answers(server: Server, url: str, requests: list[Request], task: str) -> list[Any]:
    """Per photo, the top-1 label (classify) or the sorted set of labels found (detect)."""
    found = []
    for request in requests:
        response = httpx2.post(url + request.path, content=request.body, headers=request.headers, timeout=300)
        response.raise_for_status()
        items = server.items(response.json())
        found.append(items[0]["label"] if task == "classify" else sorted({item["label"] for item in items}))
    return found


def check(name: str, found: list[Any], results: Results) -> str:
    """The server's answers against the service's: 'same', or what differs (which stops the run for
    an ONNX Runtime peer, since the same graph and preprocessing must agree)."""
    if name == "service":
        results.reference = found
        return f"reference ({len(found)} photos)"
    title, count = SERVERS[name].title, len(found)
    wrong = [i for i, (ours, theirs) in enumerate(zip(results.reference, found, strict=True)) if ours != theirs]
    if not wrong:
        print(f"{title}: the service's answers on all {count} photos")
        return f"same on all {count}"
    i = wrong[0]
    message = (f"{title} differs from the service on {len(wrong)} of {count} photos "
               f"(photo {i}: service {results.reference[i]}, {name} {found[i]})")  # fmt: skip
    if name in ORT_PEERS:
        raise SystemExit(f"ANSWERS DIFFER: {message}; nothing is timed on unequal answers")
    print(f"NOTE: {message}")
    return f"{len(wrong)} of {count} DIFFER"


# tuning and rounds --------------------------------------------------------------------------------


def tune(name: str, workload: Workload, jpegs: list[bytes], args: argparse.Namespace, results: Results) -> None:
    """Each candidate configuration started and timed at concurrency 4; the fastest is kept. The first
    start also checks the server's answers."""
    server, candidates = SERVERS[name], configs(name, workload)
    requests = requests_for(server, workload, jpegs)
    timed = candidates if args.tune_seconds > 0 and len(candidates) > 1 else candidates[:1]
    rates: dict[str, float] = {}
    for config in timed:
        with launched(server, requests[0], {**workload_env(workload), **config.env}) as live:
            if name not in results.answers:
                results.answers[name] = check(name, answers(server, live.url, requests, workload.task), results)
            if len(timed) > 1:
                rates[config.label] = load(live.url, requests, TUNING_CONCURRENCY, args.tune_seconds,
                                           warmup=WARMUP_SECONDS).rate  # fmt: skip
                print(f"tuning {name}: {config.label}: {rates[config.label]:.3g} req/s", flush=True)
    results.chosen[name] = max(timed, key=lambda config: rates.get(config.label, 0.0))
    for config in timed if len(timed) > 1 else []:
        results.tuning.append({"server": server.title, "configuration": config.label,
                               f"req/s at {TUNING_CONCURRENCY}": rates[config.label],
                               "chosen": "yes" if config == results.chosen[name] else ""})  # fmt: skip


def round_of(name: str, workload: Workload, jpegs: list[bytes], args: argparse.Namespace, results: Results) -> None:
    """One server's turn in a repeat: started in its configuration, timed at each concurrency, stopped."""
    server = SERVERS[name]
    requests = requests_for(server, workload, jpegs)
    with launched(server, requests[0], {**workload_env(workload), **results.chosen[name].env}) as live:
        for concurrency in args.concurrency:
            load(live.url, requests, concurrency, WARMUP_SECONDS, warmup=0)
            before = cpu_seconds(live.pid)
            run = load(live.url, requests, concurrency, args.seconds, warmup=0)
            cpu = (cpu_seconds(live.pid) - before) / max(run.answered, 1)
            sample = Sample(run, cpu, resident_bytes(live.pid), live.ready_seconds)
            results.samples[(name, concurrency)].append(sample)


def ceiling(workload: Workload, jpegs: list[bytes], seconds: float, results: Results) -> None:
    """ONNX Runtime alone on the graph, the photos already preprocessed: images/s at every thread count
    (physical cores; every CPU, where that differs), spinning and batch size."""
    manifest = json.loads((workload.repository / workload.model / "1" / "manifest.json").read_text())
    inputs = [pixels(jpeg, manifest["preprocessing"])[0] for jpeg in jpegs]
    inputs = [x for x in inputs if x.shape == inputs[0].shape]  # a batch takes one input size
    graph = workload.repository / workload.model / "1" / manifest["graphs"]["main"]["file"]
    for threads in sorted({CORES, len(os.sched_getaffinity(0))}):
        for word, flag in (("on", "1"), ("off", "0")):
            session = ort.InferenceSession(str(graph), session_options(threads, flag),
                                           providers=["CPUExecutionProvider"])  # fmt: skip
            for size in workload.batch_sizes:
                batch = np.stack([inputs[i % len(inputs)] for i in range(size)])
                label = f"{threads} threads, spinning {word}, batch {size}"
                results.ceiling[label].append(images_per_second(session, batch, seconds))
                results.ceiling_batch[label] = size


def images_per_second(session: ort.InferenceSession, batch: np.ndarray, seconds: float) -> float:
    feed = {session.get_inputs()[0].name: batch}
    session.run(None, feed)  # warm at this size
    runs, started = 0, time.perf_counter()
    while runs < 2 or time.perf_counter() - started < seconds:
        session.run(None, feed)
        runs += 1
    return runs * len(batch) / (time.perf_counter() - started)


def measure(names: list[str], workload: Workload, args: argparse.Namespace) -> Results:
    results = Results()
    for name in names:  # every venv before anything is timed
        if SERVERS[name].venv:
            try:
                venvs.python(SERVERS[name].venv)
            except Unavailable as exc:
                results.unavailable[name] = str(exc)
    prepare(workload)
    jpegs = photos.varied()
    turns = [("tuning", tune)] + [(f"repeat {r + 1}", round_of) for r in range(args.repeats)]
    for stage, turn in turns:  # the service first: the reference answers
        print(f"-- {stage}", flush=True)
        if turn is round_of:
            ceiling(workload, jpegs, args.ceiling_seconds, results)
        for name in names:
            if name not in results.unavailable:
                _turn(turn, name, workload, jpegs, args, results)
    return results


def _turn(turn: Any, name: str, workload: Workload, jpegs: list[bytes], args: argparse.Namespace,
          results: Results) -> None:  # fmt: skip
    """A server's turn; one that cannot run here is left out from then on (never the service)."""
    try:
        turn(name, workload, jpegs, args, results)
    except Unavailable as exc:
        if name == "service":
            raise
        results.unavailable[name] = str(exc)
        print(f"UNAVAILABLE {name}: {exc}")


# tables -------------------------------------------------------------------------------------------


def medians(samples: list[Sample]) -> dict[str, Any]:
    return {
        "req/s": statistics.median(s.run.rate for s in samples),
        "p50 ms": statistics.median(s.run.p50 for s in samples),
        "p99 ms": statistics.median(s.run.p99 for s in samples),
        "errors": sum(s.run.errors for s in samples),
        "CPU s/request": statistics.median(s.cpu_per_request for s in samples),
        "RSS MiB": statistics.median(s.resident for s in samples) / 2**20,
        "ready s": statistics.median(s.ready for s in samples),
    }


def best_ceiling(results: Results, concurrency: int) -> tuple[str, float]:
    """The fastest configuration of ONNX Runtime alone among those whose batch `concurrency` requests
    in flight can form (one request at a time cannot be batched)."""
    rates = {label: statistics.median(r) for label, r in results.ceiling.items()
             if results.ceiling_batch[label] <= concurrency}  # fmt: skip
    label = max(rates, key=rates.__getitem__, default="none")
    return label, rates.get(label, np.nan)


def at(concurrency: int, names: list[str], results: Results) -> tuple[dict[str, dict[str, Any]], str | None]:
    """Every server's medians at this concurrency, and the fastest peer (not the service)."""
    found = {n: medians(results.samples[(n, concurrency)]) for n in names if results.samples.get((n, concurrency))}
    peers = [n for n in found if n != "service"]
    return found, max(peers, key=lambda n: found[n]["req/s"], default=None)


def server_rows(names: list[str], results: Results, args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for concurrency in args.concurrency:
        _, top = best_ceiling(results, concurrency)
        found, best = at(concurrency, names, results)
        best_rate = found[best]["req/s"] if best else np.nan
        for name, m in found.items():
            rows.append({"concurrency": concurrency, "server": SERVERS[name].title,
                         "configuration": results.chosen[name].label, "req/s": m["req/s"],
                         "÷ ceiling": m["req/s"] / top, "÷ best peer": m["req/s"] / best_rate,
                         **{k: v for k, v in m.items() if k != "req/s"}})  # fmt: skip
    return rows


def summary_rows(names: list[str], results: Results, args: argparse.Namespace) -> list[dict[str, Any]]:
    """The issue's targets: the service at 0.95 of the ceiling or more, ahead of every peer at every
    concurrency, its p99 no worse than the fastest peer's."""
    rows = []
    for concurrency in args.concurrency:
        label, top = best_ceiling(results, concurrency)
        found, best = at(concurrency, names, results)
        if "service" not in found:
            continue
        service = found["service"]
        peer = found[best] if best else {"req/s": np.nan, "p99 ms": np.nan}
        share, lead = service["req/s"] / top, service["req/s"] / peer["req/s"]
        rows.append({"concurrency": concurrency, "ceiling images/s": top, "ceiling configuration": label,
                     "service req/s": service["req/s"], "service ÷ ceiling": share,
                     "≥ 0.95": _met(share >= 0.95), "best peer": SERVERS[best].title if best else "none",
                     "best peer req/s": peer["req/s"], "service ÷ best peer": lead, "> 1": _met(lead > 1),
                     "service p99 ms": service["p99 ms"], "best peer p99 ms": peer["p99 ms"],
                     "p99 ≤ best peer's": _met(service["p99 ms"] <= peer["p99 ms"])})  # fmt: skip
    return rows


def _met(ok: bool) -> str:
    return "yes" if ok else "NO"


def ceiling_rows(results: Results) -> list[dict[str, Any]]:
    return [{"ONNX Runtime alone": label, "images/s": statistics.median(rates)}
            for label, rates in results.ceiling.items()]  # fmt: skip


def report(names: list[str], workload: Workload, results: Results, args: argparse.Namespace) -> None:
    about = describe_machine()
    sizes = f"{photos.VARIED[0][0]}x{photos.VARIED[0][1]} to {photos.VARIED[-1][0]}x{photos.VARIED[-1][1]}"
    print(f"\n{workload.name}: {workload.model} on /v1/{workload.task}, JPEG photos {sizes}; "
          f"{about['cpu'] or about['processor']}, {about['cpus']} CPUs ({CORES} physical cores), client and "
          f"servers on the same machine; {args.repeats} repeats of {args.seconds:g} s, medians")  # fmt: skip
    for name, pins in versions(names).items():
        print(f"- {name}: {pins}; answers: {results.answers.get(name, 'not checked')}")
    for name, why in results.unavailable.items():
        print(f"- {name}: UNAVAILABLE, left out: {why}")
    tables = {"tuning": results.tuning, "ceiling": ceiling_rows(results),
              "servers": server_rows(names, results, args), "summary": summary_rows(names, results, args)}  # fmt: skip
    titles = {"tuning": f"tuning, concurrency {TUNING_CONCURRENCY}, {args.tune_seconds:g} s each",
              "ceiling": "the ceiling: ONNX Runtime in this process, inputs preprocessed",
              "servers": "the servers", "summary": "the issue's targets"}  # fmt: skip
    for key, rows in tables.items():
        if rows:
            print(f"\n{titles[key]}\n\n{markdown(rows)}")
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    out = {"benchmark": f"peers {workload.name}", "machine": about, "physical_cores": CORES,
           "settings": settings, "versions": versions(names), "answers": results.answers,
           "unavailable": results.unavailable, **tables}  # fmt: skip
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(finite(out), indent=2))
    print(f"\nwritten to {args.json}")


def run(names: list[str], workload: Workload, args: argparse.Namespace) -> None:
    report(names, workload, measure(names, workload, args), args)
