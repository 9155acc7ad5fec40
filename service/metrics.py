"""Prometheus metrics (prometheus-client), one registry per app, served at /metrics."""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

if TYPE_CHECKING:
    from service.repository import ModelRegistry

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
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
        self.batch_size = Histogram("vitserve_batch_size", "Images per inference run formed by the batcher",
                                    ["model", "graph"], buckets=BATCH_BUCKETS, registry=r)  # fmt: skip
        self.queue_images = Gauge("vitserve_queue_images", "Images waiting in a batcher's queue", ["model", "graph"],
                                  registry=r)  # fmt: skip
        self.load_seconds = Gauge(
            "vitserve_model_load_seconds", "Time to load and warm each model", ["model"], registry=r
        )
        self.model_ready = Gauge("vitserve_model_ready", "1 when a model serves, 0 when it failed to load", ["model"],
                                 registry=r)  # fmt: skip
        self.rejected = Counter(
            "vitserve_rejected", "Requests refused, by reason (the error code)", ["reason"], registry=r
        )

    def watch(self, registry: ModelRegistry) -> None:
        """Model load time and readiness; each batcher's queue depth and batch sizes."""
        for model in registry.models.values():
            self.load_seconds.labels(model.name).set(model.load_seconds)
            self.model_ready.labels(model.name).set(1 if model.state == "ready" else 0)
            for graph, batcher in model.batchers.items():
                self.queue_images.labels(model.name, graph).set_function(partial(getattr, batcher, "queued_images"))
                batcher.on_run = self.batch_size.labels(model.name, graph).observe
