"""`/v1/generate` and `/v1/score` through the real app, on a tiny random Image Transformer."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.settings import Settings
from tests.conftest import TINY_GENERATOR, client_for
from tests.helpers import held_out_digits, png_bytes


@pytest.fixture(scope="module", params=["off", "on"], ids=["host_cache", "cache_pool"])
def gen_client(tiny_generator_repository: Path, request: pytest.FixtureRequest) -> Iterator[TestClient]:
    """Every test with the caches on the host, then in the pool of the pooled step graph."""
    yield from client_for(Settings(model_repository=tiny_generator_repository, device="cpu", max_images_per_request=16,
                                   device_cache=request.param))  # fmt: skip


def pngs(body: dict) -> list[np.ndarray]:  # type: ignore[type-arg]
    return [np.asarray(Image.open(io.BytesIO(base64.b64decode(p)))) for p in body["images"]]


def test_generate_returns_pngs_at_the_asked_scale(gen_client: TestClient) -> None:
    response = gen_client.post("/v1/generate", json={"label": "3", "num_images": 3, "seed": 5, "scale": 4})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == TINY_GENERATOR and body["seed"] == 5 and body["size"] == [32, 32]
    images = pngs(body)
    assert len(images) == 3 and all(img.shape == (32, 32) for img in images)
    native = pngs(gen_client.post("/v1/generate", json={"num_images": 1, "seed": 5, "scale": 1}).json())[0]
    assert native.shape == (8, 8)


def test_same_seed_same_images_bit_for_bit(gen_client: TestClient) -> None:
    request = {"label": "7", "num_images": 4, "seed": 123, "temperature": 1.3, "top_k": 10}
    first, second = (gen_client.post("/v1/generate", json=request).json() for _ in range(2))
    assert first["images"] == second["images"]
    other = gen_client.post("/v1/generate", json={**request, "seed": 124}).json()
    assert other["images"] != first["images"]
    unseeded = gen_client.post("/v1/generate", json={"num_images": 1}).json()
    again = gen_client.post("/v1/generate", json={"num_images": 1, "seed": unseeded["seed"]}).json()
    assert again["images"] == unseeded["images"]  # the seed it reports reproduces it


def test_raw_png_with_accept(gen_client: TestClient) -> None:
    response = gen_client.post("/v1/generate", json={"seed": 1}, headers={"accept": "image/png"})
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(response.content)).size == (128, 128)
    refused = gen_client.post("/v1/generate", json={"num_images": 2}, headers={"accept": "image/png"})
    assert refused.status_code == 422


def test_a_stream_that_cannot_finish_ends_with_an_error_event(
    gen_client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The 200 went out with the first row: a failure later (here the batcher refusing a step) must
    end the stream with an `error` event, not cut it off."""
    from service.errors import ServiceError
    from service.repository import ServedModel

    run, steps = ServedModel.run, 0

    async def failing(
        self: ServedModel, feeds: dict[str, np.ndarray], graph: str = "main", reservation: object = None
    ) -> list[np.ndarray]:
        nonlocal steps
        steps += 1
        if steps > 20:
            raise ServiceError(503, "overloaded", "the queue is full; retry shortly")
        return await run(self, feeds, graph, reservation)  # type: ignore[arg-type]

    ServedModel.run = failing  # type: ignore[method-assign]
    try:
        with gen_client.stream("POST", "/v1/generate", json={"seed": 1, "stream": True}) as response:
            assert response.status_code == 200 and response.headers["cache-control"] == "no-cache"
            events = [block for block in response.read().decode().split("\n\n") if block]
    finally:
        ServedModel.run = run  # type: ignore[method-assign]
    kinds = [block.split("\n")[0] for block in events]
    assert kinds == ["event: row"] * 2 + ["event: error"]
    assert json.loads(events[-1].split("data: ", 1)[1]) == {
        "code": "overloaded",
        "message": "the queue is full; retry shortly",
    }


def test_completion_keeps_the_primed_rows(gen_client: TestClient) -> None:
    digit = held_out_digits()[0][0]
    expected = np.round(np.asarray(digit) / 255 * 16).astype(int)  # 8x8, already at the model's size
    prime = base64.b64encode(png_bytes(digit)).decode()
    body = gen_client.post(
        "/v1/generate", json={"prime": prime, "prime_rows": 5, "num_images": 2, "seed": 3, "scale": 1}
    ).json()
    for image in pngs(body):
        levels = np.round(image / 255 * 16).astype(int)
        np.testing.assert_array_equal(levels[:5], expected[:5])


