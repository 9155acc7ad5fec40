"""OpenTelemetry tracing (service/tracing.py) through the real app and the shipped ViT, its spans caught by
the SDK's in-memory exporter: one trace a request with its stages under it, one span a batch run linked to
each request in it, the client's traceparent as the parent, REST and gRPC alike; off, nothing at all."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from service import batching, tracing
from service.app import create_app
from service.grpc_proto import grpc_predict_v2_pb2 as pb
from service.grpc_server import InferenceService
from service.manifest import BatchPolicy
from service.settings import PROJECT_ROOT, Settings
from tests.conftest import SHIPPED_REPOSITORY, copy_repository

DIGIT = (PROJECT_ROOT / "examples" / "digit-3.png").read_bytes()
CONCURRENT = 4  # requests that share one batch run
STAGES = {"decode", "preprocess", "queue", "inference", "postprocess", "encode"}
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return copy_repository(SHIPPED_REPOSITORY / "vit", tmp_path_factory.mktemp("traced") / "vit").parent


@pytest.fixture(scope="module")
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture(scope="module")
def client(repository: Path, exporter: InMemorySpanExporter) -> Iterator[TestClient]:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    settings = Settings(model_repository=repository, device="cpu", grpc_port=0)
    with TestClient(create_app(settings, tracer_provider=provider)) as client:
        yield client
    assert not tracing.on  # the lifespan's end turned it off


@pytest.fixture
def spans(exporter: InMemorySpanExporter) -> Iterator[InMemorySpanExporter]:
    exporter.clear()
    yield exporter


def by_trace(spans: tuple[ReadableSpan, ...], trace_id: int) -> list[ReadableSpan]:
    return [s for s in spans if s.context is not None and s.context.trace_id == trace_id]


def server_span(spans: tuple[ReadableSpan, ...]) -> ReadableSpan:
    (found,) = [s for s in spans if s.kind == SpanKind.SERVER]
    return found


def children(spans: list[ReadableSpan], parent: ReadableSpan) -> list[ReadableSpan]:
    assert parent.context is not None
    return [s for s in spans if s.parent is not None and s.parent.span_id == parent.context.span_id]


def classify(client: TestClient, headers: dict[str, str] | None = None) -> Any:
    response = client.post("/v1/classify", content=DIGIT, headers={"content-type": "image/png", **(headers or {})})
    assert response.status_code == 200, response.text
    return response


def test_a_request_is_one_trace_with_its_stages_under_it(client: TestClient, spans: InMemorySpanExporter) -> None:
    response = classify(client, {"x-request-id": "traced-1"})
    finished = spans.get_finished_spans()
    root = server_span(finished)
    assert root.context is not None and root.parent is None
    assert root.name == "POST /v1/classify"
    assert root.attributes is not None
    assert {k: root.attributes[k] for k in ("http.request.method", "http.route", "http.response.status_code")} == {
        "http.request.method": "POST", "http.route": "/v1/classify", "http.response.status_code": 200,
    }  # fmt: skip
    assert root.attributes["vitserve.request_id"] == "traced-1"
    assert root.attributes["vitserve.model"] == "vit" and root.attributes["vitserve.model.version"] == 1
    assert root.attributes["vitserve.provider"] == "CPUExecutionProvider"
    trace = by_trace(finished, root.context.trace_id)
    stages = children(trace, root)
    assert {s.name for s in stages} == STAGES and len(trace) == 1 + len(stages)  # nothing else in the trace
    for stage in stages:  # each within its request, in the order they ran
        assert root.start_time is not None and root.end_time is not None
        assert stage.start_time is not None and stage.end_time is not None
        assert root.start_time <= stage.start_time <= stage.end_time <= root.end_time
    order = [s.name for s in sorted(stages, key=lambda s: (s.start_time or 0, s.end_time or 0))]
    assert order.index("decode") < order.index("preprocess") < order.index("inference") < order.index("postprocess")
    # the answer names the request's span; its inference links to the batch run, a trace of its own
    assert response.headers["traceparent"].startswith(f"00-{root.context.trace_id:032x}-{root.context.span_id:016x}-")
    (inference,) = [s for s in stages if s.name == "inference"]
    (batch,) = [s for s in finished if s.name == "batch vit/main"]
    assert batch.context is not None and [link.context for link in inference.links] == [batch.context]
    assert [link.context for link in batch.links] == [root.context] and batch.attributes is not None
    assert batch.attributes["vitserve.batch.size"] == 1 and batch.attributes["vitserve.model"] == "vit"


def test_concurrent_requests_share_one_batch_span_linked_to_each(
    client: TestClient, spans: InMemorySpanExporter, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the batch runs once CONCURRENT images are in (or after 10 s), none alone on the event loop: requests
    # sent together share it
    batcher = client.app.state.registry.named("vit").batchers["main"]  # type: ignore[attr-defined]
    monkeypatch.setattr(batcher, "policy", BatchPolicy(max_batch_size=CONCURRENT, max_queue_delay_ms=10_000))
    monkeypatch.setattr(batching, "INLINE_RUN_S", 0.0)
    with ThreadPoolExecutor(CONCURRENT) as pool:
        list(pool.map(lambda _: classify(client), range(CONCURRENT)))
    finished = spans.get_finished_spans()
    roots = [s for s in finished if s.kind == SpanKind.SERVER]
    (batch,) = [s for s in finished if s.name == "batch vit/main"]
    assert len(roots) == CONCURRENT and len({r.context.trace_id for r in roots if r.context}) == CONCURRENT
    assert sorted(link.context.span_id for link in batch.links) == sorted(r.context.span_id for r in roots if r.context)
    assert batch.attributes is not None and batch.attributes["vitserve.batch.size"] == CONCURRENT
    assert batch.parent is None and batch.context is not None
    for root in roots:  # each request's own inference span, linked to the run it shared, timed as it
        assert root.context is not None
        (inference,) = [s for s in children(by_trace(finished, root.context.trace_id), root) if s.name == "inference"]
        assert [link.context for link in inference.links] == [batch.context]
        assert (inference.start_time, inference.end_time) == (batch.start_time, batch.end_time)


def test_the_clients_traceparent_is_the_parent(client: TestClient, spans: InMemorySpanExporter) -> None:
    classify(client, {"traceparent": PARENT})
    root = server_span(spans.get_finished_spans())
    assert root.context is not None and root.parent is not None
    assert f"{root.context.trace_id:032x}" == TRACE_ID and root.parent.span_id == 0x00F067AA0BA902B7
    assert root.parent.is_remote


def test_errors_and_unmatched_routes_are_spans_too(client: TestClient, spans: InMemorySpanExporter) -> None:
    assert client.post("/v1/classify", content=b"not an image", headers={"content-type": "image/png"}).status_code
    assert client.get("/nowhere").status_code == 404
    first, second = sorted((s for s in spans.get_finished_spans() if s.kind == SpanKind.SERVER),
                           key=lambda s: s.start_time or 0)  # fmt: skip
    assert first.name == "POST /v1/classify" and first.attributes is not None
    assert first.attributes["http.response.status_code"] in (415, 422)
    assert second.name == "GET" and second.attributes is not None and "http.route" not in second.attributes


class Call:
    """What grpc.aio gives a handler, as much of it as InferenceService.call reads."""

    def __init__(self, metadata: list[tuple[str, str]]) -> None:
        self.metadata = metadata

    def invocation_metadata(self) -> list[tuple[str, str]]:
        return self.metadata

    async def abort(self, code: Any, message: str) -> None:
        raise AssertionError(f"aborted: {code} {message}")


def test_a_grpc_call_is_traced_the_same(client: TestClient, spans: InMemorySpanExporter) -> None:
    """Through the gRPC adapter's own call path (InferenceService.call), in the app's event loop."""
    service = InferenceService(client.app.state, client.app.state.settings)  # type: ignore[attr-defined]
    image = pb.ModelInferRequest.InferInputTensor(name="image", datatype="BYTES", shape=[1])
    request = pb.ModelInferRequest(model_name="vit_image", inputs=[image],
                                   raw_input_contents=[struct.pack("<I", len(DIGIT)) + DIGIT])  # fmt: skip
    method = "/inference.GRPCInferenceService/ModelInfer"
    call = Call([("traceparent", PARENT), ("x-request-id", "grpc-1")])
    assert client.portal is not None
    answer = client.portal.call(service.call, method, "api", service.model_infer, request, call)
    assert answer.model_name == "vit_image"
    finished = spans.get_finished_spans()
    root = server_span(finished)
    assert root.name == "inference.GRPCInferenceService/ModelInfer" and root.attributes is not None
    assert root.attributes["rpc.system"] == "grpc" and root.attributes["rpc.grpc.status_code"] == 0
    assert root.attributes["vitserve.request_id"] == "grpc-1" and root.attributes["vitserve.model"] == "vit"
    assert root.context is not None and f"{root.context.trace_id:032x}" == TRACE_ID
    stages = {s.name for s in children(by_trace(finished, root.context.trace_id), root)}
    assert {"decode", "preprocess", "queue", "inference"} <= stages
    assert any(s.name == "batch vit/main" for s in finished)


OFF = """
import json
import sys
from fastapi.testclient import TestClient
from opentelemetry import trace
from service import batching, tracing
from service.app import create_app
from service.settings import Settings

