"""The Open Inference Protocol through Triton's own client (`tritonclient.http`), against a live
uvicorn process; answers must equal /v1's."""

from __future__ import annotations

import json

import httpx2
import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from service.imaging import preprocess
from service.settings import PROJECT_ROOT
from tests.e2e.v1_answers import IMAGES, PNGS, SPEC, assert_logits_agree_with_v1, v1


@pytest.fixture(scope="module")
def client(server: str) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(server.removeprefix("http://"))


def test_server_and_model_metadata(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live() and client.is_server_ready()
    metadata = client.get_server_metadata()
    assert metadata["name"] == "vitserve" and "binary_tensor_data" in metadata["extensions"]
    assert {"vit", "detr", "imagetransformer", "vit_image", "detr_image"} <= set(metadata["models"])
    vit = client.get_model_metadata("vit")
    assert vit["inputs"] == [{"name": "pixel_values", "datatype": "FP32", "shape": [-1, 1, 32, 32]}]
    assert vit["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}]
    assert client.get_model_metadata("vit_image")["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": [-1]}]
    assert client.is_model_ready("detr") and client.is_model_ready("vit", "1")
    assert client.get_model_metadata("vit", "1")["versions"] == ["1"]


@pytest.mark.parametrize("binary_in", [True, False], ids=["binary-inputs", "json-inputs"])
@pytest.mark.parametrize("binary_out", [True, False], ids=["binary-outputs", "json-outputs"])
def test_raw_tensors_agree_with_v1(
    server: str, client: triton.InferenceServerClient, binary_in: bool, binary_out: bool
) -> None:
    pixels = np.stack([preprocess(image, SPEC) for image in IMAGES[:6]])
    tensor = triton.InferInput("pixel_values", list(pixels.shape), "FP32")
    tensor.set_data_from_numpy(pixels, binary_data=binary_in)
    result = client.infer("vit", [tensor], outputs=[triton.InferRequestedOutput("logits", binary_data=binary_out)],
                          request_id="r-1")  # fmt: skip
    logits = result.as_numpy("logits")
    assert logits.shape == (6, 10) and result.get_response()["id"] == "r-1"
    assert_logits_agree_with_v1(server, logits)


def test_image_view_gives_v1_labels_and_scores(server: str, client: triton.InferenceServerClient) -> None:
    images = triton.InferInput("image", [len(PNGS)], "BYTES")
    images.set_data_from_numpy(np.array(PNGS, dtype=object))
    result = client.infer("vit_image", [images], parameters={"top_k": 3})
    labels, scores = result.as_numpy("label"), result.as_numpy("score")
    assert labels.shape == (6, 3)
    for png, row_labels, row_scores in zip(PNGS, labels, scores, strict=True):
        expected = v1(server, "/v1/classify?top_k=3", png)
        assert [label.decode() for label in row_labels] == [p["label"] for p in expected]
        np.testing.assert_allclose(row_scores, [p["score"] for p in expected], atol=1e-6)


def test_detection_image_view_gives_v1_boxes(server: str, client: triton.InferenceServerClient) -> None:
    scene = (PROJECT_ROOT / "examples" / "scene.png").read_bytes()
    images = triton.InferInput("image", [1], "BYTES")
    images.set_data_from_numpy(np.array([scene], dtype=object))
    (found,) = client.infer("detr_image", [images]).as_numpy("detections")
    assert json.loads(found) == v1(server, "/v1/detect", scene)


def test_unknown_model_and_malformed_bodies(server: str, client: triton.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException) as unknown:
        client.get_model_metadata("nope")
    assert unknown.value.status() == "404"
    wrong_shape = b'{"inputs": [{"name": "pixel_values", "shape": [1, 1, 32, 31], "datatype": "FP32", "data": [0]}]}'
    malformed = [
        (b"{not json", {}),
        (b'{"inputs": 3}', {}),
        (b'{"inputs": [{"name": "pixel_values"}]}', {}),
        (wrong_shape, {}),
        (b'{"inputs": []}xx', {"Inference-Header-Content-Length": "99"}),
    ]
    for body, headers in malformed:
        response = httpx2.post(f"{server}/v2/models/vit/infer", content=body, headers=headers)
        assert response.status_code == 400, response.text
        assert set(response.json()) == {"error"}
    missing = httpx2.post(f"{server}/v2/models/nope/infer", content=b'{"inputs": []}')
    assert missing.status_code == 404 and "error" in missing.json()