def test_streaming_sends_each_row_then_the_images(gen_client: TestClient) -> None:
    with gen_client.stream("POST", "/v1/generate", json={"num_images": 2, "seed": 9, "stream": True}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [block for block in response.read().decode().split("\n\n") if block]
    kinds = [block.split("\n")[0] for block in events]
    assert kinds == ["event: row"] * 8 + ["event: done"]
    rows = [json.loads(block.split("data: ", 1)[1]) for block in events[:-1]]
    assert [r["row"] for r in rows] == list(range(8))
    done = json.loads(events[-1].split("data: ", 1)[1])
    plain = gen_client.post("/v1/generate", json={"num_images": 2, "seed": 9}).json()
    assert done["images"] == plain["images"]  # streaming changes the delivery, not the images
    last = pngs(done)[0][::16, ::16]
    assert last[7].tolist() == rows[7]["pixels"][0]


@pytest.mark.parametrize(
    "request_body",
    [{"num_images": 0}, {"temperature": 0}, {"top_k": 0}, {"seed": -1}, {"label": "x"}, {"scale": 0},
     {"prime_rows": 3}, {"prime": "***"}, {"prime": base64.b64encode(b"no image").decode()}, {"colour": 1}],
)  # fmt: skip
def test_bad_generate_requests_are_4xx(gen_client: TestClient, request_body: dict) -> None:  # type: ignore[type-arg]
    response = gen_client.post("/v1/generate", json=request_body)
    assert 400 <= response.status_code < 500, response.text
    assert "error" in response.json()


def test_too_many_images_is_413(gen_client: TestClient) -> None:
    assert gen_client.post("/v1/generate", json={"num_images": 17}).status_code == 413


def test_score_gives_bits_per_dimension(gen_client: TestClient) -> None:
    digits = [png_bytes(img) for img in held_out_digits()[0][:3]]
    response = gen_client.post("/v1/score?label=4", files=[("file", ("d.png", d, "image/png")) for d in digits])
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert len(results) == 3
    for r in results:
        assert r["bits_per_dim"] > 0
        assert r["bits_per_dim"] == pytest.approx(-r["log_likelihood"] / (64 * np.log(2)), rel=1e-5)
    assert (
        gen_client.post("/v1/score?label=nope", files=[("file", ("d.png", digits[0], "image/png"))]).status_code == 422
    )


@pytest.mark.parametrize("device_cache", ["off", "on"])
def test_under_load_a_stream_is_refused_up_front_or_finishes(
    tiny_generator_repository: Path, device_cache: str
) -> None:
    """Each generation holds queue room for all its steps from before its 200: with a queue of 6
    images and 16 concurrent streams of 2, some get 503 at once and every other one runs to `done`."""
    from concurrent.futures import ThreadPoolExecutor

    policy = {TINY_GENERATOR: {"max_queue_size": 6, "max_batch_size": 6}}
    settings = Settings(model_repository=tiny_generator_repository, device="cpu", batch_policy=policy,
                        device_cache=device_cache)  # type: ignore[arg-type]  # fmt: skip
    for client in client_for(settings):

        def stream(seed: int, client: TestClient = client) -> tuple[int, str]:
            body = {"num_images": 2, "seed": seed, "stream": True}
            with client.stream("POST", "/v1/generate", json=body) as response:
                text = response.read().decode()
                last = [b for b in text.split("\n\n") if b][-1].split("\n")[0] if response.status_code == 200 else ""
                return response.status_code, last

        with ThreadPoolExecutor(16) as pool:
            outcomes = list(pool.map(stream, range(16)))
        assert {status for status, _ in outcomes} <= {200, 503}
        assert all(last == "event: done" for status, last in outcomes if status == 200), outcomes
        assert any(status == 503 for status, _ in outcomes) and any(status == 200 for status, _ in outcomes)
        model = client.app.state.registry.models[TINY_GENERATOR]  # type: ignore[attr-defined]
        graph = "pooled_step" if device_cache == "on" else "step"
        assert model.batchers[graph].reserved == 0  # every reservation released
        assert model.cache_pool is None or len(model.cache_pool.free) == model.cache_pool.capacity  # every slot
