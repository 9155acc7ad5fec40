"""The Open Inference Protocol through KServe's own Python client (`kserve.InferenceRESTClient`,
protocol v2), against a live uvicorn process; answers must equal /v1's. That client has no metadata
calls: the metadata and health bodies are checked against KServe's own v2 response models instead."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import httpx
import httpx2
import numpy as np
import pytest
from kserve import InferenceRESTClient, InferInput, InferRequest, InferResponse, RESTConfig
from kserve.protocol.infer_type import RequestedOutput
from kserve.protocol.rest.v2_datamodels import (
    InferenceResponse,
    MetadataTensor,
    ModelMetadataResponse,
    ModelReadyResponse,
    ServerLiveResponse,
    ServerMetadataResponse,
    ServerReadyResponse,
)

from service.imaging import preprocess
from service.settings import PROJECT_ROOT
from tests.e2e.v1_answers import IMAGES, PNGS, SPEC, assert_logits_agree_with_v1, v1

T = TypeVar("T")


def with_client(work: Callable[[InferenceRESTClient], Awaitable[T]]) -> T:
    """Runs `work` with a fresh KServe REST client (v2 protocol) on its own event loop."""

    async def run() -> T:
        async with InferenceRESTClient(RESTConfig(protocol="v2", timeout=60)) as client:
            return await work(client)

    return asyncio.run(run())


def infer(server: str, request: InferRequest, headers: dict[str, str] | None = None) -> InferResponse:
    """`client.infer` of the request on its model; the answer's headers into `headers`, where given."""

    async def run(client: InferenceRESTClient) -> InferResponse:
        result: InferResponse = await client.infer(server, request, request.model_name, response_headers=headers)
        return result

    return with_client(run)


def test_health_and_readiness(server: str) -> None:
    async def probe(client: InferenceRESTClient) -> list[Any]:
        return [
            await client.is_server_live(server),
            await client.is_server_ready(server),
            *[await client.is_model_ready(server, name) for name in ("vit", "vit_image", "detr", "detr_image")],
            await client.is_model_ready(server, "imagetransformer"),
            await client.is_model_ready(server, "nope"),
            await client.is_model_ready(server, "imagetransformer_image"),  # generation has no image view
        ]

    # the client returns the bodies' "live" and "ready" fields (an empty body made it raise)
    assert with_client(probe) == [True, True, True, True, True, True, True, False, False]
    # the bodies, as KServe's own server models read them
    live = httpx2.get(f"{server}/v2/health/live")
    assert ServerLiveResponse.model_validate(live.json(), strict=True) == ServerLiveResponse(live=True)
    ready = httpx2.get(f"{server}/v2/health/ready")
    assert ServerReadyResponse.model_validate(ready.json(), strict=True) == ServerReadyResponse(ready=True)
    for path, name in [("vit_image", "vit_image"), ("vit/versions/1", "vit")]:
        model = httpx2.get(f"{server}/v2/models/{path}/ready")
        assert model.status_code == 200 and model.headers["content-type"] == "application/json"
        assert ModelReadyResponse.model_validate(model.json(), strict=True) == ModelReadyResponse(name=name, ready=True)
    for path in ["nope", "vit/versions/2"]:
        missing = httpx2.get(f"{server}/v2/models/{path}/ready")
        assert missing.status_code == 404 and set(missing.json()) == {"error"}


def described(tensors: list[MetadataTensor]) -> list[tuple[str, str, list[int]]]:
    return [(t.name, t.datatype, t.shape) for t in tensors]


def test_metadata_reads_as_kserve_models(server: str) -> None:
    served = httpx2.get(f"{server}/v2").json()
    metadata = ServerMetadataResponse.model_validate(served, strict=True)
    assert metadata.name == "vitserve" and "binary_tensor_data" in metadata.extensions
    assert set(served["models"]) == {"vit", "detr", "imagetransformer", "vit_image", "detr_image"}
    models = {name: ModelMetadataResponse.model_validate(httpx2.get(f"{server}/v2/models/{name}").json(), strict=True)
              for name in served["models"]}  # fmt: skip
    assert all(m.name == name and m.versions == ["1"] for name, m in models.items())
    assert described(models["vit"].inputs) == [("pixel_values", "FP32", [-1, 1, 32, 32])]
    assert described(models["vit"].outputs) == [("logits", "FP32", [-1, 10])]
    assert described(models["vit_image"].inputs) == [("image", "BYTES", [-1])]
    assert described(models["vit_image"].outputs) == [("label", "BYTES", [-1, -1]), ("score", "FP32", [-1, -1])]
    assert described(models["detr_image"].outputs) == [("detections", "BYTES", [-1])]
    versioned = httpx2.get(f"{server}/v2/models/vit/versions/1").json()
    assert ModelMetadataResponse.model_validate(versioned, strict=True) == models["vit"]


