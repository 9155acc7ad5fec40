"""/v2 image views take their options from the request's `parameters`, validated by the same options
model as /v1 (400 in the protocol's error shape when invalid); the protocol's own parameters pass."""

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


def _raw(client: TestClient, header: object, tail: bytes = b"", length: str | None = None) -> Any:
    head = json.dumps(header).encode()
    headers = {"Inference-Header-Content-Length": length or str(len(head))} if tail or length else {}
    return client.post("/v2/models/vit/infer", content=head + tail, headers=headers)


PIXELS = {"name": "pixel_values", "datatype": "FP32", "shape": [1, 1, 32, 32], "data": [0.0] * 1024}


@pytest.mark.parametrize(
    ("what", "header", "tail", "length"),
    [
        ("BYTES to a raw view", {"inputs": [{**PIXELS, "datatype": "BYTES", "data": ["a"] * 1024}]}, b"", None),
        ("an integer as a BYTES item", {"inputs": [{**PIXELS, "datatype": "BYTES", "data": [10**13]}]}, b"", None),
        ("outputs not objects", {"inputs": [PIXELS], "outputs": ["logits"]}, b"", None),
        ("output parameters not an object", {"inputs": [PIXELS], "outputs": [{"name": "logits", "parameters": [1]}]},
         b"", None),
        ("a negative dim", {"inputs": [{**PIXELS, "shape": [-1, 1, 32, 32]}]}, b"", None),
        ("a fractional dim", {"inputs": [{**PIXELS, "shape": [1.5, 1, 32, 32]}]}, b"", None),
        ("binary size past the body", {"inputs": [{**{k: v for k, v in PIXELS.items() if k != "data"},
                                                   "parameters": {"binary_data_size": 10**9}}]}, b"\0" * 16, None),
        ("a BYTES tail under 4 bytes", {"inputs": [{"name": "pixel_values", "datatype": "BYTES", "shape": [1],
                                                    "parameters": {"binary_data_size": 2}}]}, b"\1\0", None),
        ("a BYTES length past its tensor", {"inputs": [{"name": "pixel_values", "datatype": "BYTES", "shape": [1],
                                                        "parameters": {"binary_data_size": 4}}]}, b"\xff" * 4, None),
        ("a negative header length", {"inputs": [PIXELS]}, b"", "-5"),
    ],
)  # fmt: skip
def test_malformed_protocol_requests_are_400(
    client: TestClient, what: str, header: object, tail: bytes, length: str | None
) -> None:
    response = _raw(client, header, tail, length)
    assert response.status_code == 400 and set(response.json()) == {"error"}, (what, response.text)


def test_json_nested_too_deep_is_400_on_both_protocols(client: TestClient) -> None:
    deep = b"[" * 100_000 + b"]" * 100_000
    assert client.post("/v2/models/vit/infer", content=deep).status_code == 400
    response = client.post("/v1/classify", content=deep, headers={"content-type": "application/json"})
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_json"


def test_answers_are_json_even_when_a_graph_gives_nan(client: TestClient) -> None:
    """NaN pixels in, NaN logits out: written as null (JSON has no NaN), as KServe's server writes them."""
    head = json.dumps({"inputs": [{**{k: v for k, v in PIXELS.items() if k != "data"}, "parameters": {"binary_data_size": 4096}}]}).encode()
    body = head + np.full(1024, np.nan, dtype=np.float32).tobytes()
    answer = client.post(
        "/v2/models/vit/infer", content=body, headers={"Inference-Header-Content-Length": str(len(head))}
    )
    assert answer.status_code == 200
    (logits,) = json.loads(answer.text, parse_constant=lambda name: pytest.fail(f"bare {name} in JSON"))["outputs"]
    assert logits["data"] == [None] * 10


def test_numbers_that_do_not_survive_the_cast_are_400(client: TestClient) -> None:
    """The scoring graph takes INT64 pixels: 1e300 or 2.5 would be silently wrapped or truncated."""
    for value in (1e300, 2.5):
        pixels = {"name": "pixels", "datatype": "FP64", "shape": [1, 64], "data": [value] * 64}
        labels = {"name": "labels", "datatype": "INT64", "shape": [1], "data": [0]}
        response = client.post("/v2/models/imagetransformer/infer", json={"inputs": [pixels, labels]})
        assert response.status_code == 400 and "INT64" in response.json()["error"], response.text
