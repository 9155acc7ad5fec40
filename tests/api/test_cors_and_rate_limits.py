"""CORS and per-client rate limits through the real app (over an empty model repository: quick to
start), REST and gRPC alike: preflights pass the key check, a burst passes and the next request gets
429 with Retry-After, other clients and health are unaffected, the buckets kept stay capped."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import pytest
from fastapi.testclient import TestClient
from starlette.types import Message

from service import grpc_server
from service.grpc_proto import grpc_predict_v2_pb2 as pb
from service.settings import Settings
from tests.conftest import client_for

PAGE = "https://app.example"
API = {"authorization": "Bearer k-api"}


def settings(folder: Path, **changed: Any) -> Settings:
    return Settings(model_repository=folder, device="cpu", warmup=False, **changed)


@pytest.fixture()
def cors(tmp_path: Path) -> Iterator[TestClient]:
    yield from client_for(settings(tmp_path, cors_origins=[PAGE], api_key="k-api"))


def test_no_cors_headers_by_default(tmp_path: Path) -> None:
    for client in client_for(settings(tmp_path)):
        simple = client.get("/v1/models", headers={"origin": PAGE})
        preflight = client.options("/v1/classify", headers={"origin": PAGE, "access-control-request-method": "POST"})
        assert simple.status_code == 200 and preflight.status_code == 405
        assert not [h for r in (simple, preflight) for h in r.headers if h.startswith("access-control-")]


def test_a_preflight_from_an_allowed_origin_needs_no_key(cors: TestClient) -> None:
    asked = {"origin": PAGE, "access-control-request-method": "POST",
             "access-control-request-headers": "authorization, x-api-key, content-type, x-request-id"}  # fmt: skip
    preflight = cors.options("/v1/classify", headers=asked)
    assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] == PAGE
    assert set(preflight.headers["access-control-allow-methods"].split(", ")) == {"GET", "POST"}
    allowed = preflight.headers["access-control-allow-headers"].lower()
    assert {"authorization", "x-api-key", "content-type", "x-request-id"} <= set(allowed.split(", "))
    refused = cors.options("/v1/classify", headers={**asked, "access-control-request-method": "DELETE"})
    assert refused.status_code == 400
    binary = {**asked, "access-control-request-headers": "content-type, inference-header-content-length"}
    assert cors.options("/v2/models/vit/infer", headers=binary).status_code == 200  # /v2's binary requests
    for odd in ("x-other", "content-type, x\x7fbad", "a" * 5000):
        headers = {**asked, "access-control-request-headers": odd}
        assert cors.options("/v1/classify", headers=headers).status_code == 400
    for method in ("TRACE", "post", "CONNECT", "GET, POST"):
        headers = {**asked, "access-control-request-method": method}
        assert cors.options("/v1/classify", headers=headers).status_code == 400


def test_a_simple_request_from_an_allowed_origin_can_read_the_answer(cors: TestClient) -> None:
    answered = cors.get("/v1/models", headers={"origin": PAGE, **API})
    refused = cors.get("/v1/models", headers={"origin": PAGE})  # a page can read why, too
    assert (answered.status_code, refused.status_code) == (200, 401)
    for answer in (answered, refused):
        assert answer.headers["access-control-allow-origin"] == PAGE
        exposed = set(answer.headers["access-control-expose-headers"].split(", "))
        # and what a binary answer needs read: /v1/embed's shape, /v2's JSON header length
        assert exposed == {"X-Request-ID", "Server-Timing", "X-Model-Version", "Retry-After", "X-Embedding-Shape",
                           "Inference-Header-Content-Length"}  # fmt: skip


def test_a_disallowed_origin_gets_no_cors_headers(cors: TestClient) -> None:
    other = "https://evil.example"
    preflight = cors.options("/v1/classify", headers={"origin": other, "access-control-request-method": "GET"})
    simple = cors.get("/v1/models", headers={"origin": other, **API})
    assert preflight.status_code == 400 and simple.status_code == 200
    assert not [r for r in (preflight, simple) if "access-control-allow-origin" in r.headers]


# rate limits -------------------------------------------------------------------------------------

LIMITED: dict[str, Any] = {"rate_limit": 0.5, "rate_burst": 3}  # a token every 2 s, three at once


def test_a_burst_passes_then_429_with_retry_after(tmp_path: Path) -> None:
    for client in client_for(settings(tmp_path, **LIMITED, api_key="k-api", control_api_key="k-control")):
        assert [client.get("/v1/models", headers=API).status_code for _ in range(3)] == [200] * 3
        refused = client.get("/v1/models", headers={**API, "x-request-id": "r-1"})
        assert refused.status_code == 429 and refused.headers["retry-after"] == "2"
        error = refused.json()["error"]
        assert error["code"] == "rate_limited" and error["request_id"] == "r-1" and "k-api" not in refused.text
        assert client.get("/v1/models").status_code == 401  # no key: refused before it could spend a token
        # another key has a bucket of its own; health and metrics are exempt
        assert client.post("/v2/repository/index", headers={"x-api-key": "k-control"}).status_code == 200
        for path in ("/health/live", "/health/ready", "/v2/health/ready", "/metrics") * 3:
            assert client.get(path, headers=API).status_code != 429, path  # (ready: 503, no model here)
        assert 'vitserve_rejected_total{reason="rate_limited"} 1.0' in client.get("/metrics").text


def get_from(client: TestClient, addresses: list[str], path: str = "/v1/models") -> list[int]:
    """The status of a GET of `path` from each address in turn, straight through the app's ASGI
    interface (a tenth of a TestClient request's time), in the app's event loop."""

    async def one(address: str) -> int:
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
                 "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
                 "headers": [], "client": (address, 50000), "server": ("testserver", 80)}  # fmt: skip
        status: list[int] = []

        async def receive() -> Message:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])

        await client.app(scope, receive, send)
        return status[0]

    async def each() -> list[int]:
        return [await one(address) for address in addresses]

    assert client.portal is not None
    return client.portal.call(each)


def test_without_keys_each_address_is_limited_on_its_own(tmp_path: Path) -> None:
    for client in client_for(settings(tmp_path, **LIMITED)):
        assert get_from(client, ["10.0.0.1"] * 4) == [200, 200, 200, 429]
        assert get_from(client, ["10.0.0.2"]) == [200]
        ipv6 = ["2001:db8::1", "2001:db8::2:3", "2001:db8::ffff:4", "2001:db8::5"]  # one /64: one client
        assert get_from(client, ipv6) == [200, 200, 200, 429]


def test_the_buckets_kept_stay_capped_under_10000_clients(tmp_path: Path) -> None:
    for client in client_for(settings(tmp_path, **LIMITED, rate_limit_clients=1_000)):
        addresses = [f"10.{n // 65536}.{n // 256 % 256}.{n % 256}" for n in range(10_000)]
        assert set(get_from(client, addresses)) == {200}
        limiter = client.app.state.rate_limiter  # type: ignore[attr-defined]
        assert len(limiter.buckets) == 1_000 and "ip:10.0.39.15" in limiter.buckets


# gRPC: the same limiter, the same answer in the protocol's terms ----------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def unary(channel: grpc.Channel, method: str, request: Any, response: Any) -> Any:
    path = f"/{grpc_server.SERVICE}/{method}"
    return channel.unary_unary(path, request_serializer=request.SerializeToString,
                               response_deserializer=response.FromString)  # fmt: skip


def test_grpc_shares_the_limit_and_answers_resource_exhausted(tmp_path: Path) -> None:
    served = settings(tmp_path, **LIMITED, api_key="k-api", grpc_port=free_port(), host="127.0.0.1")
    keyed = (("authorization", "Bearer k-api"),)
    for client in client_for(served):
        assert client.portal is not None
        state = client.app.state  # type: ignore[attr-defined]
        server = client.portal.call(partial(grpc_server.start, state, served))
        assert server is not None
        try:
            with grpc.insecure_channel(f"127.0.0.1:{served.grpc_port}") as channel:
                metadata = unary(channel, "ServerMetadata", pb.ServerMetadataRequest, pb.ServerMetadataResponse)
                live = unary(channel, "ServerLive", pb.ServerLiveRequest, pb.ServerLiveResponse)
                assert client.get("/v1/models", headers=API).status_code == 200  # one token over REST
                assert metadata(pb.ServerMetadataRequest(), metadata=keyed).name == "vitserve"
                assert metadata(pb.ServerMetadataRequest(), metadata=keyed).name == "vitserve"
                with pytest.raises(grpc.RpcError) as refused:
                    metadata(pb.ServerMetadataRequest(), metadata=keyed)
                assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                trailers: Any = refused.value.trailing_metadata()  # (typed as bytes: str here)
                assert ("retry-after", "2") in trailers
                assert client.get("/v1/models", headers=API).status_code == 429  # the same bucket
                assert all(live(pb.ServerLiveRequest()).live for _ in range(5))  # health is exempt
        finally:
            client.portal.call(server.stop, None)
        assert 'vitserve_rejected_total{reason="rate_limited"} 2.0' in client.get("/metrics").text
