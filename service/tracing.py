"""OpenTelemetry tracing: one server span per request (REST and gRPC), a child span for each stage the
request context timed (decode, preprocess, queue, inference, postprocess, encode), and one span per
batch run, linked to the span of every request that shared it (and each request's inference span
linked back to it).

Off unless `OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set: then the
OpenTelemetry SDK is configured from the standard variables, each read by the SDK piece that owns it
(the exporter: endpoint, headers, timeout, compression, certificates; the tracer provider: the sampler,
`OTEL_TRACES_SAMPLER` and `_ARG`, and `OTEL_SDK_DISABLED`; the batch span processor: `OTEL_BSP_*`; the
resource: `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`); only the choice of exporter by
`OTEL_EXPORTER_OTLP_(TRACES_)PROTOCOL` (grpc, the SDK's default, or http/protobuf) is made here, as the
SDK's own auto-configuration makes it. Off, nothing here runs on a request and nothing of the SDK is
imported: the hooks look at `on`, or at a request's `trace` (None).

Spans are made from what the request context records (each stage's start and end), when the request
ends, rather than opened and closed around each stage: the stages stay where they are, timed once."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from service import __version__
from service.context import RequestContext

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Span, SpanContext, Tracer

log = logging.getLogger("service")

ENDPOINTS = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")  # either turns tracing on
SERVICE_NAME = "vitserve"  # the resource's service.name unless OTEL_SERVICE_NAME or OTEL_RESOURCE_ATTRIBUTES name one

on = False  # read on every request: while False, no hook does anything
_tracer: Tracer | None = None
_owned: TracerProvider | None = None  # a provider made here from the environment: shut down (flushed) at stop


@dataclass(slots=True)
class _Trace:
    """A request's span, and how its stages' times (time.perf_counter()) become the span's (ns since the epoch)."""

    span: Span
    offset_ns: int

    def ns(self, instant: float) -> int:
        return self.offset_ns + round(instant * 1e9)


ANCHOR_S = 60.0  # how long one reading of the two clocks side by side serves
_anchor = (float("-inf"), 0)  # (perf_counter then, epoch ns minus perf_counter ns)


def _offset_ns() -> int:
    """Epoch ns minus perf_counter ns, read afresh each minute (the wall clock may be stepped or slewed): one
    reading for all the spans of that minute, so a batch run's span and its requests' inference spans agree."""
    global _anchor
    now = time.perf_counter()
    if now - _anchor[0] > ANCHOR_S:
        _anchor = (now, time.time_ns() - round(now * 1e9))
    return _anchor[1]


