"""`/v1/detect` through the real app, on a tiny random DETR (shape and contract, not accuracy)."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.settings import Settings
from tests.conftest import TINY_DETR, TINY_NAME, client_for, copy_repository
from tests.helpers import png_bytes

SCENE = png_bytes(Image.new("L", (120, 80), 0))


@pytest.fixture(scope="module")
def detr_client(
    tiny_detr_repository: Path, tiny_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TestClient]:
    root = tmp_path_factory.mktemp("both")
    copy_repository(tiny_detr_repository, root)
    copy_repository(tiny_repository, root)
    yield from client_for(Settings(model_repository=root, device="cpu"))


def boxes_inside(results: list[dict], width: int, height: int) -> bool:  # type: ignore[type-arg]
    return all(
        0 <= d["box"]["xmin"] <= d["box"]["xmax"] <= width and 0 <= d["box"]["ymin"] <= d["box"]["ymax"] <= height
        for d in results
    )


def test_detect_every_input_form(detr_client: TestClient) -> None:
    multipart = detr_client.post("/v1/detect?threshold=0", files=[("file", ("a.png", SCENE, "image/png"))] * 2)
    raw = detr_client.post("/v1/detect?threshold=0", content=SCENE, headers={"content-type": "image/png"})
    as_json = detr_client.post("/v1/detect", json={"images": [base64.b64encode(SCENE).decode()], "threshold": 0})
    for response, count in ((multipart, 2), (raw, 1), (as_json, 1)):
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["model"] == TINY_DETR and len(body["results"]) == count
        for result in body["results"]:
            assert len(result) == 5  # every query passes threshold 0
            assert [d["score"] for d in result] == sorted((d["score"] for d in result), reverse=True)
            assert boxes_inside(result, 120, 80)
            assert {d["label"] for d in result} <= {str(i) for i in range(10)}


def test_threshold_and_max_detections(detr_client: TestClient) -> None:
    headers = {"content-type": "image/png"}
    capped = detr_client.post("/v1/detect?threshold=0&max_detections=2", content=SCENE, headers=headers).json()
    assert len(capped["results"][0]) == 2
    strict = detr_client.post("/v1/detect?threshold=1", content=SCENE, headers=headers).json()
    assert strict["results"] == [[]]


def test_rendered_png_by_option_and_by_accept(detr_client: TestClient) -> None:
    for response in (
        detr_client.post("/v1/detect?render=true&threshold=0", content=SCENE, headers={"content-type": "image/png"}),
        detr_client.post(
            "/v1/detect?threshold=0", content=SCENE, headers={"content-type": "image/png", "accept": "image/png"}
        ),
    ):
        assert response.status_code == 200 and response.headers["content-type"] == "image/png"
        image = Image.open(io.BytesIO(response.content))
        assert image.width / image.height == pytest.approx(120 / 80)


@pytest.mark.parametrize(
    ("query", "status", "code"),
    [
        ("threshold=1.5", 422, "invalid_request"),
        ("max_detections=0", 422, "invalid_request"),
        (f"model={TINY_NAME}", 422, "wrong_task"),
        ("model=nothing", 404, "unknown_model"),
    ],
)
def test_bad_detect_options(detr_client: TestClient, query: str, status: int, code: str) -> None:
    response = detr_client.post(f"/v1/detect?{query}", content=SCENE, headers={"content-type": "image/png"})
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code


def test_render_takes_one_image(detr_client: TestClient) -> None:
    response = detr_client.post("/v1/detect?render=true", files=[("file", ("a.png", SCENE, "image/png"))] * 2)
    assert response.status_code == 422 and response.json()["error"]["code"] == "render_needs_one_image"
