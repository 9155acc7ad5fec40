"""The attention endpoints through the real app, on tiny random models (shapes, sums, pictures)."""

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
from tests.conftest import client_for, copy_repository
from tests.helpers import held_out_digits, png_bytes

DIGIT = png_bytes(held_out_digits()[0][0].resize((24, 24)))
SCENE = png_bytes(Image.new("L", (120, 80), 0))
PNG_HEADERS = {"content-type": "image/png"}


@pytest.fixture(scope="module")
def all_client(
    tiny_repository: Path,
    tiny_detr_repository: Path,
    tiny_generator_repository: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[TestClient]:
    root = tmp_path_factory.mktemp("all")
    for repository in (tiny_repository, tiny_detr_repository, tiny_generator_repository):
        copy_repository(repository, root)
    yield from client_for(Settings(model_repository=root, device="cpu"))


def decode(response_content: bytes) -> Image.Image:
    return Image.open(io.BytesIO(response_content))


@pytest.mark.parametrize(
    "query", ["", "method=raw", "method=raw&layer=0&head=1", "fusion=max&discard_ratio=0.5", "head=0"]
)
def test_vit_attention_maps(all_client: TestClient, query: str) -> None:
    response = all_client.post(f"/v1/classify/attention?{query}", files=[("file", ("d.png", DIGIT, "image/png"))] * 2)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["grid"] == [4, 4] and len(body["results"]) == 2
    for result in body["results"]:
        grid = np.array(result["map"])
        assert grid.shape == (4, 4) and (grid >= 0).all()
        assert grid.sum() <= 1 + 1e-5  # the CLS row's share on the patches (the rest is on CLS itself)
        assert result["label"] in [str(d) for d in range(10)]


def test_vit_attention_png_is_the_input_size(all_client: TestClient) -> None:
    plain = all_client.post("/v1/classify/attention?render=true", content=DIGIT, headers=PNG_HEADERS)
    assert plain.headers["content-type"] == "image/png" and decode(plain.content).size == (24, 24)
    enlarged = all_client.post(
        "/v1/classify/attention?scale=4", content=DIGIT, headers={**PNG_HEADERS, "accept": "image/png"}
    )
    assert decode(enlarged.content).size == (96, 96)


@pytest.mark.parametrize(
    ("query", "code"),
    [
        ("layer=9&method=raw", "invalid_request"),
        ("head=7", "invalid_request"),
        ("fusion=median", "invalid_request"),
        ("discard_ratio=1", "invalid_request"),
    ],
)
def test_vit_attention_bad_options(all_client: TestClient, query: str, code: str) -> None:
    response = all_client.post(f"/v1/classify/attention?{query}", content=DIGIT, headers=PNG_HEADERS)
    assert response.status_code == 422 and response.json()["error"]["code"] == code


def test_detr_attention_per_detection_and_for_a_point(all_client: TestClient) -> None:
    response = all_client.post("/v1/detect/attention?threshold=0&point=100,10", content=SCENE, headers=PNG_HEADERS)
    assert response.status_code == 200, response.text
    body = response.json()
    # tiny DETR: 32x32 input, stride 4 -> 8x8 cells; a 120x80 image fills 8 x 6 of them
    assert body["grid"] == [6, 8]
    assert body["cell"] == pytest.approx([15.0, 15.0], rel=0.02)  # letterbox rounding: 80 px -> 21 input px
    (result,) = body["results"]
    assert len(result["detections"]) == 5
    for detection in result["detections"]:
        grid = np.array(detection["attention"])
        assert grid.shape == (6, 8) and grid.sum() <= 1 + 1e-5 and "box" in detection
    assert result["encoder"]["cell"] == [0, 6]
    assert np.array(result["encoder"]["map"]).shape == (6, 8)


def test_detr_attention_png_has_a_panel_per_detection(all_client: TestClient) -> None:
    response = all_client.post(
        "/v1/detect/attention?threshold=0&max_detections=3&render=true", content=SCENE, headers=PNG_HEADERS
    )
    picture = decode(response.content)
    assert picture.size == (3 * 120 + 2 * 4, 80)
    outside = all_client.post("/v1/detect/attention?point=500,5", content=SCENE, headers=PNG_HEADERS)
    assert outside.status_code == 422


def test_generator_attention_covers_only_the_context(all_client: TestClient) -> None:
    image = base64.b64encode(png_bytes(held_out_digits()[0][0])).decode()
    body = all_client.post("/v1/generate/attention", json={"image": image, "row": 5, "col": 3, "label": "2"}).json()
    grid = np.array(body["map"])
    t = 5 * 8 + 3
    assert grid.shape == (8, 8) and body["context"] == 10  # the tiny model's memory
    flat = grid.ravel()
    assert flat[t:].sum() == 0 and flat[: t - 10].sum() == 0  # nothing at or after the pixel, nothing out of memory
    assert body["start"] == 0  # the start token is out of reach this far in
    assert flat.sum() == pytest.approx(1.0, abs=1e-5)
    first = all_client.post("/v1/generate/attention", json={"image": image, "row": 0, "col": 0}).json()
    assert first["start"] == pytest.approx(1.0) and first["context"] == 0
    picture = all_client.post(
        "/v1/generate/attention", json={"image": image, "row": 1, "col": 1, "render": True, "scale": 10}
    )
    assert decode(picture.content).size == (80, 80)
    assert all_client.post("/v1/generate/attention", json={"image": image, "row": 8, "col": 0}).status_code == 422


def test_pictures_are_capped_whatever_the_scale_or_shape(all_client: TestClient) -> None:
    """`scale` and long thin images would make a tiny request draw gigabytes: 413 past the cap, or a
    smaller enlargement where the service chooses it."""
    from io import BytesIO

    from service.attention import MAX_PICTURE_PIXELS

    big = png_bytes(Image.new("L", (1000, 1000)))
    png = {"headers": {"content-type": "image/png", "accept": "image/png"}}
    refused = all_client.post("/v1/classify/attention?scale=64", content=big, **png)
    assert refused.status_code == 413 and refused.json()["error"]["code"] == "picture_too_large"
    thin = png_bytes(Image.new("L", (2000, 1)))
    drawn = all_client.post("/v1/detect?render=true", content=thin, **png)
    assert drawn.status_code == 200
    width, height = Image.open(BytesIO(drawn.content)).size
    assert width * height <= MAX_PICTURE_PIXELS and width >= 2000
