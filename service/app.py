"""The FastAPI application: routes, error handling, and model loading in the lifespan."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import TYPE_CHECKING

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware

from service import __version__, tracing
from service.auth import ApiKeyMiddleware
from service.batching import Batcher
from service.budget import ImageLimits
from service.codec import HEADER_LENGTH
from service.error_responses import install_error_handlers
from service.http_limits import BodyLimitMiddleware, BodyTimeoutMiddleware, RateLimitMiddleware, TimeoutMiddleware
from service.memory import give_back_big_blocks
from service.metrics import Metrics
from service.observe import ObservingMiddleware
from service.ratelimit import limiter_for
from service.registry import ModelRegistry
from service.repository import ServedModel
from service.routes import control, health, models, page, v2
from service.routes.v1 import task_router
from service.runtime import check_device
from service.settings import Settings, get_settings
from service.tasks import TASKS, manifest_checks
from service.tasks.base import Task
from service.tasks.embed import SHAPE_HEADER
from service.text_tower import LABEL_CACHE

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

log = logging.getLogger("service")

DESCRIPTION = """
Vision transformers served over ONNX Runtime: classification (ViT), detection (DETR), generation
(Image Transformer), and the attention maps of all three; the Open Inference Protocol under `/v2`.

Images go in as multipart `file` fields (repeatable), as a raw `image/*` body, or as JSON
`{"images": ["<base64>", ...]}`. Errors are JSON: `{"error": {"code", "message"}}`.
"""

# what a page on an allowed origin may send (besides the headers any page may) and read
CORS_METHODS = ("GET", "POST")
# and the headers of binary tensors: /v2's JSON header length (both ways), /v1/embed's shape
CORS_HEADERS = ("Authorization", "X-API-Key", "Content-Type", "X-Request-ID", HEADER_LENGTH)
CORS_EXPOSED = ("X-Request-ID", "Server-Timing", "X-Model-Version", "Retry-After", SHAPE_HEADER, HEADER_LENGTH)


def create_app(
    settings: Settings | None = None,
    tasks: dict[str, Task] | None = None,
    tracer_provider: TracerProvider | None = None,
) -> FastAPI:
    """The app serving `tasks` (default: every task in service.tasks.TASKS). Traced (service/tracing.py)
    through `tracer_provider` where given, else where the environment names an OTLP endpoint."""
    settings = settings or get_settings()
    tasks = TASKS if tasks is None else tasks
    give_back_big_blocks()  # else each decoding thread keeps its peak of image memory

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        tracing.start(tracer_provider)  # before the first request: on or off for the process's life
        # a GPU provider that cannot run: served without (logged), or no start
        app.state.settings = serving = check_device(settings)
        # loading blocks startup: the server accepts no request before every model is loaded and warm
        app.state.registry = registry = ModelRegistry(serving, manifest_checks(tasks))
        watch(registry, metrics)
        LABEL_CACHE.max_bytes, LABEL_CACHE.on_lookup = serving.label_cache_bytes, metrics.label_cache_lookup
        await registry.start()
        # what was loaded lives as long as the process: out of the collector's sight, full
        # collections under load stay short
        gc.collect()
        gc.freeze()
        if not app.state.registry.ready:
            log.warning("not every model is ready: see GET /health/ready")
        # with several workers, gauges read from functions are written out each second
        sampling = asyncio.create_task(_sample(metrics)) if metrics.multiprocess else None
        polling = None
        if serving.model_control_mode == "poll":
            polling = asyncio.create_task(registry.watch(serving.repository_poll_secs))
        yield
        for task in (sampling, polling):
            if task is not None:
                task.cancel()
        await registry.close()
        tracing.stop()  # the spans still queued sent

    # no trailing-slash redirects: Starlette's name the client's Host (and X-Forwarded-Proto) as their
    # target, which a shared cache in front would keep and serve to others; /v1/models/ is a 404
    # FastAPI's own request spans off: the service's (service/tracing.py) carry the same HTTP attributes, and the
    # stages under them; one server span a request, for REST as for gRPC
    app = FastAPI(title="vitserve", version=__version__, description=DESCRIPTION, lifespan=lifespan,
                  redirect_slashes=False, telemetry={"tracing": False})  # fmt: skip
    app.state.settings = settings
    app.state.tasks = tasks
    app.state.draining = False  # set on SIGTERM (service/server.py): readiness answers 503
    app.state.metrics = metrics = Metrics()
    app.state.registry = ModelRegistry(settings)
    app.state.image_limits = ImageLimits.of(settings)
    install_error_handlers(app)
    app.add_middleware(TimeoutMiddleware, seconds=settings.request_timeout_s, metrics=metrics)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes, metrics=metrics)
    app.add_middleware(BodyTimeoutMiddleware, seconds=settings.body_timeout_s)
    # one limiter for REST and gRPC (service/grpc_server.py reads it here); inside the key check: a
    # request without the key is refused before it spends a token
    app.state.rate_limiter = limiter = limiter_for(settings)
    if limiter is not None:
        app.add_middleware(RateLimitMiddleware, limiter=limiter, metrics=metrics)
    if settings.api_key is not None or settings.control_api_key is not None:
        key, control_key = (k.get_secret_value() if k else None for k in (settings.api_key, settings.control_api_key))
        app.add_middleware(ApiKeyMiddleware, key=key, protect_health=settings.auth_health, metrics=metrics,
                           control_key=control_key)  # fmt: skip
    if settings.cors_origins:  # outside the key check: a browser's preflight carries no key
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=CORS_METHODS,
                           allow_headers=CORS_HEADERS, expose_headers=CORS_EXPOSED)  # fmt: skip
    app.add_middleware(ObservingMiddleware, metrics=metrics)
    for task in tasks.values():  # first: routes are matched in order, and these carry the load
        app.include_router(task_router(task))
    app.include_router(health.router)
    app.include_router(models.router)
    app.include_router(v2.router)
    app.include_router(control.router)
    app.include_router(page.router)
    return app


async def _sample(metrics: Metrics) -> None:
    while True:
        metrics.sample()
        await asyncio.sleep(1.0)


def watch(registry: ModelRegistry, metrics: Metrics) -> None:
    """Wires the metrics to each model version the registry loads (its load time, memory and
    readiness, each batcher's queue depth and batch sizes), and unwires them when it unloads it."""

    def track(model: ServedModel, graph: str, batcher: Batcher) -> None:
        queued = partial(getattr, batcher, "queued_images")
        batcher.on_run = metrics.track_batcher(model.name, model.version, graph, queued)

    def loaded(model: ServedModel) -> None:
        metrics.model_loaded(model.name, model.version, model.state == "ready", model.load_seconds,
                             model.resident_bytes)  # fmt: skip
        for graph, batcher in model.batchers.items():
            track(model, graph, batcher)
        model.on_batcher = partial(track, model)  # a graph loaded on its first request

    registry.on_loaded = loaded
    registry.on_unloaded = lambda model: metrics.model_unloaded(model.name, model.version, list(model.batchers))
