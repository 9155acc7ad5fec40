"""The Open Inference Protocol over gRPC: KServe's `inference.GRPCInferenceService` (as Triton serves it,
service/grpc_proto/grpc_predict_v2.proto) and the standard `grpc.health.v1.Health`, on their own port
(`grpc_port`, 8001 as Triton's; 0: off), served by `grpc.aio` in the process and event loop of the
HTTP app, after its lifespan has loaded the models (service/server.py starts and stops it).

A thin adapter, as service/routes/v2.py is for REST: the messages become `codec.InferRequest`s
(service/grpc_codec.py), and everything else is the shared core's (service/protocol.py): the same
models and views, the same batchers, image limits and checks, the same repository calls. Around
each call, what the HTTP middleware does for REST: the request context (id, model, stage timings),
its span where tracing is on (service/tracing.py; parent: the metadata's `traceparent`), the API keys
(metadata `authorization: Bearer <key>` or `x-api-key`; health open unless `auth_health`; the
repository calls behind the control key), the answer's time limit (`request_timeout_s`), the
per-client rate limit (the app's one limiter, service/ratelimit.py: its key, else its peer's
address; health exempt; RESOURCE_EXHAUSTED with trailing metadata `retry-after`), one access-log
line and the request metrics (route: the gRPC method's path; status: the HTTP status REST would
answer). Message size: `max_body_bytes`, enforced by gRPC itself
(RESOURCE_EXHAUSTED). Errors: a `ServiceError`'s status becomes the nearest gRPC code (STATUS_CODES);
a malformed request is INVALID_ARGUMENT; a failure of the server's own is INTERNAL, logged."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import unquote

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2

from service import context, protocol, tracing
from service.auth import authorized, carried
from service.codec import CodecError
from service.errors import ServiceError
from service.grpc_codec import encode_response, parse_request, repository_parameters, tensor_metadata
from service.grpc_proto import grpc_predict_v2_pb2 as pb
from service.observe import request_id_from
from service.pipeline import INLINE_BYTES
from service.ratelimit import RateLimiter
from service.settings import Settings

log = logging.getLogger("service")
access_log = logging.getLogger("service.access")

SERVICE = "inference.GRPCInferenceService"
HEALTH = "grpc.health.v1.Health"
Guard = Literal["health", "api", "control"]  # which key a call needs, as REST's routes of the same kind

# a ServiceError's HTTP status -> the gRPC code that says the same; other 4xx: INVALID_ARGUMENT, 5xx: INTERNAL
STATUS_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    408: grpc.StatusCode.DEADLINE_EXCEEDED,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}
EXHAUSTED = {"overloaded"}  # a 503 that means a full queue: RESOURCE_EXHAUSTED, as Triton answers it
WATCH_EVERY_S = 1.0  # how often a health Watch looks at readiness


def grpc_code(error: ServiceError) -> grpc.StatusCode:
    if error.code in EXHAUSTED:
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if error.status in STATUS_CODES:
        return STATUS_CODES[error.status]
    return grpc.StatusCode.INVALID_ARGUMENT if 400 <= error.status < 500 else grpc.StatusCode.INTERNAL


@dataclass
class Answer(Exception):
    """An RPC's failure as the client hears it, and the HTTP status its metrics count."""

    code: grpc.StatusCode
    message: str
    status: int
    trailers: tuple[tuple[str, str], ...] = ()


class Unauthorized(ServiceError):
    def __init__(self) -> None:
        super().__init__(401, "unauthorized", "this call needs the API key (metadata authorization: Bearer <key>)")


