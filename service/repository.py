"""One model version from the repository: its folder found, its sessions loaded in isolation and
warmed up, its batchers, and the leases requests hold on it while they use it.

A version that fails to load (missing or corrupt file, invalid or mismatched manifest) comes back
with its reason and state "failed"; what else serves is the registry's business (service/registry.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Literal

import numpy as np
import onnxruntime as ort

from service import context, measured
from service.batching import Batcher, Reservation, Unloaded
from service.errors import ServiceError
from service.imaging import resized_size
from service.manifest import (
    BatchPolicy,
    GenerationConfig,
    GraphSpec,
    Manifest,
    Preprocessing,
    TensorSpec,
    read_manifest,
)
from service.memory import resident_bytes
from service.runtime import (
    CPU,
    GraphRun,
    create_session,
    cuda_graph,
    every_core,
    requested_providers,
    runner,
)
from service.sampling import POOLED_GRAPH, CachePool, NoFreeSlots, PooledSteps, Step, host_steps
from service.settings import Settings

# task name -> its check of a manifest (raises ValueError when the manifest does not suit the task)
ManifestChecks = Mapping[str, Callable[[Manifest], None]]

log = logging.getLogger("service")

State = Literal["ready", "failed"]

ORT_TYPES = {
    "float32": "tensor(float)",
    "float16": "tensor(float16)",
    "int64": "tensor(int64)",
    "int32": "tensor(int32)",
    "uint8": "tensor(uint8)",
    "bool": "tensor(bool)",
}


@dataclass
class ServedModel:
    name: str
    path: Path
    state: State = "failed"
    reason: str | None = None
    manifest: Manifest | None = None
    sessions: dict[str, ort.InferenceSession] = field(default_factory=dict)
    runs: dict[str, GraphRun] = field(default_factory=dict)  # each graph's run, as requests take it
    cache_pool: CachePool | None = None  # generation's caches on the device (the pooled step graph)
    batchers: dict[str, Batcher] = field(default_factory=dict)
    # inference threads of this model's own, one per graph: runs never queue behind image decoding
    executor: ThreadPoolExecutor | None = None
    failed_graphs: dict[str, str] = field(default_factory=dict)  # optional graph -> why it did not load
    batch_rates: dict[str, dict[int, float]] = field(default_factory=dict)  # graph -> batch -> images/s measured
    load_seconds: float = 0.0
    resident_bytes: int | None = None  # what the process's resident memory grew by while loading it
    version: int = 0
    fingerprint: str = ""  # of its folder's files: a changed file is a new version to load
    leases: int = 0  # requests using it now: an unload or a replacement waits for them
    # graphs loaded on their first request (attention: a second copy of the weights), and what loads one
    lazy: dict[str, Callable[[], None]] = field(default_factory=dict)
    lazy_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    on_batcher: Callable[[str, Batcher], None] | None = None  # told of a batcher made after it was served

    @property
    def providers(self) -> list[str]:
        main = self.sessions.get("main")
        return main.get_providers() if main else []

    def _as_declared(self, feeds: dict[str, np.ndarray], graph: str) -> dict[str, np.ndarray]:
        """Each input in the dtype the manifest declares (an fp16 graph takes float16), whatever the
        stage that made it computed in; no copy where it already is."""
        assert self.manifest is not None
        declared = {spec.name: spec.dtype for spec in self.manifest.graphs[graph].inputs}
        return {name: a if a.dtype == declared[name] else a.astype(declared[name]) for name, a in feeds.items()}

    def reserve(self, size: int, graph: str) -> Reservation | None:
        """Queue room for `size` images on the graph's batcher, for a run of many steps (503 if full)."""
        return self.batchers[graph].reserve(size) if graph in self.batchers else None

    def lease(self) -> Callable[[], None]:
        """Holds the model for a request until the returned release (idempotent) is called."""
        self.leases += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.leases -= 1

        return release

    def close_now(self) -> None:
        """Drops its sessions and threads (batchers must be closed first: `close`)."""
        self.sessions.clear()
        self.runs.clear()
        self.batchers.clear()
        self.lazy.clear()
        self.cache_pool = None
        # it holds the model (a cycle): without it, a request still on the model frees it as it ends
        self.on_batcher = None
        if self.executor is not None:
            self.executor.shutdown(wait=False, cancel_futures=True)
            self.executor = None

    async def close(self) -> None:
        """Its batchers stopped, then its sessions and threads dropped (their memory with them)."""
        for batcher in self.batchers.values():
            await batcher.close()
        self.close_now()

    def has_graph(self, graph: str) -> bool:
        return graph in self.sessions or graph in self.lazy

    async def load_lazy(self, graph: str) -> None:
        """A graph loaded on its first request, off the event loop, once (503 with the reason if it
        fails: the model serves on without it)."""
        async with self.lazy_lock:
            if graph in self.lazy:
                load = self.lazy[graph]
                try:
                    await asyncio.get_running_loop().run_in_executor(None, load)
                except Exception as exc:
                    self.failed_graphs[graph] = _reason(exc, self.path.parent.parent)
                    log.error("model %s serves without its %s graph: %s", self.name, graph, self.failed_graphs[graph])
                del self.lazy[graph]
                if graph in self.batchers and self.on_batcher is not None:
                    self.on_batcher(graph, self.batchers[graph])
        if graph in self.failed_graphs:
            raise ServiceError(503, "graph_not_ready", f"model {self.name!r}'s {graph} graph failed to load: "
                               f"{self.failed_graphs[graph]}")  # fmt: skip

    async def run(
        self, feeds: dict[str, np.ndarray], graph: str = "main", reservation: Reservation | None = None
    ) -> list[np.ndarray]:
        """Run a graph on the model's inference threads, so the event loop keeps serving meanwhile:
        through its batcher where it has one, else alone."""
        if graph in self.lazy:
            await self.load_lazy(graph)
        if graph not in self.runs:  # closed: an unload that waited its longest (a slow client's stream)
            raise Unloaded(self.name)
        feeds = self._as_declared(feeds, graph)
        if graph in self.batchers:
            return await self.batchers[graph].run(feeds, reservation)
        with context.timed("inference"):
            return await asyncio.get_running_loop().run_in_executor(self.executor, self.runs[graph], feeds)

    def run_now(self, feeds: dict[str, np.ndarray], graph: str = "main") -> list[np.ndarray]:
        """A run in the calling thread, past any batcher: for an offline caller that forms its own
        batches (`vitserve predict`)."""
        return self.runs[graph](self._as_declared(feeds, graph))

    def sampler(self, cfg: GenerationConfig, batch: int) -> Sampler:
        """Steps for a generation of `batch` images, sharing runs with other generations: with the
        caches in the device's pool where the model has one, else on the host. It holds its queue
        room (503 here if there is none: never a stream broken off half-way) and its slots until
        released (on the event loop)."""
        pool = self.cache_pool
        graph = POOLED_GRAPH if pool is not None else "step"
        reservation = self.reserve(batch, graph)
        release_room = reservation.release if reservation else None
        run = partial(self.run, graph=graph, reservation=reservation)
        if pool is None:
            return Sampler(host_steps(run, cfg, batch), [release_room] if release_room else [])
        try:
            slots = pool.acquire(batch)
        except NoFreeSlots:  # only without batching: the batcher's queue room bounds the slots in use
            if release_room:
                release_room()
            raise ServiceError(503, "overloaded", f"model {self.name!r} has {len(pool.free)} of its {pool.capacity} "
                               "cache slots free; retry shortly", {"Retry-After": "1"}) from None  # fmt: skip
        steps = PooledSteps(run, pool, slots, then=release_room)  # the room goes back with the slots
        return Sampler(steps, [steps.release])


