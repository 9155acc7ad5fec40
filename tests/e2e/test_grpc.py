"""The Open Inference Protocol over gRPC, through Triton's own client (`tritonclient.grpc`, unchanged)
and KServe's (`kserve.InferenceGRPCClient`), against a live `python -m service`: the same answers as
REST's /v2 bit for bit, health (grpc.health.v1 too), metadata, the repository calls, the API keys,
the protocol's error codes for hostile calls, and a gRPC port that cannot be had (REST serves on).

Both clients ship stubs that define `inference.*` in protobuf's default descriptor pool, which refuses
a second definition of a name (kserve's load in any test process that imports `kserve`): so
`tritonclient.grpc` is imported here with a pool of its own (`triton_grpc()`), its code unchanged."""

from __future__ import annotations

import asyncio
import shutil
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any
from unittest import mock

import grpc
import httpx2
import numpy as np
import pytest
import tritonclient.http as triton_http
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.imaging import preprocess
from service.settings import PROJECT_ROOT
from tests.e2e.conftest import Server, free_port, running_server
from tests.e2e.v1_answers import IMAGES, PNGS, SPEC


def triton_grpc() -> ModuleType:
    """`tritonclient.grpc`, its messages in a descriptor pool of their own (see the module's doc)."""
    if "tritonclient.grpc" not in sys.modules:
        with mock.patch.object(descriptor_pool, "Default", return_value=descriptor_pool.DescriptorPool()):
            import tritonclient.grpc  # noqa: F401
    return sys.modules["tritonclient.grpc"]


tg = triton_grpc()
SCENE = (PROJECT_ROOT / "examples" / "scene.png").read_bytes()


@pytest.fixture(scope="module")
def client(served: Server) -> Any:
    return tg.InferenceServerClient(served.grpc)


@pytest.fixture(scope="module")
def rest(served: Server) -> triton_http.InferenceServerClient:
    return triton_http.InferenceServerClient(served.url.removeprefix("http://"))


def pixels() -> np.ndarray:
    return np.stack([preprocess(image, SPEC) for image in IMAGES[:6]])


def bits(array: np.ndarray) -> tuple[str, tuple[int, ...], Any]:
    """An array's dtype, shape and bytes (BYTES: its elements): equal only where the answers are equal bit for bit."""
    data = tuple(array.ravel().tolist()) if array.dtype == object else np.ascontiguousarray(array).tobytes()
    return array.dtype.str, array.shape, data


def grpc_infer(client: Any, model: str, name: str, data: np.ndarray, datatype: str, **kwargs: Any) -> Any:
    tensor = tg.InferInput(name, list(data.shape), datatype)
    tensor.set_data_from_numpy(data)
    return client.infer(model, [tensor], **kwargs)


def rest_infer(rest: triton_http.InferenceServerClient, model: str, name: str, data: np.ndarray, datatype: str,
               **kwargs: Any) -> Any:  # fmt: skip
    tensor = triton_http.InferInput(name, list(data.shape), datatype)
    tensor.set_data_from_numpy(data, binary_data=True)
    return rest.infer(model, [tensor], **kwargs)


def test_health_and_metadata_as_rest_says(served: Server, client: Any) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert all(client.is_model_ready(name) for name in ("vit", "vit_image", "detr", "detr_image"))
    assert client.is_model_ready("vit", "1")
    metadata = client.get_server_metadata()
    assert metadata.name == "vitserve" and "binary_tensor_data" in metadata.extensions
    for name in ("vit", "vit_image", "detr_image"):
        over_rest = httpx2.get(f"{served.url}/v2/models/{name}").json()
        found = client.get_model_metadata(name, as_json=True)
        tensors = [{**t, "shape": [int(d) for d in t["shape"]]} for t in found["outputs"]]
        assert found["name"] == over_rest["name"] and found["versions"] == over_rest["versions"]
        assert tensors == over_rest["outputs"] and found["platform"] == over_rest["platform"]
    with grpc.insecure_channel(served.grpc) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "inference.GRPCInferenceService"):
            status = health.Check(health_pb2.HealthCheckRequest(service=service)).status
            assert status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as unknown:
            health.Check(health_pb2.HealthCheckRequest(service="nope"))
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND


