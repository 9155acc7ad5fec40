"""Everything a careless or hostile client might send, through the real app, with the status each
must get; and an inference failure that fails its request alone."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.settings import Settings
from tests.conftest import client_for
from tests.helpers import encode, held_out_digits, png_bytes, png_header_only

DIGIT = held_out_digits()[0][0].resize((32, 32))
RGB = Image.merge("RGB", [DIGIT] * 3)


def exif_rotated() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(RGB.rotate(90, expand=True), "JPEG", exif=exif, quality=95)


def animated_gif() -> bytes:
    return encode(DIGIT, "GIF", save_all=True, append_images=[Image.new("L", DIGIT.size)])


PNG = {"content-type": "image/png"}
CORPUS = [
    ("zero bytes", {"content": b"", "headers": PNG}, 422),
    ("text", {"content": b"hello, world", "headers": PNG}, 415),
    ("truncated png", {"content": png_bytes(Image.effect_noise((64, 64), 40))[:-50], "headers": PNG}, 422),
    (
        "truncated jpeg",
        {"content": (lambda j: j[: len(j) // 2])(encode(Image.effect_noise((64, 64), 40), "JPEG")), "headers": PNG},
        422,
    ),
    ("20000x20000 png bomb", {"content": png_header_only(20_000, 20_000), "headers": PNG}, 413),
    ("animated gif", {"content": animated_gif(), "headers": {"content-type": "image/gif"}}, 200),
    ("16-bit png", {"content": png_bytes(Image.fromarray(np.asarray(DIGIT, np.uint16) * 257)), "headers": PNG}, 200),
    ("cmyk jpeg", {"content": encode(RGB.convert("CMYK"), "JPEG"), "headers": {"content-type": "image/jpeg"}}, 200),
    ("exif-rotated jpeg", {"content": exif_rotated(), "headers": {"content-type": "image/jpeg"}}, 200),
    ("wrong content type", {"content": png_bytes(DIGIT), "headers": {"content-type": "text/plain"}}, 415),
    ("no content type", {"content": png_bytes(DIGIT), "headers": {"content-type": ""}}, 415),
    ("form without file", {"data": {"top_k": "3"}}, 415),
    ("oversized body", {"content": b"x" * 3_000_000, "headers": PNG}, 413),
    ("bad base64", {"json": {"images": ["not*base64"]}}, 422),
    ("json not an object", {"json": [1, 2]}, 422),
    ("unknown model", {"content": png_bytes(DIGIT), "headers": PNG, "params": {"model": "nope"}}, 404),
]


@pytest.fixture(scope="module")
def small_client() -> Iterator[TestClient]:
    yield from client_for(Settings(model_repository=Path("model_repository"), warmup=False, max_body_bytes=2_000_000))


@pytest.mark.parametrize(("kwargs", "status"), [(k, s) for _, k, s in CORPUS], ids=[name for name, _, _ in CORPUS])
def test_each_input_gets_its_status(small_client: TestClient, kwargs: dict, status: int) -> None:  # type: ignore[type-arg]
    response = small_client.post("/v1/classify", **kwargs)
    assert response.status_code == status, response.text
    if status == 200:
        assert response.json()["results"][0][0]["label"] == str(held_out_digits()[1][0])
    else:
        error = response.json()["error"]
        assert error["code"] and error["message"] and error["request_id"]


def test_an_inference_failure_fails_its_request_alone(
    small_client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = small_client.app.state.registry.models["vit"]  # type: ignore[attr-defined]
    batcher = model.batchers["main"]

    def broken(_: dict[str, np.ndarray]) -> list[np.ndarray]:
        raise RuntimeError("ONNX Runtime fell over")

    monkeypatch.setattr(batcher, "run_graph", broken)
    failed = small_client.post("/v1/classify", content=png_bytes(DIGIT), headers={**PNG, "x-request-id": "boom-1"})
    assert failed.status_code == 500
    assert failed.json()["error"] == {
        "code": "internal_error",
        "message": failed.json()["error"]["message"],
        "request_id": "boom-1",
    }
    assert "ONNX Runtime" not in failed.text  # no internals leak
    monkeypatch.undo()
    assert small_client.post("/v1/classify", content=png_bytes(DIGIT), headers=PNG).status_code == 200


def test_data_urls_and_base64_of_every_format(small_client: TestClient) -> None:
    images = [
        base64.b64encode(data).decode() for data in (png_bytes(DIGIT), encode(RGB, "JPEG"), encode(DIGIT, "WEBP"))
    ]
    response = small_client.post("/v1/classify", json={"images": images})
    assert response.status_code == 200 and len(response.json()["results"]) == 3
    buffer = io.BytesIO()
    DIGIT.save(buffer, format="BMP")
    assert (
        small_client.post("/v1/classify", content=buffer.getvalue(), headers={"content-type": "image/bmp"}).status_code
        == 200
    )
