"""/v2 image views take their options from the request's `parameters`, validated by the same options
model as /v1 (400 in the protocol's error shape when invalid); the protocol's own parameters pass.
The codec's own refusals are in tests/hostile/test_v2_codec.py."""

from __future__ import annotations

import json
import struct
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.settings import PROJECT_ROOT
from tests.helpers import held_out_digits, png_bytes, triton_images

DIGIT = png_bytes(held_out_digits()[0][0])
SCENE = (PROJECT_ROOT / "examples" / "scene.png").read_bytes()


def infer(client: TestClient, model: str, image: bytes, parameters: dict[str, Any]) -> Any:
    return client.post(f"/v2/models/{model}/infer", **triton_images([image], parameters))


def outputs(response: Any) -> dict[str, Any]:
    """name -> the output tensor's values, read from JSON data or from the binary part."""
    assert response.status_code == 200, response.text
    split = int(response.headers.get("Inference-Header-Content-Length", len(response.content)))
    header, blobs, found = json.loads(response.content[:split]), response.content[split:], {}
    for tensor in header["outputs"]:
        if "data" in tensor:
            found[tensor["name"]] = np.reshape(tensor["data"], tensor["shape"])
            continue
        size = tensor["parameters"]["binary_data_size"]
        raw, blobs = blobs[:size], blobs[size:]
        if tensor["datatype"] == "BYTES":
            items, at = [], 0
            while at < len(raw):
                (length,) = struct.unpack_from("<I", raw, at)
                items.append(raw[at + 4 : at + 4 + length].decode())
                at += 4 + length
            found[tensor["name"]] = np.reshape(items, tensor["shape"])
        else:
            found[tensor["name"]] = np.frombuffer(raw, dtype=np.float32).reshape(tensor["shape"])
    return found


def test_top_k_parameter_gives_v1_answer(client: TestClient) -> None:
    got = outputs(infer(client, "vit_image", DIGIT, {"top_k": 3}))
    v1 = client.post("/v1/classify?top_k=3", content=DIGIT, headers={"content-type": "image/png"}).json()
    assert got["label"].shape == (1, 3)
    assert list(got["label"][0]) == [p["label"] for p in v1["results"][0]]
    np.testing.assert_allclose(got["score"][0], [p["score"] for p in v1["results"][0]], atol=1e-6)


@pytest.mark.parametrize(
    ("model", "parameters", "named"),
    [
        ("vit_image", {"top_k": 0}, "top_k"),
        ("vit_image", {"top_k": "x"}, "top_k"),
        ("vit_image", {"top_k": 1001}, "top_k"),
        ("vit_image", {"colour": "red"}, "colour"),  # unknown: the options model forbids extras
        ("vit_image", {"threshold": 0.5}, "threshold"),  # detection's option, not classification's
        ("detr_image", {"threshold": 2}, "threshold"),
        ("detr_image", {"max_detections": 0}, "max_detections"),
        ("detr_image", {"top_k": 3}, "top_k"),
    ],
)
def test_invalid_parameters_are_400_naming_the_parameter(
    client: TestClient, model: str, parameters: dict[str, Any], named: str
) -> None:
    response = infer(client, model, SCENE if model.startswith("detr") else DIGIT, parameters)
    assert response.status_code == 400, response.text
    body = response.json()
    assert set(body) == {"error"} and isinstance(body["error"], str)
    assert named in body["error"]


def test_parameters_must_be_an_object(client: TestClient) -> None:
    blob = struct.pack("<I", len(DIGIT)) + DIGIT
    tensor = {"name": "image", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": len(blob)}}
    head = json.dumps({"inputs": [tensor], "parameters": [1, 2]}).encode()
    response = client.post(
        "/v2/models/vit_image/infer", content=head + blob, headers={"Inference-Header-Content-Length": str(len(head))}
    )
    assert response.status_code == 400 and "parameters" in response.json()["error"]


@pytest.mark.parametrize("parameters", [{"render": True}, {"model": "vit"}])
def test_an_image_view_answers_only_its_own_tensors(client: TestClient, parameters: dict[str, Any]) -> None:
    """/v1's PNG answers and model choice have no meaning here: refused, not ignored."""
    response = infer(client, "detr_image", SCENE, parameters)
    assert response.status_code == 400 and "no render, no model" in response.json()["error"]
    assert infer(client, "detr_image", SCENE, {"model": "detr", "render": False}).status_code == 200


@pytest.mark.parametrize(
    "protocol", [{"binary_data_output": True}, {"binary_data_output": False}, {"priority": 1, "timeout": 5}]
)
def test_the_protocols_own_parameters_are_accepted(client: TestClient, protocol: dict[str, Any]) -> None:
    plain = outputs(infer(client, "vit_image", DIGIT, {"top_k": 2}))
    response = infer(client, "vit_image", DIGIT, {"top_k": 2, **protocol})
    binary = protocol.get("binary_data_output", False)
    assert ("Inference-Header-Content-Length" in response.headers) == binary
    got = outputs(response)
    assert list(got["label"][0]) == list(plain["label"][0])
    np.testing.assert_allclose(got["score"], plain["score"], atol=1e-6)


def test_detection_parameters_reach_the_pipeline(client: TestClient) -> None:
    every = json.loads(outputs(infer(client, "detr_image", SCENE, {"threshold": 0.0}))["detections"][0])
    capped = json.loads(
        outputs(infer(client, "detr_image", SCENE, {"threshold": 0.0, "max_detections": 2}))["detections"][0]
    )
    v1 = client.post("/v1/detect?threshold=0&max_detections=2", content=SCENE, headers={"content-type": "image/png"})
    assert len(every) > 2 and capped == every[:2] == v1.json()["results"][0]


def test_json_nested_too_deep_is_400_on_both_protocols(client: TestClient) -> None:
    deep = b"[" * 100_000 + b"]" * 100_000
    assert client.post("/v2/models/vit/infer", content=deep).status_code == 400
    response = client.post("/v1/classify", content=deep, headers={"content-type": "application/json"})
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_json"