class InferenceService:
    """The RPCs, over the app's state (its `registry`, `tasks`, `settings`, `image_limits`,
    `metrics` and `draining`, read at each call: the lifespan sets them)."""

    def __init__(self, state: Any, settings: Settings) -> None:
        self.state = state
        secret = (settings.api_key, settings.control_api_key)
        key, control = (k.get_secret_value().encode() if k is not None else None for k in secret)
        self.keys: dict[Guard, bytes | None] = {
            "health": key if settings.auth_health else None,
            "api": key,
            "control": control if control is not None else key,
        }
        self.timeout_s = settings.request_timeout_s
        self.limiter: RateLimiter | None = getattr(state, "rate_limiter", None)

    # the calls ----------------------------------------------------------------------------------

    async def server_live(self, _: pb.ServerLiveRequest) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def server_ready(self, _: pb.ServerReadyRequest) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self._ready())

    def _ready(self) -> bool:
        return protocol.server_ready(self.state.registry, self.state.draining)

    async def model_ready(self, request: pb.ModelReadyRequest) -> pb.ModelReadyResponse:
        """Ready, or not: loading, failed, unloaded or unknown (as Triton answers it over gRPC; REST's 404)."""
        try:
            protocol.protocol_model(self.state.registry, self.state.tasks, request.name, request.version or None)
        except ServiceError as exc:
            if exc.status in (404, 503):
                return pb.ModelReadyResponse(ready=False)
            raise
        return pb.ModelReadyResponse(ready=True)

    async def server_metadata(self, _: pb.ServerMetadataRequest) -> pb.ServerMetadataResponse:
        found = protocol.server_metadata(self.state.registry, self.state.tasks)
        return pb.ServerMetadataResponse(name=found["name"], version=found["version"], extensions=found["extensions"])

    async def model_metadata(self, request: pb.ModelMetadataRequest) -> pb.ModelMetadataResponse:
        view = protocol.protocol_model(self.state.registry, self.state.tasks, request.name, request.version or None)
        found = view.metadata()
        return pb.ModelMetadataResponse(name=found["name"], versions=found["versions"], platform=found["platform"],
                                        inputs=tensor_metadata(found["inputs"]),
                                        outputs=tensor_metadata(found["outputs"]))  # fmt: skip

    async def model_infer(self, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
        registry = self.state.registry
        view = protocol.protocol_model(registry, self.state.tasks, request.model_name, request.model_version or None)
        big = sum(map(len, request.raw_input_contents)) > INLINE_BYTES  # parse, check, encode off the loop
        parsed = await protocol.off_loop(big, parse_request, request)
        settings, limits = self.state.settings, self.state.image_limits
        outputs = await protocol.infer(registry, view, parsed, settings, limits, big)
        encode = (encode_response, view.name, str(view.manifest.version), parsed, outputs)
        return await protocol.off_loop(protocol.outputs_big(outputs), *encode)

    async def repository_index(self, request: pb.RepositoryIndexRequest) -> pb.RepositoryIndexResponse:
        rows = protocol.repository_index(self.state.registry, request.ready)
        models = [pb.RepositoryIndexResponse.ModelIndex(name=r["name"], version=r["version"], state=r["state"],
                                                        reason=r["reason"]) for r in rows]  # fmt: skip
        return pb.RepositoryIndexResponse(models=models)

    async def repository_load(self, request: pb.RepositoryModelLoadRequest) -> pb.RepositoryModelLoadResponse:
        name = _model_name(request.model_name, request.repository_name)
        parameters = repository_parameters(request.parameters)
        await protocol.load(self.state.registry, self.state.settings, name, parameters)
        return pb.RepositoryModelLoadResponse(model_name=name, isLoaded=True)

    async def repository_unload(self, request: pb.RepositoryModelUnloadRequest) -> pb.RepositoryModelUnloadResponse:
        name = _model_name(request.model_name, request.repository_name)
        await protocol.unload(self.state.registry, self.state.settings, name)
        return pb.RepositoryModelUnloadResponse(model_name=name, isUnloaded=True)

    async def health_check(self, request: health_pb2.HealthCheckRequest) -> health_pb2.HealthCheckResponse:
        return health_pb2.HealthCheckResponse(status=self._health(request.service))

    def _health(self, service: str) -> int:
        if service not in ("", SERVICE):
            raise ServiceError(404, "unknown_service", f"no service {service[:64]!r}; the server has {SERVICE!r}")
        return health_pb2.HealthCheckResponse.SERVING if self._ready() else health_pb2.HealthCheckResponse.NOT_SERVING

    # around every call --------------------------------------------------------------------------

    async def call(self, method: str, guard: Guard, work: Callable[[Any], Awaitable[Any]], request: Any,
                   rpc: grpc.aio.ServicerContext[Any, Any]) -> Any:  # fmt: skip
        """`work(request)` with the request's context, key check, time limit, log line and metrics;
        its failure answered as the protocol's status."""
        metadata = {key: value for key, value in rpc.invocation_metadata() or ()}
        state, token = context.begin(request_id_from(_text(metadata.get("x-request-id"))))
        if tracing.on:
            tracing.begin_rpc(state, method, metadata)
        started, status, code = time.perf_counter(), 200, grpc.StatusCode.OK
        try:
            try:
                self._authorize(guard, metadata)
                if self.limiter is not None and guard != "health":
                    self.limiter.check(_presented(metadata), peer_host(rpc.peer()))
                async with asyncio.timeout(self.timeout_s):
                    return await work(request)
            except asyncio.CancelledError:
                status, code = 499, grpc.StatusCode.CANCELLED  # the client left (or its deadline passed)
                raise
            except Exception as exc:
                answer = self._answer(exc, method)
                status, code = answer.status, answer.code
                await rpc.abort(answer.code, answer.message, answer.trailers)
        finally:
            self._record(method, status, state, time.perf_counter() - started)
            if state.trace is not None:
                tracing.end_rpc(state, code.value[0], status)
            context.end(token)

    def _authorize(self, guard: Guard, metadata: dict[str, str | bytes]) -> None:
        if not authorized(_presented(metadata), self.keys[guard]):
            raise Unauthorized()

    def _answer(self, exc: Exception, method: str) -> Answer:
        metrics = self.state.metrics
        if isinstance(exc, ServiceError):
            metrics.rejected.labels(exc.code).inc()
            retry = (exc.headers or {}).get("Retry-After")
            return Answer(grpc_code(exc), exc.message, exc.status, (("retry-after", retry),) if retry else ())
        if isinstance(exc, CodecError):
            metrics.rejected.labels("invalid_request").inc()
            return Answer(grpc.StatusCode.INVALID_ARGUMENT, str(exc), 400)
        if isinstance(exc, TimeoutError):
            metrics.rejected.labels("timeout").inc()
            return Answer(grpc.StatusCode.DEADLINE_EXCEEDED, f"no answer within {self.timeout_s:g} s", 504)
        log.exception("unhandled error in gRPC %s (request %s)", method, context.request_id())
        return Answer(grpc.StatusCode.INTERNAL, "the server failed to answer this call; its log has the details", 500)

    def _record(self, method: str, status: int, state: context.RequestContext, total: float) -> None:
        if access_log.isEnabledFor(logging.INFO):
            access_log.info(
                "GRPC %s %d %.1fms %s", method, status, total * 1000, state.model or "-",
                extra={"request_id": state.request_id, "method": "GRPC", "path": method, "status": status,
                       "ms": round(total * 1000, 2), "model": state.model},
            )  # fmt: skip
        self.state.metrics.request_done(method, status, state.model, state.provider, state.timings, total)

    async def watch(
        self, raw: bytes, rpc: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        """grpc.health.v1's Watch: the status now, then each change (looked at every WATCH_EVERY_S)."""
        metadata = {key: value for key, value in rpc.invocation_metadata() or ()}
        try:
            self._authorize("health", metadata)
            request = message_of(health_pb2.HealthCheckRequest, raw)
            status = self._health(request.service)
        except ServiceError as exc:
            await rpc.abort(grpc_code(exc), exc.message)
        except CodecError as exc:
            await rpc.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        yield health_pb2.HealthCheckResponse(status=status)
        while True:
            await asyncio.sleep(WATCH_EVERY_S)
            if (now := self._health(request.service)) != status:
                status = now
                yield health_pb2.HealthCheckResponse(status=status)


def message_of(kind: Any, raw: bytes) -> Any:
    """The message `raw` holds (CodecError where it holds none: INVALID_ARGUMENT)."""
    try:
        return kind.FromString(raw)
    except DecodeError:
        raise CodecError(f"the request is not a valid {kind.DESCRIPTOR.full_name} message") from None


def parsed(kind: Any, work: Callable[[Any], Awaitable[Any]]) -> Callable[[bytes], Awaitable[Any]]:
    """`work` on the message of type `kind` its bytes hold."""

    async def run(raw: bytes) -> Any:
        return await work(message_of(kind, raw))

    return run


def _model_name(model_name: str, repository_name: str) -> str:
    """Triton's load and unload requests name the model in field 2; KServe's in field 1, which Triton's
    layout calls the repository (this service has one, so a name there alone is the model's)."""
    return model_name or repository_name


def _presented(metadata: dict[str, str | bytes]) -> bytes:
    return carried(_bytes(metadata.get("x-api-key")), _bytes(metadata.get("authorization")))


def peer_host(peer: str) -> str:
    """The address in a gRPC peer (`ipv4:127.0.0.1:5000`, `ipv6:[::1]:5000`, `unix:/path`), the rest as it is."""
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6"):
        return unquote(rest).rpartition(":")[0].strip("[]")  # gRPC writes [ and ] as %5B and %5D
    return peer


def _bytes(value: str | bytes | None) -> bytes | None:
    return value.encode() if isinstance(value, str) else value


def _text(value: str | bytes | None) -> str | None:
    return value.decode("latin-1") if isinstance(value, bytes) else value


# (method, guard, the service's method, request type, response type)
CALLS: list[tuple[str, Guard, str, Any, Any]] = [
    ("ServerLive", "health", "server_live", pb.ServerLiveRequest, pb.ServerLiveResponse),
    ("ServerReady", "health", "server_ready", pb.ServerReadyRequest, pb.ServerReadyResponse),
    ("ModelReady", "api", "model_ready", pb.ModelReadyRequest, pb.ModelReadyResponse),
    ("ServerMetadata", "api", "server_metadata", pb.ServerMetadataRequest, pb.ServerMetadataResponse),
    ("ModelMetadata", "api", "model_metadata", pb.ModelMetadataRequest, pb.ModelMetadataResponse),
    ("ModelInfer", "api", "model_infer", pb.ModelInferRequest, pb.ModelInferResponse),
    ("RepositoryIndex", "control", "repository_index", pb.RepositoryIndexRequest, pb.RepositoryIndexResponse),
    ("RepositoryModelLoad", "control", "repository_load", pb.RepositoryModelLoadRequest,
     pb.RepositoryModelLoadResponse),
    ("RepositoryModelUnload", "control", "repository_unload", pb.RepositoryModelUnloadRequest,
     pb.RepositoryModelUnloadResponse),
]  # fmt: skip


def handlers(service: InferenceService) -> tuple[grpc.GenericRpcHandler, grpc.GenericRpcHandler]:
    """The inference service's and the health service's handlers."""

    def unary(path: str, guard: Guard, work: Callable[[Any], Awaitable[Any]], request: Any, response: Any) -> Any:
        async def behaviour(message: bytes, rpc: grpc.aio.ServicerContext[Any, Any]) -> Any:
            return await service.call(path, guard, parsed(request, work), message, rpc)

        # the bytes as they came: parsed inside the call, where a failure is the client's (gRPC's own
        # deserializer answers one as UNKNOWN)
        return grpc.unary_unary_rpc_method_handler(behaviour, response_serializer=response.SerializeToString)

    inference = {
        name: unary(f"/{SERVICE}/{name}", guard, getattr(service, attribute), request, response)
        for name, guard, attribute, request, response in CALLS
    }
    check = unary(f"/{HEALTH}/Check", "health", service.health_check, health_pb2.HealthCheckRequest,
                  health_pb2.HealthCheckResponse)  # fmt: skip
    watch: grpc.RpcMethodHandler[Any, Any] = grpc.unary_stream_rpc_method_handler(
        service.watch, response_serializer=health_pb2.HealthCheckResponse.SerializeToString
    )
    return (grpc.method_handlers_generic_handler(SERVICE, inference),
            grpc.method_handlers_generic_handler(HEALTH, {"Check": check, "Watch": watch}))  # fmt: skip


def address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def start(state: Any, settings: Settings) -> grpc.aio.Server | None:
    """The gRPC server on `grpc_port`, started; None where it is off (0) or its port cannot be had
    (logged: REST serves on). With several workers each binds the port with SO_REUSEPORT (the kernel
    spreads connections among them, as the parent's shared socket does for HTTP); alone, the port
    must be free."""
    if settings.grpc_port == 0:
        return None
    options = [
        ("grpc.max_receive_message_length", settings.max_body_bytes),
        ("grpc.max_send_message_length", -1),
        ("grpc.so_reuseport", 1 if settings.workers > 1 else 0),
    ]
    server = grpc.aio.server(options=options)
    server.add_generic_rpc_handlers(handlers(InferenceService(state, settings)))
    where = address(settings.host, settings.grpc_port)
    try:
        bound = server.add_insecure_port(where)
    except RuntimeError as exc:  # grpcio raises where older releases returned 0
        log.error("gRPC cannot listen on %s (%s): is the port in use? gRPC is off; REST serves on", where, exc)
        return None
    if bound == 0:
        log.error("gRPC cannot listen on %s: is the port in use? gRPC is off; REST serves on", where)
        return None
    await server.start()
    log.info("gRPC (Open Inference Protocol, grpc.health.v1) on %s", where)
    return server
