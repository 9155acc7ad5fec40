"""Issue 25, item 2: nothing a client sends comes back at its own size. Unknown options are refused
by name in a bounded list (service.text.LISTED_ITEMS names, each cut to QUOTED_CHARS, and the count),
every error message is cut to MESSAGE_CHARS, and an error body stays under the larger of 20 KB and a
tenth of its request, on /v1, /v2 and validation errors alike.

Before: 290,000 unknown option names (3.8 MB) came back as a 41 MB 422 after 3.1 s (stalling
/health/live 1.9 s, +314 MiB resident); one 10 MB key name came back twice (20 MB)."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.codec import MAX_JSON_KEYS
from service.routes.options import InvalidOptions, validate_options
from service.tasks.classify import ClassifyOptions
from service.text import LISTED_ITEMS, MESSAGE_CHARS, QUOTED_CHARS, clipped, quoted
from tests.helpers import png_bytes

PNG = png_bytes(Image.new("L", (8, 8), 128))
DIGIT = base64.b64encode(PNG).decode()
JSON = {"content-type": "application/json"}


def bounded(request_bytes: int, response: Any) -> None:
    """The issue's bound on an error body: the larger of 20 KB and a tenth of the request."""
    assert len(response.content) <= max(20_000, request_bytes // 10), (len(response.content), request_bytes)


def unknown(count: int, width: int = 6) -> dict[str, int]:
    return {f"opt{i:0{width}d}": 1 for i in range(count)}


def test_290000_unknown_options_are_refused_before_parsing(client: TestClient) -> None:
    """The issue's 3.8 MB body: more keys than any request needs, refused from a count of its colons
    (json.loads would hold the interpreter's lock 0.2 s building them)."""
    body = json.dumps({**unknown(290_000), "num_images": 1}).encode()
    response = client.post("/v1/generate", content=body, headers=JSON)
    assert response.status_code == 413 and response.json()["error"]["code"] == "json_too_large"
    assert len(response.content) < 1000


@pytest.mark.parametrize(
    ("path", "extra"),
    [("/v1/generate", {"num_images": 1}), ("/v1/generate/attention", {"image": DIGIT, "row": 1, "col": 1}),
     ("/v1/classify", {"images": [DIGIT]}), ("/v1/detect/attention", {"images": [DIGIT]})],
)  # fmt: skip
def test_unknown_options_are_named_in_a_bounded_list(client: TestClient, path: str, extra: dict[str, Any]) -> None:
    """Just under the key cap: 9,000 unknown names, a 422 naming the first LISTED_ITEMS in the order
    sent, and how many more there were."""
    count = MAX_JSON_KEYS - 1000
    body = json.dumps({**unknown(count), **extra}).encode()
    response = client.post(path, content=body, headers=JSON)
    assert response.status_code == 422, response.text[:300]
    error = response.json()["error"]
    assert error["code"] == "invalid_request"
    assert [d["loc"] for d in error["details"]] == [["body", f"opt{i:06d}"] for i in range(LISTED_ITEMS)]
    assert {d["type"] for d in error["details"]} == {"extra_forbidden"}
    assert error["message"].endswith(f"; and {count - LISTED_ITEMS} more")
    assert len(response.content) < 2500
    bounded(len(body), response)


def test_known_options_errors_come_first_then_unknown_names(client: TestClient) -> None:
    body = {"images": [DIGIT], "top_k": 0, "colour": "red", **unknown(20)}
    response = client.post("/v1/classify", json=body)
    assert response.status_code == 422
    error = response.json()["error"]
    locs = [d["loc"] for d in error["details"]]
    assert locs[:3] == [["body", "top_k"], ["body", "colour"], ["body", "opt000000"]]
    assert len(locs) == LISTED_ITEMS and error["message"].endswith("; and 12 more")


def test_unknown_query_options_are_bounded(client: TestClient) -> None:
    """A query string of 3,000 unknown names (27 KB, within the header limit): a bounded 422."""
    query = "&".join(f"q{i:05d}=1" for i in range(3000))
    response = client.post(f"/v1/classify?{query}", content=PNG, headers={"content-type": "image/png"})
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["details"][0]["loc"] == ["query", "q00000"] and len(error["details"]) == LISTED_ITEMS
    assert len(response.content) < 2500


@pytest.mark.parametrize("path", ["/v1/generate", "/v1/classify"])
def test_a_10_mb_key_name_comes_back_cut(client: TestClient, path: str) -> None:
    """One 10 MB key came back twice (message and details): now cut to QUOTED_CHARS in each."""
    key = "k" * 10_000_000
    body = json.dumps({key: 1, **({"images": [DIGIT]} if path == "/v1/classify" else {})}).encode()
    response = client.post(path, content=body, headers=JSON)
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["details"][0]["loc"] == ["body", key[:QUOTED_CHARS] + "..."]
    assert len(response.content) < 1000


@pytest.mark.parametrize(
    ("body", "status"),
    [({"model": "m" * 10_000_000}, 404), ({"label": "x" * 10_000_000}, 422), ({"prime": "!" * 10_000_000}, 422),
     ({"temperature": "9" * 5_000_000}, 422), ({"num_images": [1] * 100_000}, 422)],
)  # fmt: skip
def test_long_values_never_come_back_whole(client: TestClient, body: dict[str, Any], status: int) -> None:
    raw = json.dumps(body).encode()
    response = client.post("/v1/generate", content=raw, headers=JSON)
    assert response.status_code == status, response.text[:300]
    assert len(response.content) < 2500
    bounded(len(raw), response)


def test_v2_parameters_and_names_are_bounded(client: TestClient) -> None:
    """/v2 cut its messages already; its image view's unknown parameters are now refused in a
    bounded list too, and its tensor names quoted."""
    tensor = {"name": "image", "shape": [1], "datatype": "BYTES", "data": [DIGIT]}
    body = json.dumps({"inputs": [tensor], "parameters": unknown(5000)}).encode()
    response = client.post("/v2/models/vit_image/infer", content=body, headers=JSON)
    assert response.status_code == 400 and "opt000000" in response.json()["error"]
    assert len(response.content) < 1000
    body = json.dumps({"inputs": [{**tensor, "name": "n" * 5_000_000}]}).encode()
    response = client.post("/v2/models/vit_image/infer", content=body, headers=JSON)
    assert response.status_code == 400 and len(response.content) < 1000


def test_every_message_is_cut() -> None:
    assert clipped("x" * 10) == "x" * 10
    assert clipped("x" * 10_000) == "x" * MESSAGE_CHARS + "..."
    assert quoted("y" * 1000) == repr("y" * QUOTED_CHARS) + "..."


def test_validate_options_counts_every_unknown_name_and_lists_a_few() -> None:
    values = {"top_k": "many", **unknown(100_000)}
    with pytest.raises(InvalidOptions) as caught:
        validate_options(ClassifyOptions, values, lambda _: "query")
    errors = caught.value.errors()
    assert len(errors) == LISTED_ITEMS and caught.value.total == 100_001
    assert errors[0]["loc"] == ("query", "top_k") and errors[1]["loc"] == ("query", "opt000000")
    assert validate_options(ClassifyOptions, {"top_k": "3"}, lambda _: "query").top_k == 3


@pytest.mark.parametrize("path", ["/v1/generate", "/v1/classify", "/v1/generate/attention"])
def test_a_key_no_utf_8_can_carry_is_named_escaped(client: TestClient, path: str) -> None:
    """JSON may carry a lone surrogate (`\\ud800`), which no UTF-8 answer can: it comes back escaped,
    not as a 500."""
    body = b'{"\\ud800": 1, "images": ["%s"]}' % DIGIT.encode()
    response = client.post(path, content=body, headers=JSON)
    assert response.status_code == 422, response.text
    assert "\\ud800" in response.json()["error"]["message"]
