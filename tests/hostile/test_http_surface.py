"""Issue 25, item 5: what the HTTP surface does with a hostile Host, a JSON body under another
content type, and a half-sent body. Through the real app over the shipped repository; the body
timeout against a real server is in test_connections.py."""

from __future__ import annotations

import base64
import json

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.settings import Settings
from tests.helpers import png_bytes

EVIL = {"host": "evil.example", "x-forwarded-proto": "https", "x-forwarded-host": "evil.example"}
DIGIT = base64.b64encode(png_bytes(Image.new("L", (8, 8), 128))).decode()


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/health/live/"), ("GET", "/health/ready/"), ("GET", "/metrics/"), ("GET", "/docs/"),
     ("GET", "/openapi.json/"), ("GET", "/v1/models/"), ("POST", "/v1/classify/"), ("POST", "/v1/generate/"),
     ("GET", "/v2/"), ("GET", "/v2/models/vit/")],
)  # fmt: skip
def test_no_redirect_names_the_clients_host(client: TestClient, method: str, path: str) -> None:
    """A trailing slash was a 307 to `https://evil.example/...`, the Host and scheme the client named
    (a cache in front would keep it and serve it to others): now a plain 404, no Location."""
    response = client.request(method, path, headers=EVIL, follow_redirects=False)
    assert response.status_code == 404, (path, response.status_code, response.headers)
    assert "location" not in response.headers
    assert "evil.example" not in response.text


def test_no_route_answers_a_redirect(client: TestClient) -> None:
    """Every GET route of the app, with and without a trailing slash, under a hostile Host: no 3xx."""
    documented = client.get("/openapi.json").json()["paths"]
    paths = {path for path in documented if "{" not in path} | {"/", "/docs", "/redoc", "/metrics", "/openapi.json"}
    assert {"/health/live", "/v1/models"} <= paths
    for path in sorted(paths):
        for variant in (path, path.rstrip("/") + "/"):
            response = client.get(variant, headers=EVIL, follow_redirects=False)
            assert not 300 <= response.status_code < 400, (variant, response.status_code)
            assert "evil.example" not in response.headers.get("location", "")


NOT_JSON = ["text/plain", "text/plain; charset=utf-8", "application/x-www-form-urlencoded", "multipart/form-data",
            "application/jsonx", "image/png", None]  # fmt: skip


@pytest.mark.parametrize("content_type", NOT_JSON)
@pytest.mark.parametrize(
    ("path", "body"),
    [("/v1/generate", {"num_images": 1}), ("/v1/generate/attention", {"image": DIGIT, "row": 2, "col": 3}),
     ("/v1/classify", {"images": [DIGIT]})],
)  # fmt: skip
def test_json_routes_refuse_a_body_not_sent_as_json(
    client: TestClient, path: str, body: dict[str, object], content_type: str | None
) -> None:
    """A text/plain (or form) POST is a request any web page can make its visitor's browser send
    without a CORS preflight: a JSON body under such a type was answered 200; now 415, before the
    body is read. (An image/* body on an upload route is an image, and is decoded as one.)"""
    headers = {} if content_type is None else {"content-type": content_type}
    if path == "/v1/classify" and content_type in ("image/png", "multipart/form-data"):
        pytest.skip("an upload route's other forms: the raw image, the multipart upload")
    response = client.post(path, content=json.dumps(body), headers=headers)
    assert response.status_code == 415, (path, content_type, response.status_code, response.text[:200])
    assert response.json()["error"]["code"] == "unsupported_media_type"
    assert len(response.content) < 1000


@pytest.mark.parametrize("content_type", ["application/json", "application/json; charset=utf-8",
                                          "Application/JSON", "application/vnd.vitserve+json"])  # fmt: skip
@pytest.mark.parametrize(
    ("path", "body"),
    [("/v1/generate/attention", {"image": DIGIT, "row": 2, "col": 3}), ("/v1/classify", {"images": [DIGIT]})],
)
def test_json_routes_take_json_and_plus_json(
    client: TestClient, path: str, body: dict[str, object], content_type: str
) -> None:
    response = client.post(path, content=json.dumps(body), headers={"content-type": content_type})
    assert response.status_code == 200, (path, content_type, response.text[:300])


def test_a_quoted_content_type_is_cut(client: TestClient) -> None:
    """The refused type is named in the message, cut like any client text."""
    content_type = "text/" + "x" * 10_000
    response = client.post("/v1/generate", content=b"{}", headers={"content-type": content_type})
    assert response.status_code == 415
    assert len(response.content) < 1000


def test_v2_keeps_taking_a_body_without_content_type(client: TestClient) -> None:
    """The Open Inference Protocol's clients may send JSON with no content type, or any."""
    body = {"inputs": [{"name": "pixel_values", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.0] * 64}]}
    model = client.get("/v2/models/vit").json()
    body["inputs"][0]["name"] = model["inputs"][0]["name"]  # type: ignore[index]
    shape = [1, *model["inputs"][0]["shape"][1:]]
    body["inputs"][0]["shape"] = shape  # type: ignore[index]
    size = 1
    for n in shape:
        size *= n
    body["inputs"][0]["data"] = [0.0] * size  # type: ignore[index]
    for headers in ({}, {"content-type": "text/plain"}):
        response = client.post("/v2/models/vit/infer", content=json.dumps(body), headers=headers)
        assert response.status_code == 200, (headers, response.text[:300])


def test_the_body_timeout_is_a_few_seconds_like_the_header_timeout() -> None:
    """A half-sent body held its request 30 s (the old default) before its 408: now as long as the
    headers may take (the 408 itself: test_connections.py's half-sent body)."""
    fields = Settings.model_fields
    assert fields["body_timeout_s"].default <= fields["header_timeout_s"].default <= 10