@dataclass
class Sampler:
    """A generation's steps (tokens -> logits), and what it holds until `release` (idempotent)."""

    step: Step
    releases: list[Callable[[], None]]

    def release(self) -> None:
        releases, self.releases = self.releases, []
        for release in releases:
            release()


def check_graph(session: ort.InferenceSession, spec: GraphSpec) -> None:
    """The ONNX graph must have exactly the inputs and outputs its manifest promises."""
    for kind, actual, promised in (
        ("input", session.get_inputs(), spec.inputs),
        ("output", session.get_outputs(), spec.outputs),
    ):
        if [a.name for a in actual] != [p.name for p in promised]:
            raise ValueError(
                f"{spec.file}: {kind}s are {[a.name for a in actual]}, the manifest says {[p.name for p in promised]}"
            )
        for a, p in zip(actual, promised, strict=True):
            if a.type != ORT_TYPES[p.dtype]:
                raise ValueError(f"{spec.file}: {kind} {a.name} is {a.type}, the manifest says {p.dtype}")
            fixed = [(x if isinstance(x, int) else None) for x in a.shape]
            if fixed != [(x if isinstance(x, int) else None) for x in p.shape]:
                raise ValueError(f"{spec.file}: {kind} {a.name} has shape {a.shape}, the manifest says {p.shape}")


