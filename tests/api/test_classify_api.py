"""`/v1/classify` through the real app and the shipped model."""

from __future__ import annotations

import base64

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from tests.helpers import held_out_digits, png_bytes, png_header_only

IMAGES, LABELS = held_out_digits()
DIGIT = png_bytes(IMAGES[0])
DIGIT_LABEL = str(LABELS[0])


def assert_top(result: list[dict[str, object]], label: str, k: int = 5) -> None:
    assert len(result) == k
    scores = [p["score"] for p in result]
    assert scores == sorted(scores, reverse=True)  # type: ignore[type-var]
    assert 0 < sum(scores) <= 1 + 1e-6  # type: ignore[arg-type]
    assert result[0]["label"] == label


def test_multipart_file(client: TestClient) -> None:
    response = client.post("/v1/classify", files={"file": ("d.png", DIGIT, "image/png")})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == "vit"
    (result,) = body["results"]
    assert_top(result, DIGIT_LABEL)


def test_repeated_file_fields_keep_request_order(client: TestClient) -> None:
    files = [("file", (f"{i}.png", png_bytes(IMAGES[i]), "image/png")) for i in range(4)]
    results = client.post("/v1/classify", files=files).json()["results"]
    assert [r[0]["label"] for r in results] == [str(label) for label in LABELS[:4]]


def test_raw_image_body(client: TestClient) -> None:
    response = client.post("/v1/classify?top_k=3", content=DIGIT, headers={"content-type": "image/png"})
    assert response.status_code == 200, response.text
    assert_top(response.json()["results"][0], DIGIT_LABEL, k=3)


def test_json_base64_and_data_url(client: TestClient) -> None:
    encoded = base64.b64encode(DIGIT).decode()
    images = [encoded, f"data:image/png;base64,{encoded}"]
    response = client.post("/v1/classify", json={"images": images, "top_k": 2})
    assert response.status_code == 200, response.text
    for result in response.json()["results"]:
        assert_top(result, DIGIT_LABEL, k=2)


def test_options_as_form_fields_and_model_by_name(client: TestClient) -> None:
    response = client.post(
        "/v1/classify", files={"file": ("d.png", DIGIT, "image/png")}, data={"top_k": "1", "model": "vit"}
    )
    assert response.status_code == 200, response.text
    assert len(response.json()["results"][0]) == 1


def test_top_k_above_label_count_returns_every_label(client: TestClient) -> None:
    result = client.post("/v1/classify?top_k=50", content=DIGIT, headers={"content-type": "image/png"}).json()
    assert sorted(p["label"] for p in result["results"][0]) == [str(d) for d in range(10)]


@pytest.mark.parametrize(
    ("kwargs", "status", "code"),
    [
        ({"content": DIGIT, "headers": {"content-type": "text/plain"}}, 415, "unsupported_media_type"),
        ({"content": b"not an image", "headers": {"content-type": "image/png"}}, 415, "unsupported_image"),
        ({"content": DIGIT[:-30], "headers": {"content-type": "image/png"}}, 422, "corrupt_image"),
        ({"content": b"", "headers": {"content-type": "image/png"}}, 422, "empty_image"),
        ({"content": png_header_only(20000, 20000), "headers": {"content-type": "image/png"}}, 413, "image_too_large"),
        ({"json": {"images": ["***"]}}, 422, "invalid_base64"),
        ({"json": {"images": []}}, 422, "no_image"),
        ({"json": {"pictures": []}}, 422, "invalid_request"),
        ({"content": b"{", "headers": {"content-type": "application/json"}}, 400, "invalid_json"),
        ({"json": {"images": [base64.b64encode(DIGIT).decode()], "top_k": 0}}, 422, "invalid_request"),
        ({"json": {"images": [base64.b64encode(DIGIT).decode()], "colour": "red"}}, 422, "invalid_request"),
        ({"data": {"file": "text"}, "files": {"other": ("x", b"1")}}, 422, "not_a_file"),
        ({"data": {"top_k": "3"}, "files": {"unused": ("x", b"1")}}, 422, "unexpected_file"),
    ],
    ids=[
        "text-content-type", "not-an-image", "truncated", "empty", "pixel-bomb", "bad-base64", "no-images",
        "no-images-key", "bad-json", "top-k-zero", "unknown-option", "file-as-text", "wrong-file-field",
    ],
)  # fmt: skip
def test_bad_requests_get_clear_json_errors(client: TestClient, kwargs: dict, status: int, code: str) -> None:  # type: ignore[type-arg]
    response = client.post("/v1/classify", **kwargs)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["message"]
    assert "Traceback" not in response.text