def wanted(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether the environment asks for traces: an OTLP endpoint is set."""
    return any(environ.get(name, "").strip() for name in ENDPOINTS)


def start(provider: TracerProvider | None = None) -> bool:
    """Turns tracing on, through `provider` (a test's, with an in-memory exporter) or, where the environment
    names an OTLP endpoint, a provider configured from it (also made the process's global one). Idempotent:
    True if tracing is on."""
    global on, _tracer, _owned
    if on:
        return True
    if provider is None:
        if not wanted():
            return False
        from opentelemetry import trace

        provider = _owned = from_environment()
        trace.set_tracer_provider(provider)
    from opentelemetry.trace import NoOpTracer

    tracer = provider.get_tracer("vitserve", __version__)
    if isinstance(tracer, NoOpTracer):  # OTEL_SDK_DISABLED=true
        return False
    _tracer, on = tracer, True
    return True


def stop() -> None:
    """Turns tracing off; a provider made here is shut down, its spans still queued exported first."""
    global on, _tracer, _owned
    on, _tracer = False, None
    owned, _owned = _owned, None
    if owned is not None:
        owned.shutdown()


def from_environment() -> TracerProvider:
    """A tracer provider as the standard OTEL_* variables describe it, exporting by OTLP in batches."""
    from opentelemetry.sdk.resources import SERVICE_NAME as NAME
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create()  # OTEL_RESOURCE_ATTRIBUTES, OTEL_SERVICE_NAME; else "unknown_service..."
    if str(resource.attributes.get(NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({NAME: SERVICE_NAME}))
    provider = TracerProvider(resource=resource)  # the sampler from OTEL_TRACES_SAMPLER (and _ARG)
    exporter = otlp_exporter()
    provider.add_span_processor(BatchSpanProcessor(exporter))  # OTEL_BSP_*
    log.info("tracing: spans go to %s by OTLP (%s)", getattr(exporter, "_endpoint", "?"), type(exporter).__module__)
    return provider


def otlp_exporter(environ: Mapping[str, str] = os.environ) -> SpanExporter:
    """The OTLP span exporter of the protocol asked for (OTEL_EXPORTER_OTLP_TRACES_PROTOCOL, else
    OTEL_EXPORTER_OTLP_PROTOCOL; grpc where neither is set, as the SDK's auto-configuration does), which
    reads its endpoint and the rest from the environment itself."""
    from opentelemetry.sdk.environment_variables import OTEL_EXPORTER_OTLP_PROTOCOL, OTEL_EXPORTER_OTLP_TRACES_PROTOCOL

    protocol = (
        environ.get(OTEL_EXPORTER_OTLP_TRACES_PROTOCOL) or environ.get(OTEL_EXPORTER_OTLP_PROTOCOL) or "grpc"
    ).strip()
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as Grpc

        return Grpc()
    if protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as Http

        return Http()
    raise ValueError(f"OTLP protocol {protocol!r} is not supported for traces: grpc or http/protobuf")


# the hooks: each called only where `on` (begin_*) or the request has a trace (the rest) ----------------------


def begin_http(request: RequestContext, scope: Mapping[str, Any]) -> None:
    """Opens the request's server span, a child of the client's `traceparent` where it sent one."""
    headers = {name.decode("latin-1"): value.decode("latin-1") for name, value in scope["headers"]}
    attributes = {"http.request.method": scope["method"], "url.path": scope["path"],
                  "url.scheme": scope.get("scheme", "http"),
                  "network.protocol.version": scope.get("http_version", "1.1")}  # fmt: skip
    if client := scope.get("client"):
        attributes["client.address"] = client[0]
    _begin(request, scope["method"], headers, attributes)  # named "{method} {route}" once routed


def begin_rpc(request: RequestContext, method: str, metadata: Mapping[str, str | bytes]) -> None:
    """Opens a gRPC call's server span (named as gRPC's conventions say: service/method)."""
    service, _, name = method.strip("/").rpartition("/")
    carrier = {key: value for key, value in metadata.items() if isinstance(value, str)}
    _begin(request, f"{service}/{name}", carrier, {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name})


def _begin(request: RequestContext, name: str, carrier: dict[str, str], attributes: dict[str, Any]) -> None:
    from opentelemetry import propagate
    from opentelemetry.trace import SpanKind

    assert _tracer is not None
    offset_ns = _offset_ns()
    attributes["vitserve.request_id"] = request.request_id
    started = offset_ns + round(time.perf_counter() * 1e9)
    span = _tracer.start_span(name, propagate.extract(carrier), SpanKind.SERVER, attributes, start_time=started)
    request.trace, request.stages = _Trace(span, offset_ns), []


def traceparent(request: RequestContext) -> bytes:
    """The W3C traceparent naming the request's span, for its answer's headers."""
    from opentelemetry.trace import set_span_in_context
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    assert isinstance(request.trace, _Trace)
    carrier: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(carrier, set_span_in_context(request.trace.span))
    return carrier.get("traceparent", "").encode()


def end_http(request: RequestContext, method: str, route: str | None, status: int) -> None:
    attributes: dict[str, Any] = {"http.response.status_code": status}
    if route is not None:
        attributes["http.route"] = route
    _end(request, attributes, f"{method} {route}" if route is not None else None, status >= 500)


def end_rpc(request: RequestContext, code: int, status: int) -> None:
    """`code`: the gRPC status code's number; `status`: the HTTP status REST would have answered."""
    _end(request, {"rpc.grpc.status_code": code}, None, status >= 500)


def _end(request: RequestContext, attributes: dict[str, Any], name: str | None, failed: bool) -> None:
    """The request's stage spans, made from its recorded stages, then its own span ended."""
    from opentelemetry.trace import Link, SpanContext, StatusCode, set_span_in_context

    trace, stages = request.trace, request.stages or []
    assert isinstance(trace, _Trace) and _tracer is not None
    request.trace, request.stages = None, None
    span = trace.span
    if name is not None:
        span.update_name(name)
    span.set_attributes({**attributes, **_served(request)})
    if failed:
        span.set_status(StatusCode.ERROR)
    parent = set_span_in_context(span)
    for stage, began, ended, link in stages:
        links = [Link(link)] if isinstance(link, SpanContext) else None
        child = _tracer.start_span(stage, parent, links=links, start_time=trace.ns(began))
        child.end(end_time=trace.ns(ended))
    span.end(end_time=trace.ns(time.perf_counter()))


def _served(request: RequestContext) -> dict[str, Any]:
    """Which model answered (where one did)."""
    if not request.model:
        return {}
    return {"vitserve.model": request.model, "vitserve.model.version": request.version,
            "vitserve.provider": request.provider}  # fmt: skip


def batch_run(
    name: str, requests: Iterable[RequestContext | None], started: float, ended: float, images: int,
    error: BaseException | None = None,
) -> SpanContext | None:  # fmt: skip
    """The span of one batch run of batcher `name` (model/graph), linked to the span of each traced request
    in it; its context, for each request's inference span to link back to. None where no request in it is
    traced (or sampled)."""
    from opentelemetry.trace import Link, SpanKind, StatusCode

    traced = [r for r in requests if r is not None and isinstance(r.trace, _Trace) and r.trace.span.is_recording()]
    if not traced or _tracer is None:
        return None
    first, offset_ns = traced[0], _offset_ns()
    attributes = {"vitserve.batcher": name, "vitserve.batch.size": images, "vitserve.batch.requests": len(traced),
                  **_served(first)}  # fmt: skip
    links = [Link(r.trace.span.get_span_context()) for r in traced if isinstance(r.trace, _Trace)]
    span = _tracer.start_span(f"batch {name}", kind=SpanKind.INTERNAL, attributes=attributes, links=links,
                              start_time=offset_ns + round(started * 1e9))  # fmt: skip
    if error is not None:
        span.record_exception(error)
        span.set_status(StatusCode.ERROR, type(error).__name__)
    span.end(end_time=offset_ns + round(ended * 1e9))
    return span.get_span_context()