def request_inputs(spec: GraphSpec) -> list[TensorSpec]:
    """The inputs requests feed: all but a pool (axis "capacity"), which its runner binds itself."""
    return [t for t in spec.inputs if "capacity" not in t.shape]


def batchable(spec: GraphSpec) -> bool:
    """Requests can share a run when every input they feed has the batch as its first axis."""
    return all(t.shape and t.shape[0] == "batch" for t in request_inputs(spec))


# The free axes of an image input whose size each image keeps (an imported DETR's)
IMAGE_AXES = ("height", "width")


def typical_side(recipe: Preprocessing) -> int:
    """The side of a square photo once resized by `recipe`: what loading times a graph whose image
    size is free on (800 for a DETR at its 800-pixel shortest edge)."""
    side = max(recipe.size)
    return min(resized_size(side, side, recipe))


def zeros(spec: GraphSpec, batch: int, side: int = 1) -> dict[str, np.ndarray]:
    """Feeds of zeros for `batch` images (every free axis `batch` long, an image's side at least `side`)."""

    def length(dim: int | str) -> int:
        return dim if isinstance(dim, int) else batch if dim == "batch" else max(batch, side)

    return {t.name: np.zeros([length(d) for d in t.shape], dtype=t.dtype) for t in request_inputs(spec)}


def warm_up(run: GraphRun, spec: GraphSpec, batch_sizes: list[int], times: int = 1, side: int = 1) -> None:
    """Runs on zeros at each batch size the batcher forms, so no request pays for a first run (with
    CUDA graphs, three times: ONNX Runtime captures a graph after two ordinary runs)."""
    for batch in batch_sizes:
        feeds = zeros(spec, batch, side)
        for _ in range(times):
            run(feeds)


# A one-image run longer than this (on the CPU, on every core) dwarfs what a request brings the event
# loop (HTTP, a photo's decoding: a few ms), so ONNX Runtime keeps every core; shorter runs leave a
# core to the loop (docs/benchmarks.md has the figures).
HEAVY_RUN_S = 0.02


def worth_timing(spec: GraphSpec, settings: Settings, side: int = 1) -> bool:
    """Whether loading times the graph (is it heavy, where does batching stop paying): warm-up on, no
    thread count set, on the CPU. Also where the workers leave each no core to spare for the event
    loop: the knee still decides the batches. A graph whose image size is free (an imported DETR's)
    is timed on a square image of `side` (its recipe's typical side), where it has one; other free
    axes (a decoding step's) are not timed: zeros of length 1 would not say how long a real run takes."""
    free = {d for t in spec.inputs for d in t.shape if isinstance(d, str)}
    sized = free == {"batch"} or (free == {"batch", *IMAGE_AXES} and side > 1)
    return (
        settings.warmup and not settings.intra_op_threads and sized
        and requested_providers(settings.device)[0] == CPU
    )  # fmt: skip


def runs_long(session: ort.InferenceSession, spec: GraphSpec, side: int = 1) -> bool:
    """A one-image run (the second: the first pays for allocations) over HEAVY_RUN_S."""
    feeds = zeros(spec, 1, side)
    session.run(None, feeds)
    started = time.perf_counter()
    session.run(None, feeds)
    return time.perf_counter() - started > HEAVY_RUN_S


# Doubling a heavy graph's batch must raise its images/s by this much to be worth the latency it adds
BATCH_GAIN = 1.1


def batch_knee(run: GraphRun, spec: GraphSpec, sizes: list[int], side: int = 1) -> tuple[int, dict[int, float]]:
    """The batch size past which doubling stops paying (images/s up by less than BATCH_GAIN), and the
    images/s measured at each size tried; the sizes past the knee are never run. Each size is timed
    against the one before, interleaved (a burst of other work, such as the traffic of a model
    already serving, slows both alike), the faster of two runs each (the first at a new size pays
    for its allocations). A heavy model on a CPU gains nothing from batching: its knee is 1."""
    rates: dict[int, float] = {}
    feeds = {size: zeros(spec, size, side) for size in sizes[:2]}
    for smaller, size in zip(sizes, sizes[1:], strict=False):
        feeds[size] = feeds.get(size) or zeros(spec, size, side)
        for _ in range(2):
            for s in (smaller, size):
                started = time.perf_counter()
                run(feeds[s])
                rates[s] = max(rates.get(s, 0.0), s / (time.perf_counter() - started))
        if rates[size] < BATCH_GAIN * rates[smaller]:
            return smaller, rates
        del feeds[smaller]
    return sizes[-1], rates