@pytest.mark.parametrize("binary_in", [True, False], ids=["binary-inputs", "json-inputs"])
@pytest.mark.parametrize("binary_out", [True, False], ids=["binary-outputs", "json-outputs"])
def test_raw_tensors_agree_with_v1(server: str, binary_in: bool, binary_out: bool) -> None:
    pixels = np.stack([preprocess(image, SPEC) for image in IMAGES[:6]])
    tensor = InferInput("pixel_values", list(pixels.shape), "FP32")
    tensor.set_data_from_numpy(pixels, binary_data=binary_in)
    request = InferRequest("vit", [tensor], request_id="k-1",
                           request_outputs=[RequestedOutput("logits", {"binary_data": binary_out})])  # fmt: skip
    headers: dict[str, str] = {}
    result = infer(server, request, headers)
    assert result.model_name == "vit" and result.id == "k-1"
    assert headers["content-type"] == ("application/octet-stream" if binary_out else "application/json")
    (output,) = result.outputs
    logits = output.as_numpy()
    assert output.name == "logits" and output.datatype == "FP32" and logits.shape == (6, 10)
    assert_logits_agree_with_v1(server, logits)


def test_json_answers_read_as_kserve_inference_responses(server: str) -> None:
    """A whole JSON request as the client builds it, and the answer as KServe's server model reads it."""
    pixels = np.stack([preprocess(image, SPEC) for image in IMAGES[:2]])
    tensor = InferInput("pixel_values", list(pixels.shape), "FP32", data=pixels)
    body, json_length = InferRequest("vit", [tensor], request_id="k-2").to_rest()
    assert json_length is None and isinstance(body, dict)
    response = httpx2.post(f"{server}/v2/models/vit/infer", json=body)
    answer = InferenceResponse.model_validate(response.json())
    assert answer.id == "k-2" and answer.model_name == "vit" and answer.model_version == "1"
    assert [(o.name, o.datatype, o.shape) for o in answer.outputs] == [("logits", "FP32", [2, 10])]
    best = [int(v1(server, "/v1/classify", png)[0]["label"]) for png in PNGS[:2]]
    assert np.reshape(answer.outputs[0].data, (2, 10)).argmax(-1).tolist() == best


@pytest.mark.parametrize("binary_out", [True, False], ids=["binary-outputs", "json-outputs"])
def test_image_view_gives_v1_labels_and_scores(server: str, binary_out: bool) -> None:
    images = InferInput("image", [len(PNGS)], "BYTES")
    images.set_data_from_numpy(np.array(PNGS, dtype=object), binary_data=True)  # PNGs are not UTF-8: binary
    request = InferRequest("vit_image", [images], parameters={"top_k": 3, "binary_data_output": binary_out})
    result = infer(server, request)
    outputs = {output.name: output for output in result.outputs}
    assert [(o.name, o.datatype, o.shape) for o in result.outputs] == [("label", "BYTES", [6, 3]),
                                                                       ("score", "FP32", [6, 3])]  # fmt: skip
    labels, scores = outputs["label"].as_numpy(), outputs["score"].as_numpy()
    for png, row_labels, row_scores in zip(PNGS, labels, scores, strict=True):
        expected = v1(server, "/v1/classify?top_k=3", png)
        assert list(row_labels) == [p["label"] for p in expected]  # str: the client decodes BYTES as UTF-8
        np.testing.assert_allclose(row_scores, [p["score"] for p in expected], atol=1e-6)


def test_detection_image_view_gives_v1_boxes(server: str) -> None:
    scene = (PROJECT_ROOT / "examples" / "scene.png").read_bytes()
    images = InferInput("image", [1], "BYTES")
    images.set_data_from_numpy(np.array([scene], dtype=object))
    (found,) = infer(server, InferRequest("detr_image", [images])).outputs[0].as_numpy()
    assert json.loads(found) == v1(server, "/v1/detect", scene) != []


def test_unknown_model_and_bad_tensors_are_the_clients_errors(server: str) -> None:
    pixels = np.zeros((1, 1, 32, 31), dtype=np.float32)  # one column short
    tensor = InferInput("pixel_values", list(pixels.shape), "FP32")
    tensor.set_data_from_numpy(pixels)
    with pytest.raises(httpx.HTTPStatusError) as unknown:
        infer(server, InferRequest("nope", [tensor]))
    assert unknown.value.response.status_code == 404 and "unknown model 'nope'" in str(unknown.value)
    with pytest.raises(httpx.HTTPStatusError) as wrong_shape:
        infer(server, InferRequest("vit", [tensor]))
    assert wrong_shape.value.response.status_code == 400 and "[1, 1, 32, 31]" in str(wrong_shape.value)