def test_raw_view_equals_rest_bit_for_bit(served: Server, client: Any, rest: triton_http.InferenceServerClient) -> None:
    over_grpc = grpc_infer(client, "vit", "pixel_values", pixels(), "FP32", request_id="g-1")
    over_rest = rest_infer(rest, "vit", "pixel_values", pixels(), "FP32")
    assert over_grpc.get_response().id == "g-1" and over_grpc.get_response().model_version == "1"
    assert bits(over_grpc.as_numpy("logits")) == bits(over_rest.as_numpy("logits"))
    assert over_grpc.as_numpy("logits").shape == (6, 10)
    counted = httpx2.get(f"{served.url}/metrics").text
    assert 'route="/inference.GRPCInferenceService/ModelInfer",status="200"' in counted


def test_image_views_equal_rest_bit_for_bit(client: Any, rest: triton_http.InferenceServerClient) -> None:
    images = np.array(PNGS, dtype=object)
    over_grpc = grpc_infer(client, "vit_image", "image", images, "BYTES", parameters={"top_k": 3})
    over_rest = rest_infer(rest, "vit_image", "image", images, "BYTES", parameters={"top_k": 3})
    for output in ("label", "score"):
        assert bits(over_grpc.as_numpy(output)) == bits(over_rest.as_numpy(output))
    assert over_grpc.as_numpy("label").shape == (6, 3)
    scene = np.array([SCENE], dtype=object)
    detections = grpc_infer(client, "detr_image", "image", scene, "BYTES").as_numpy("detections")
    assert bits(detections) == bits(rest_infer(rest, "detr_image", "image", scene, "BYTES").as_numpy("detections"))


def test_kserve_grpc_client_typed_and_raw_contents(served: Server, rest: triton_http.InferenceServerClient) -> None:
    from kserve import InferenceGRPCClient, InferInput, InferRequest

    expected = rest_infer(rest, "vit", "pixel_values", pixels(), "FP32").as_numpy("logits")

    async def run() -> list[Any]:
        client = InferenceGRPCClient(served.grpc, timeout=60)
        try:
            found: list[Any] = [await client.is_server_live(), await client.is_server_ready(),
                                await client.is_model_ready("vit_image")]  # fmt: skip
            for binary in (False, True):  # typed `contents`, then raw_input_contents
                tensor = InferInput("pixel_values", list(pixels().shape), "FP32")
                tensor.set_data_from_numpy(pixels(), binary_data=binary)
                found.append((await client.infer(InferRequest("vit", [tensor]))).outputs[0].as_numpy())
            images = InferInput("image", [2], "BYTES")
            images.set_data_from_numpy(np.array(PNGS[:2], dtype=object), binary_data=True)
            answer = await client.infer(InferRequest("vit_image", [images], parameters={"top_k": 2}))
            found.append({output.name: output.as_numpy() for output in answer.outputs})
            return found
        finally:
            await client.close()

    live, ready, model_ready, typed, raw, image_view = asyncio.run(run())
    assert live and ready and model_ready
    assert bits(typed) == bits(expected) and bits(raw) == bits(expected)
    assert image_view["label"].shape == (2, 2) and image_view["score"].dtype == np.float32


def code_of(call: Any) -> Any:
    with pytest.raises(tg.InferenceServerException) as failed:
        call()
    return failed.value.status()