def release_arena(session: ort.InferenceSession, spec: GraphSpec, side: int = 1) -> None:
    """A smallest run that hands ONNX Runtime's arena back afterwards: what a timing's bigger runs
    took (a DETR-R50's batch of two 800-pixel squares: 280 MB) is not kept for the life of the process."""
    options = ort.RunOptions()
    options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
    session.run(None, zeros(spec, 1, side), options)


def batch_policy(manifest: Manifest, settings: Settings) -> BatchPolicy:
    """The manifest's batching defaults, overridden per model by settings."""
    return BatchPolicy.model_validate({**manifest.serving.model_dump(), **settings.batch_policy.get(manifest.name, {})})


def warm_sizes(policy: BatchPolicy) -> list[int]:
    """1, 2, 4, ... up to max_batch_size, and max_batch_size itself."""
    sizes = [2**i for i in range(policy.max_batch_size.bit_length()) if 2**i <= policy.max_batch_size]
    return sorted({*sizes, policy.max_batch_size})


# The most one batch's tensors may take (their fixed axes), and the most the images queued for a
# generation's step may hold (each keeps its key/value cache until its generation ends): ImageGPT-small's
# attention weights are 805 MB an image, its cache 100 MB in and 100 MB out. Bigger batches are formed
# smaller; more images than the queue then holds get 413 (in one request) or 503 (together).
MAX_BATCH_BYTES = 2**30
MAX_GENERATING_BYTES = 4 * 2**30
GENERATION_STEPS = {"step", POOLED_GRAPH}


def image_bytes(spec: GraphSpec) -> int:
    """What one image's inputs and outputs take (a free axis other than the batch counted once)."""
    sizes = [math.prod(d for d in t.shape if isinstance(d, int)) * np.dtype(t.dtype).itemsize
             for t in [*spec.inputs, *spec.outputs]]  # fmt: skip
    return sum(sizes)


