"""Prometheus metrics (prometheus-client), one registry per app, served at /metrics. The app's
lifespan wires them to the models and batchers it loaded; nothing here knows those types.

With several workers (`--workers N`) every process writes its values to files in one folder
(prometheus-client's multiprocess mode) and /metrics, whichever worker answers, adds them up:
counters and histograms sum, gauges say how (`multiprocess_mode`), and gauges read from a function
are sampled into their files instead (a function cannot be read across processes)."""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable, Iterator
from functools import lru_cache

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.metrics_core import Metric

MULTIPROCESS_DIR = "PROMETHEUS_MULTIPROC_DIR"  # set by service/workers.py before any worker starts

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
EXPOSITION_TYPE = CONTENT_TYPE_LATEST  # what /metrics answers with
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("vitserve_requests", "Requests answered, by route, model and status",
                                ["route", "model", "status"], registry=r)  # fmt: skip
        self.stage_seconds = Histogram("vitserve_stage_seconds", "Time per request stage (decode, preprocess, queue, "
                                       "inference, postprocess, encode, total)", ["stage", "model", "provider"],
                                       buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        by_version = ["model", "version"]
        self.batch_size = Histogram("vitserve_batch_size", "Images per inference run formed by the batcher",
                                    [*by_version, "graph"], buckets=BATCH_BUCKETS, registry=r)  # fmt: skip
        self.queue_images = Gauge("vitserve_queue_images", "Images waiting in a batcher's queue",
                                  [*by_version, "graph"], registry=r, multiprocess_mode="livesum")  # fmt: skip
        self.load_seconds = Gauge("vitserve_model_load_seconds", "Time to load and warm each model version",
                                  by_version, registry=r, multiprocess_mode="livemax")  # fmt: skip
        self.resident_bytes = Gauge("vitserve_model_resident_bytes", "Resident memory each model version took at "
                                    "load, summed over workers", by_version, registry=r,
                                    multiprocess_mode="livesum")  # fmt: skip
        self.model_ready = Gauge("vitserve_model_ready", "1 when a model version serves, 0 when it failed to load",
                                 by_version, registry=r, multiprocess_mode="livemin")  # fmt: skip
        self.label_cache = Counter("vitserve_label_cache_lookups", "Zero-shot label sets looked up in the cache of "
                                   "their text embeddings, by result (hit, miss)", ["result"], registry=r)  # fmt: skip
        self.rejected = Counter(
            "vitserve_rejected", "Requests refused, by reason (the error code)", ["reason"], registry=r
        )
        self.connections_closed = Counter(
            "vitserve_connections_closed", "Connections closed or refused to protect the others, by reason "
            "(header_timeout, headers_too_large, pipelined_too_deep, malformed, evicted, refused, dropped, ...)",
            ["reason"], registry=r,
        )  # fmt: skip
        self.connections_open = Gauge("vitserve_connections_open", "Connections open and counted against the cap",
                                      registry=r, multiprocess_mode="livesum")  # fmt: skip
        self.multiprocess = MULTIPROCESS_DIR in os.environ
        # gauges read from a function, in that mode: one function each (a version reloaded in place replaces its own)
        self.sampled: dict[Gauge, Callable[[], float]] = {}
        # (model, version) this process unloaded: with several workers, their series stay in its files
        # (prometheus-client cannot remove one there), so /metrics leaves them out
        self.retired: set[tuple[str, str]] = set()
        # labelled children are looked up once per label set, not once per request
        self._request_counter = lru_cache(maxsize=1024)(self.requests.labels)
        self._stage_histogram = lru_cache(maxsize=1024)(self.stage_seconds.labels)

    def exposition(self) -> tuple[bytes, str]:
        """Every metric in Prometheus' text format (of every worker, added up), and its content type."""
        if not self.multiprocess:
            return generate_latest(self.registry), CONTENT_TYPE_LATEST
        self.sample()
        every_worker = CollectorRegistry()
        every_worker.register(_Serving(multiprocess.MultiProcessCollector(None), self.retired))  # type: ignore[no-untyped-call]
        return generate_latest(every_worker), CONTENT_TYPE_LATEST

    def sample(self) -> None:
        """Writes the current value of each function-read gauge (multiprocess mode; the app calls it each second)."""
        for gauge, read in self.sampled.items():
            gauge.set(read())

    def _read_from(self, gauge: Gauge, read: Callable[[], float]) -> None:
        if self.multiprocess:
            self.sampled[gauge] = read
        else:
            gauge.set_function(read)

    def model_loaded(self, model: str, version: int, ready: bool, seconds: float, resident: int | None = None) -> None:
        labels = (model, str(version))
        self.retired.discard(labels)
        self.load_seconds.labels(*labels).set(seconds)
        if resident is not None:
            self.resident_bytes.labels(*labels).set(resident)
        self.model_ready.labels(*labels).set(1 if ready else 0)

    def model_unloaded(self, model: str, version: int, graphs: list[str]) -> None:
        """Its series gone, and the functions that read its queues dropped (they hold its batchers)."""
        labels = (model, str(version))
        self.retired.add(labels)
        for gauge in (self.load_seconds, self.resident_bytes, self.model_ready):
            _remove(gauge, labels)
        for graph in graphs:
            _remove(self.batch_size, (*labels, graph))
            self.sampled.pop(self.queue_images.labels(*labels, graph), None)
            _remove(self.queue_images, (*labels, graph))

    def track_batcher(
        self, model: str, version: int, graph: str, queued_images: Callable[[], float]
    ) -> Callable[[int], None]:
        """Reads the queue depth when scraped; returns what to call with each batch's size."""
        self._read_from(self.queue_images.labels(model, str(version), graph), queued_images)
        return self.batch_size.labels(model, str(version), graph).observe

    def label_cache_lookup(self, hit: bool) -> None:
        self.label_cache.labels("hit" if hit else "miss").inc()

    def track_connections(self, open_connections: Callable[[], float]) -> Callable[[str], None]:
        """Reads the open connections when scraped; returns what to call with each closure's reason."""
        self._read_from(self.connections_open, open_connections)
        return lambda reason: self.connections_closed.labels(reason).inc()

    def request_done(
        self, route: str, status: int, model: str, provider: str, timings: dict[str, float], total: float
    ) -> None:
        self._request_counter(route, model, str(status)).inc()
        if model:
            for stage, seconds in timings.items():
                self._stage_histogram(stage, model, provider).observe(seconds)
            self._stage_histogram("total", model, provider).observe(total)


def _remove(metric: Gauge | Histogram, labels: tuple[str, ...]) -> None:
    with contextlib.suppress(KeyError), warnings.catch_warnings():  # KeyError: never set
        warnings.simplefilter("ignore", UserWarning)  # several workers: "not implemented" (see Metrics.retired)
        metric.remove(*labels)


class _Serving:
    """Every worker's metrics, but for the series of the model versions this worker unloaded."""

    def __init__(self, every_worker: multiprocess.MultiProcessCollector, retired: set[tuple[str, str]]) -> None:
        self.every_worker, self.retired = every_worker, retired

    def collect(self) -> Iterator[Metric]:
        for metric in self.every_worker.collect():  # type: ignore[no-untyped-call]
            metric.samples = [s for s in metric.samples if (s.labels.get("model"), s.labels.get("version"))
                              not in self.retired]  # fmt: skip
            yield metric


def worker_gone(pid: int) -> None:
    """Drops a dead worker's live gauges (its counters and histograms still count)."""
    if MULTIPROCESS_DIR in os.environ:
        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]