def test_hostile_calls_get_the_protocols_codes(client: Any) -> None:
    def infer_code(model: str, name: str, data: np.ndarray, datatype: str, **kwargs: Any) -> Any:
        return code_of(lambda: grpc_infer(client, model, name, data, datatype, **kwargs))

    ok, png = pixels()[:1], np.array(PNGS[:1], dtype=object)
    assert infer_code("nope", "pixel_values", ok, "FP32") == "StatusCode.NOT_FOUND"
    assert code_of(lambda: client.get_model_metadata("vit", "7")) == "StatusCode.NOT_FOUND"
    text = np.full(ok.shape, b"0.5", dtype=object)  # the wrong datatype: BYTES for FP32
    assert infer_code("vit", "pixel_values", text, "BYTES") == "StatusCode.INVALID_ARGUMENT"
    fractions = np.full((1, 1), 0.5)  # and a graph's own input refused as such: INT64 cannot hold 0.5
    assert infer_code("vit", "pixel_values", fractions, "FP64") == "StatusCode.INVALID_ARGUMENT"
    assert infer_code("vit", "pixel_values", ok[:, :, :31], "FP32") == "StatusCode.INVALID_ARGUMENT"
    assert infer_code("vit", "pixels", ok, "FP32") == "StatusCode.INVALID_ARGUMENT"
    assert infer_code("vit_image", "image", np.array([b"nope"], dtype=object), "BYTES") == "StatusCode.INVALID_ARGUMENT"
    assert infer_code("vit_image", "image", png, "BYTES", parameters={"top_k": 0}) == "StatusCode.INVALID_ARGUMENT"
    oversized = np.zeros((21 * 2**20 // 4096, 1, 32, 32), dtype=np.float32)  # over the 20 MiB body limit
    assert infer_code("vit", "pixel_values", oversized, "FP32") == "StatusCode.RESOURCE_EXHAUSTED"
    assert client.is_server_ready()  # and it serves on


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository of the ViT alone: quick to start, and safe to load and unload."""
    folder = tmp_path_factory.mktemp("repository")
    shutil.copytree(PROJECT_ROOT / "model_repository" / "vit", folder / "vit")
    return folder


@pytest.fixture(scope="module")
def keyed(repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    env = {"VITSERVE_MODEL_REPOSITORY": str(repository), "VITSERVE_MODEL_CONTROL_MODE": "explicit",
           "VITSERVE_API_KEY": "k-api", "VITSERVE_CONTROL_API_KEY": "k-control"}  # fmt: skip
    with running_server(tmp_path_factory.mktemp("keyed"), **env) as running:
        yield running


def test_keys_and_the_repository_calls(keyed: Server) -> None:
    client = tg.InferenceServerClient(keyed.grpc)
    api, control = {"authorization": "Bearer k-api"}, {"x-api-key": "k-control"}
    assert client.is_server_ready()  # health is open
    assert code_of(lambda: client.get_server_metadata()) == "StatusCode.UNAUTHENTICATED"
    assert code_of(lambda: client.get_model_metadata("vit", headers={"x-api-key": "wrong"})) == (
        "StatusCode.UNAUTHENTICATED"
    )
    assert client.get_model_metadata("vit", headers=api).name == "vit"
    assert client.get_model_metadata("vit", headers={"x-api-key": "k-api"}).name == "vit"
    assert code_of(lambda: client.get_model_repository_index(headers=api)) == "StatusCode.UNAUTHENTICATED"
    index = client.get_model_repository_index(headers=control, as_json=True)["models"]
    assert index == [{"name": "vit", "version": "1", "state": "READY"}]
    client.unload_model("vit", headers=control)
    assert not client.is_model_ready("vit", headers=api)
    assert code_of(lambda: client.get_model_metadata("vit", headers=api)) == "StatusCode.NOT_FOUND"
    assert code_of(lambda: client.load_model("nope", headers=control)) == "StatusCode.INVALID_ARGUMENT"
    client.load_model("vit", headers=control)
    assert client.is_model_ready("vit", headers=api)
    answer = grpc_infer(client, "vit", "pixel_values", pixels()[:2], "FP32", headers=api)
    assert answer.as_numpy("logits").shape == (2, 10)


def test_a_grpc_port_in_use_leaves_rest_serving(repository: Path, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port := free_port()))
        taken.listen()
        env = {"VITSERVE_MODEL_REPOSITORY": str(repository)}
        with running_server(tmp_path, grpc_port=port, **env) as server:
            assert httpx2.get(f"{server.url}/v2/models/vit").status_code == 200
            log = server.log_path.read_text()
            assert f"gRPC cannot listen on 127.0.0.1:{port}" in log and "REST serves on" in log


UNPARSED = [  # a cut varint; a string field (a model's name, a service's) of bytes that are not UTF-8
    ("inference.GRPCInferenceService/ModelInfer", b"\xff\xff\xff\xff"),
    ("inference.GRPCInferenceService/ModelInfer", b"\x0a\x03\xff\xfe\xfd"),
    ("inference.GRPCInferenceService/ServerLive", b"\xff\xff\xff\xff"),
    ("grpc.health.v1.Health/Check", b"\x0a\x03\xff\xfe\xfd"),
]


@pytest.mark.parametrize(("method", "body"), UNPARSED)
def test_a_message_that_does_not_parse_is_invalid_argument(served: Server, method: str, body: bytes) -> None:
    """Bytes no message parses from are the client's mistake: INVALID_ARGUMENT, not gRPC's own UNKNOWN
    for a deserializer that raised; and the call answers on."""
    with grpc.insecure_channel(served.grpc) as channel:
        call = channel.unary_unary(f"/{method}", request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.RpcError) as caught:
            call(body, timeout=10)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
        if not method.endswith("ModelInfer"):
            assert call(b"", timeout=10) is not None  # an empty message parses, and is answered