def generating_images(spec: GraphSpec) -> int:
    """The most images a generation's step graph may hold caches for at once (a pool's slots too)."""
    return max(1, MAX_GENERATING_BYTES // image_bytes(spec))


def within_memory(policy: BatchPolicy, spec: GraphSpec, graph: str) -> BatchPolicy:
    """The policy, its batches (and a generation step's queue) cut to MAX_BATCH_BYTES
    (MAX_GENERATING_BYTES), never below one image."""
    update = {"max_batch_size": min(policy.max_batch_size, max(1, MAX_BATCH_BYTES // image_bytes(spec)))}
    if graph in GENERATION_STEPS:
        update["max_queue_size"] = min(policy.max_queue_size, generating_images(spec))
    return policy.model_copy(update=update)


def is_fp16(model: ServedModel, spec: GraphSpec) -> bool:
    """A float16 model: converted at export (its manifest says), or float16 at its inputs or outputs."""
    converted = model.manifest is not None and model.manifest.precision == "float16"
    return converted or any(t.dtype == "float16" for t in [*spec.inputs, *spec.outputs])


def version_dirs(model_dir: Path) -> dict[int, Path]:
    """The model's version folders by number (names of digits only: a folder being written beside,
    `.2.tmp` say, is not one; nor `02` or `٢`, which int() reads as 2 as well, nor `²`, which it cannot read)."""
    return {int(p.name): p for p in model_dir.iterdir() if p.is_dir() and _version_name(p.name)}


def _version_name(name: str) -> bool:
    return name.isascii() and name.isdigit() and not name.startswith("0")


def latest_version(model_dir: Path) -> Path:
    versions = version_dirs(model_dir)
    if not versions:
        raise ValueError(f"no numeric version folder in {model_dir}")
    return versions[max(versions)]


def fingerprint(version_dir: Path) -> str:
    """Names, sizes and change times of a version's files: any change makes another fingerprint (a
    chmod or chown too, which leave the modification time: a version refused for its permissions is
    tried again once they are mended)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in version_dir.rglob("*") if p.is_file()):
        stat = path.stat()
        when = f"{stat.st_mtime_ns}\0{stat.st_ctime_ns}"
        digest.update(f"{path.relative_to(version_dir)}\0{stat.st_size}\0{when}\n".encode())
    return digest.hexdigest()[:16]


# Graphs a model serves without when they fail to load: only the routes that need them answer 503
# (without its pooled step, a generation model decodes through the host, as with device_cache off).
OPTIONAL_GRAPHS = {"attention", POOLED_GRAPH}


def should_load(graph: str, settings: Settings) -> bool:
    """The pooled step graph is loaded where its cache pool is asked for: `device_cache` on, or auto
    and on a GPU (on the CPU the host's cache costs no bus; the step graph serves then)."""
    if graph != POOLED_GRAPH or settings.device_cache == "on":
        return True
    return settings.device_cache == "auto" and requested_providers(settings.device)[0] != CPU


def load_graph(model: ServedModel, graph: str, spec: GraphSpec, settings: Settings, policy: BatchPolicy) -> None:
    """A session for one of the model's graphs, checked against its manifest and warmed up, with its batcher."""
    batched, policy = settings.batching and batchable(spec), within_memory(policy, spec, graph)
    sizes = warm_sizes(policy) if batched and graph != "attention" else [1]
    largest = max(policy.max_queue_size, settings.max_images_per_request)  # the biggest run a request can make

    def session_on(every: bool) -> ort.InferenceSession:
        threads, spin_us = (every_core(settings.workers), settings.heavy_spin_us) if every else (0, 0)
        return create_session(model.path / spec.file, settings, spec, sizes, is_fp16(model, spec), largest, threads,
                              spin_us)  # fmt: skip

    recipe = model.manifest.preprocessing if model.manifest else None
    side, typical = (recipe.smallest_side, typical_side(recipe)) if recipe else (1, 1)  # YOLOS: 16, not 1 pixel
    timed = worth_timing(spec, settings, typical)
    kept_at = measured.path_of(settings.model_repository, model.name, model.version, graph)
    # what decides from the figures is part of the key: a start with other thresholds measures again
    decides = {"heavy_run_s": HEAVY_RUN_S, "batch_gain": BATCH_GAIN, "spin_us": settings.heavy_spin_us}
    key = measured.host_key(model.fingerprint, every_core(settings.workers)) | decides
    known = measured.recall(kept_at, key) if timed else None
    # every core first: a heavy graph (whose session is slow to make) is made once, a light one twice
    # (once where an earlier start measured it)
    session = session_on(every=timed and (known is None or known.heavy))
    check_graph(session, spec)
    heavy = timed and (known.heavy if known else runs_long(session, spec, typical))
    if heavy:
        log.info("model %s: %s is heavy, ONNX Runtime keeps every core", model.name, spec.file)
    elif timed and known is None:  # light: the event loop keeps a core
        del session  # its weights go before the second session's come: one copy at a time
        session = session_on(every=False)
    run, pool = runner(session, sizes), None
    if graph == POOLED_GRAPH:  # room for every image the queue admits (batching off: requests wait for none)
        capacity = max(policy.max_queue_size, settings.max_images_per_request)
        pool = CachePool(session, min(capacity, generating_images(spec)), sizes)
        run = pool.run
    knee = None
    if heavy and batched and graph == "main" and "max_batch_size" not in settings.batch_policy.get(model.name, {}):
        if known is not None and known.knee is not None:
            knee, model.batch_rates[graph] = min(known.knee, sizes[-1]), known.rates
        else:
            knee, model.batch_rates[graph] = batch_knee(run, spec, sizes, typical)
            release_arena(session, spec, side)  # the batches timed past the knee hold no memory from now on
        warm_up(run, spec, [size for size in sizes if size <= knee], side=side)
        log.info("model %s: batches of at most %d (images/s by batch size: %s)", model.name, knee,
                 {size: round(rate, 1) for size, rate in model.batch_rates[graph].items()})  # fmt: skip
        policy = policy.model_copy(update={"max_batch_size": knee})
    # every batch size for the serving graphs, once for the on-request ones; always with CUDA graphs:
    # captured under live traffic, another thread's allocation or copy would break a capture
    elif settings.warmup or cuda_graph(session):
        warm_up(run, spec, sizes, times=3 if cuda_graph(session) else 1, side=side)
    if timed and (known is None or (known.knee is None and knee is not None)):
        measured.remember(kept_at, key, measured.Measured(heavy, knee, model.batch_rates.get(graph, {})))
    model.sessions[graph], model.runs[graph] = session, run
    model.cache_pool = pool or model.cache_pool
    if batched:
        model.batchers[graph] = Batcher(f"{model.name}/{graph}", run, policy, model.executor)


def load_unchanged(model: ServedModel, graph: str, spec: GraphSpec, settings: Settings, policy: BatchPolicy) -> None:
    """load_graph, for a graph loaded on its first request: from the files the version loaded, or not
    at all (a folder replaced in place since, by an export's --force say, holds another model's graph)."""
    if fingerprint(model.path) != model.fingerprint:
        raise ValueError(f"{spec.file}: the version's files changed since it loaded; load the model again")
    load_graph(model, graph, spec, settings, policy)


def load_graphs(model: ServedModel, manifest: Manifest, settings: Settings) -> None:
    """Every graph the settings ask for; the attention graph on its first request where
    `lazy_attention` (its file must be there now)."""
    policy = batch_policy(manifest, settings)
    for graph, spec in manifest.graphs.items():
        if not should_load(graph, settings):
            continue
        if graph == "attention" and settings.lazy_attention:
            if not (model.path / spec.file).is_file():
                missing = FileNotFoundError(None, None, str(model.path / spec.file))
                model.failed_graphs[graph] = _reason(missing, model.path.parent.parent)
            else:
                model.lazy[graph] = partial(load_unchanged, model, graph, spec, settings, policy)
            continue
        try:
            load_graph(model, graph, spec, settings, policy)
        except Exception as exc:
            if graph not in OPTIONAL_GRAPHS:
                raise
            model.failed_graphs[graph] = _reason(exc, model.path.parent.parent)  # the model serves without it
            log.error("model %s serves without its %s graph: %s", model.name, graph, model.failed_graphs[graph])


def load_version(version_dir: Path, settings: Settings, checks: ManifestChecks) -> ServedModel:
    """One version of a model, loaded and warmed up; "failed" with the reason where it cannot serve."""
    model_dir = version_dir.parent
    model = ServedModel(name=model_dir.name, path=version_dir, fingerprint=fingerprint(version_dir))
    model.version = int(version_dir.name) if version_dir.name.isdigit() else 0
    started = time.perf_counter()
    try:
        manifest = read_manifest(version_dir)
        if (manifest.name, str(manifest.version)) != (model_dir.name, version_dir.name):
            raise ValueError(
                f"manifest names {manifest.name}/{manifest.version}, the folder is {model_dir.name}/{version_dir.name}"
            )
        for task in manifest.tasks:
            if task not in checks:
                raise ValueError(f"task {task!r} is not one this service serves ({sorted(checks)})")
            checks[task](manifest)
        model.manifest = manifest
        model.executor = ThreadPoolExecutor(len(manifest.graphs), thread_name_prefix=f"infer-{model.name}")
        load_graphs(model, manifest, settings)
    except Exception as exc:  # any other failure takes down this version only
        model.reason = _reason(exc, model_dir.parent)
        model.close_now()
        log.error("model %s v%s failed to load: %s", model.name, version_dir.name, model.reason)
    else:
        model.state = "ready"
        log.info("model %s v%s (%s) ready on %s", model.name, manifest.version, manifest.task, model.providers)
    model.load_seconds = time.perf_counter() - started
    return model


def load_model(model_dir: Path, settings: Settings, checks: ManifestChecks) -> ServedModel:
    """The model's highest version (a model without one comes back "failed", saying so)."""
    try:
        return load_version(latest_version(model_dir), settings, checks)
    except (OSError, ValueError) as exc:
        return ServedModel(name=model_dir.name, path=model_dir, reason=_reason(exc, model_dir.parent))


def load_measured(version_dir: Path, settings: Settings, checks: ManifestChecks) -> ServedModel:
    """load_version, with what the process's resident memory grew by meanwhile (versions load one at
    a time: it is this version's sessions, weights and warm-up)."""
    before = resident_bytes()
    model = load_version(version_dir, settings, checks)
    after = resident_bytes()
    model.resident_bytes = max(0, after - before) if before is not None and after is not None else None
    return model


def _reason(exc: Exception, repository: Path) -> str:
    """One line saying why, with paths relative to the repository (readiness is open to anyone)."""
    if isinstance(exc, FileNotFoundError):
        text = [f"missing file: {exc.filename or exc}"]
    else:
        text = [f"{type(exc).__name__}:", *str(exc).strip().splitlines()]
    return " ".join(text)[:500].replace(f"{repository.resolve()}/", "").replace(f"{repository}/", "")


def mark_served(model: ServedModel) -> ServedModel:
    """Marks the current request as served by `model` (for its metrics and its answer's version
    header), and holds the model for the request until it ends (an unload waits for it)."""
    context.served_by(model.name, model.providers[0] if model.providers else "", model.version, model.lease)
    return model