settings = Settings(model_repository=sys.argv[1], device="cpu", grpc_port=0)
with TestClient(create_app(settings)) as client:
    image = open(sys.argv[2], "rb").read()
    response = client.post("/v1/classify", content=image, headers={"content-type": "image/png"})
    print(json.dumps({"status": response.status_code, "traceparent": response.headers.get("traceparent"),
                      "on": tracing.on, "provider": type(trace.get_tracer_provider()).__name__,
                      "sdk": sorted(m for m in sys.modules if m.startswith("opentelemetry.sdk"))}))
"""


def test_off_by_default_nothing_is_traced_nor_imported(repository: Path) -> None:
    """In a process of its own, with no OTEL_* variable: no provider, no span, no SDK import."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    command = [sys.executable, "-c", OFF, str(repository), str(PROJECT_ROOT / "examples" / "digit-3.png")]
    out = subprocess.run(command, env=env, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120, check=True)
    found = json.loads(out.stdout.strip().splitlines()[-1])
    assert found == {"status": 200, "traceparent": None, "on": False, "provider": "ProxyTracerProvider", "sdk": []}


def test_the_environment_chooses_the_exporter(monkeypatch: pytest.MonkeyPatch) -> None:
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as Grpc
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as Http

    assert not tracing.wanted({}) and not tracing.wanted({"OTEL_EXPORTER_OTLP_ENDPOINT": " "})
    assert tracing.wanted({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"})
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318")
    assert isinstance(tracing.otlp_exporter({}), Grpc)  # the SDK's default
    assert isinstance(tracing.otlp_exporter({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}), Http)
    traces_first = {"OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "grpc"}
    assert isinstance(tracing.otlp_exporter(traces_first), Grpc)
    with pytest.raises(ValueError, match="http/json"):
        tracing.otlp_exporter({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"})
    monkeypatch.setenv("OTEL_SERVICE_NAME", "digits")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "traceidratio")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "0.25")
    provider = tracing.from_environment()  # what the SDK read itself
    try:
        assert provider.resource.attributes["service.name"] == "digits"
        assert "0.25" in provider.sampler.get_description()
    finally:
        provider.shutdown()
    monkeypatch.delenv("OTEL_SERVICE_NAME")
    provider = tracing.from_environment()
    try:
        assert provider.resource.attributes["service.name"] == "vitserve"
    finally:
        provider.shutdown()