def test_errors_quote_only_a_short_prefix_of_what_the_client_sent(client: TestClient) -> None:
    name = "m" * 10_000
    for response in (
        client.post("/v1/classify", params={"model": name}, content=DIGIT, headers={"content-type": "image/png"}),
        client.get(f"/v2/models/{name}"),
    ):
        assert response.status_code == 404 and len(response.text) < 1000, len(response.text)


def test_query_validation_and_unknown_model(client: TestClient) -> None:
    headers = {"content-type": "image/png"}
    assert client.post("/v1/classify?top_k=-1", content=DIGIT, headers=headers).status_code == 422
    assert client.post("/v1/classify?shape=round", content=DIGIT, headers=headers).status_code == 422
    response = client.post("/v1/classify?model=nope", content=DIGIT, headers=headers)
    assert response.status_code == 404 and response.json()["error"]["code"] == "unknown_model"


def test_too_many_images(client: TestClient) -> None:
    limit = client.app.state.settings.max_images_per_request  # type: ignore[attr-defined]
    files = [("file", ("d.png", DIGIT, "image/png"))] * (limit + 1)
    response = client.post("/v1/classify", files=files)
    assert response.status_code == 413 and response.json()["error"]["code"] == "too_many_images"


def test_rgb_and_odd_modes_classify(client: TestClient) -> None:
    """An RGBA upscaled digit classifies the same as the greyscale original."""
    big = IMAGES[0].resize((64, 64), Image.Resampling.NEAREST).convert("RGBA")
    response = client.post("/v1/classify", content=png_bytes(big), headers={"content-type": "image/png"})
    assert response.status_code == 200
    assert response.json()["results"][0][0]["label"] == DIGIT_LABEL


def test_far_too_many_files_is_still_413(client: TestClient) -> None:
    limit = client.app.state.settings.max_images_per_request  # type: ignore[attr-defined]
    files = [("file", ("d.png", DIGIT, "image/png"))] * (limit + 10)
    response = client.post("/v1/classify", files=files)
    assert response.status_code == 413 and response.json()["error"]["code"] == "too_many_images"


def test_malformed_multipart_is_400(client: TestClient) -> None:
    response = client.post(
        "/v1/classify", content=b"--x\r\nno headers", headers={"content-type": "multipart/form-data; boundary=x"}
    )
    assert response.status_code in (400, 422), response.text
    assert "error" in response.json()


def test_where_an_image_decodes_follows_its_pixels_not_its_bytes(client: TestClient) -> None:
    """A few KB can hold a megapixel (a flat palette PNG): small bodies decode on the event loop only
    when their headers promise few pixels; the rest decode in a worker thread."""
    import threading

    from service import imaging, pipeline

    threads: list[tuple[str, str]] = []
    decode_opened = imaging.decode_opened

    def spy(opened: imaging.Opened, spec: imaging.Preprocessing | None = None) -> imaging.Decoded:
        threads.append((f"{opened.image.width}x{opened.image.height}", threading.current_thread().name))
        return decode_opened(opened, spec)

    flat = png_bytes(Image.new("P", (1000, 1000)))
    assert len(flat) < pipeline.INLINE_BYTES and pipeline.INLINE_PIXELS < 1000 * 1000
    loop_thread = client.portal.call(lambda: threading.current_thread().name)  # type: ignore[union-attr]
    imaging.decode_opened = spy
    try:
        for body in (DIGIT, flat):
            assert client.post("/v1/classify", content=body, headers={"content-type": "image/png"}).status_code == 200
    finally:
        imaging.decode_opened = decode_opened
    (digit, on_loop), (big, elsewhere) = threads
    assert on_loop == loop_thread and elsewhere != loop_thread, threads
